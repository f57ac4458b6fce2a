"""Token / embedding family (reference §2.5).

``token.attribution`` is act×grad of the embedding.  ``vocab.write_to_input_direction`` asks,
for one MLP neuron (``options["builtins"]["neuron"] = {"layer": λ, "index": n}``), what
pre-activation every vocabulary row would produce if fed straight into layer λ's MLP input
norm (LayerNorm or RMSNorm, as the model has) — a token-level "what excites this neuron"
readout independent of the prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scalarlens import (
    ConfigError,
    DeriveContext,
    DerivedScalarType,
    DstConfig,
    Inputs,
    LayerIndex,
    NodeType,
    Recipe,
    ScalarSource,
    act_times_grad,
    need,
    raw_source,
    recipe_factories,
)
from scalarlens import WeightLocationType as W

from ._shared import ALT, BACKWARD, ONE, Loc, T, V, builtin_options

if TYPE_CHECKING:
    import torch

__all__ = ["FACTORIES", "RECIPES"]

EMB, EMB_GRAD = raw_source(ALT.RESID_POST_EMBEDDING), raw_source(ALT.RESID_POST_EMBEDDING, BACKWARD)


def _token_attribution(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    return act_times_grad(inputs, layer, ctx).sum(dim=-1, keepdim=True)


def _vocab_write(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    neuron = builtin_options(ctx.config).neuron
    assert neuron is not None  # checked when the deriver was built
    lam, n = neuron.layer, neuron.index
    normed = ctx.layer_norm("mlp", lam, ctx.weight(W.EMBEDDING))  # V×D, the model's own norm kind
    pre = normed @ ctx.weight(W.MLP_TO_HIDDEN, lam)[:, n] + ctx.weight(W.MLP_BIAS_HIDDEN, lam)[n]
    n_tokens = need(inputs[0]).shape[0]
    return pre.unsqueeze(0).expand(n_tokens, -1).contiguous()


def _vocab_sources(config: DstConfig) -> tuple[ScalarSource, ...]:
    if builtin_options(config).neuron is None:
        raise ConfigError(
            "vocab.write_to_input_direction needs a neuron: "
            'DstConfig(options={"builtins": {"neuron": {"layer": λ, "index": n}}})'
        )
    return (EMB,)  # read only for the number of tokens


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        DerivedScalarType(
            "token.attribution",
            (T, ONE),
            NodeType.LAYER,
            "act×grad of each token's embedding (token + position)",
            has_no_layers=True,
        ),
        "Σ_D x_emb[t]·∇x_emb[t]",
        _token_attribution,
        (EMB, EMB_GRAD),
    ),
    Recipe(
        DerivedScalarType(
            "vocab.write_to_input_direction",
            (T, V),
            NodeType.VOCAB_TOKEN,
            "pre-activation of a chosen MLP neuron for each vocabulary embedding row",
            location=Loc.MLP,
            has_no_layers=True,
        ),
        "[norm2_λ(E) W_in + b_in][:, n], broadcast over tokens (neuron from options)",
        _vocab_write,
        _vocab_sources,
    ),
)

FACTORIES = recipe_factories(RECIPES)
