"""Token / embedding family (reference §2.5).

``token.attribution`` is act×grad of the embedding.  ``vocab.write_to_input_direction`` asks,
for one MLP neuron (``options["builtins"]["neuron"] = {"layer": λ, "index": n}``), what
pre-activation every vocabulary row would produce if fed straight into layer λ's MLP input
LayerNorm — a token-level "what excites this neuron" readout independent of the prompt.
"""

from __future__ import annotations

import torch
from scalarlens import ConfigError, DeriveContext, DstConfig, NodeType, ScalarSource
from scalarlens import WeightLocationType as W

from ._recipes import (
    ALT,
    BACKWARD,
    FORWARD,
    ONE,
    Inputs,
    Loc,
    Recipe,
    T,
    V,
    builtin_options,
    declare,
    factories,
    need,
    raw,
)

__all__ = ["FACTORIES", "RECIPES"]

EMB, EMB_GRAD = raw(ALT.RESID_POST_EMBEDDING, FORWARD), raw(ALT.RESID_POST_EMBEDDING, BACKWARD)


def _token_attribution(inputs: Inputs, layer: int | None, ctx: DeriveContext) -> torch.Tensor:
    return (need(inputs[0]) * need(inputs[1])).sum(dim=-1, keepdim=True)


def _layer_norm_eps(ctx: DeriveContext) -> float:
    configured = builtin_options(ctx.config).layer_norm_eps
    if configured is not None:
        return configured
    model = ctx.model
    config_dict = model.config_dict() if model is not None else {}
    return float(config_dict.get("layer_norm_epsilon", 1e-5))


def _vocab_write(inputs: Inputs, layer: int | None, ctx: DeriveContext) -> torch.Tensor:
    neuron = builtin_options(ctx.config).neuron
    assert neuron is not None  # checked when the deriver was built
    lam, n = neuron.layer, neuron.index
    embedding = ctx.weight(W.EMBEDDING)  # V×D
    centred = embedding - embedding.mean(dim=-1, keepdim=True)
    sigma = torch.sqrt(centred.pow(2).mean(dim=-1, keepdim=True) + _layer_norm_eps(ctx))
    ln = centred / sigma * ctx.weight(W.LAYER_NORM_GAIN_PRE_MLP, lam) + ctx.weight(
        W.LAYER_NORM_BIAS_PRE_MLP, lam
    )
    pre = ln @ ctx.weight(W.MLP_TO_HIDDEN, lam)[:, n] + ctx.weight(W.MLP_BIAS_HIDDEN, lam)[n]
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
        declare("token.attribution", (T, ONE), NodeType.LAYER, None,
                "act×grad of each token's embedding (token + position)", has_no_layers=True),
        "Σ_D x_emb[t]·∇x_emb[t]", _token_attribution, (EMB, EMB_GRAD),
    ),
    Recipe(
        declare("vocab.write_to_input_direction", (T, V), NodeType.VOCAB_TOKEN, Loc.MLP,
                "pre-activation of a chosen MLP neuron for each vocabulary embedding row",
                has_no_layers=True),
        "[LN2_λ(E) W_in + b_in][:, n], broadcast over tokens (neuron from options)",
        _vocab_write, _vocab_sources,
    ),
)

FACTORIES = factories(RECIPES)
