"""Clean vs corrupted: attribution patching, integrated gradients and activation patching.

Each component family (attention heads at ``attn.v_out``, MLP neurons at ``mlp.post_act``, the
residual stream at each layer) gets three DSTs over a (main, baseline) prompt pair, all in the
same units — the objective's change when the component's main-prompt value replaces its
baseline value — so they can be ranked and compared directly:

* ``*.attribution_patching`` = ``(a − b)·∇a``: the first-order estimate, from the two runs and
  the main prompt's backward pass alone;
* ``*.integrated_gradients`` = ``(a − b)·∫₀¹ ∇f(b + α(a − b)) dα`` at that node, the rest of
  the model as on the main prompt (exact for a full cut of the network: summed over the
  residual stream at one layer it equals ``objective(main) − objective(baseline)``);
* ``*.activation_patching`` = ``objective(main) − objective(main with this component's value
  from the baseline)``: the exact effect, by interventions (many patched copies per pass).

Channel axes (a head's value channels, the residual's ``D``) are summed (estimates) or patched
whole (exact), so every DST has one value per component and position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scalarlens import (
    DeriveContext,
    DerivedScalarType,
    Dimension,
    Inputs,
    Kernel,
    LayerIndex,
    NodeType,
    PromptCombo,
    Recipe,
    need,
    raw_source,
    recipe_factories,
)

from ._shared import ALT, BACKWARD, FORWARD, ONE, F, H, T

if TYPE_CHECKING:
    import torch

__all__ = ["FACTORIES", "RECIPES"]

DIFF, INTEGRATED, PATCHED = (
    PromptCombo.MAIN_MINUS_BASELINE,
    PromptCombo.INTEGRATED,
    PromptCombo.PATCHED,
)


def _sum_channels(keep: int) -> Kernel:
    """Kernel ``Σ_channels (a − b)·g`` for a location whose first ``keep`` axes are components."""

    def kernel(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
        product = need(inputs[0], "main minus baseline") * need(inputs[1], "gradient")
        return product.flatten(keep).sum(-1) if product.dim() > keep else product

    return kernel


def _per_token(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    """``Σ_d (a − b)·g`` per token, as ``T×1``."""
    return (need(inputs[0]) * need(inputs[1])).sum(-1, keepdim=True)


def _patched(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    return need(inputs[0], "patched effect")


def _patched_per_token(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    return need(inputs[0], "patched effect").unsqueeze(-1)


def _family(
    prefix: str,
    location: ALT,
    shape: tuple[Dimension, ...],
    node_type: NodeType,
    unit: str,
) -> tuple[Recipe, Recipe, Recipe]:
    """The three DSTs of one component family at ``location``."""
    per_token = shape[-1] is ONE
    kernel = _per_token if per_token else _sum_channels(len(shape))
    exact = f"{prefix}.activation_patching"

    def dst(kind: str, description: str, estimate: bool) -> DerivedScalarType:
        return DerivedScalarType(
            f"{prefix}.{kind}",
            shape,
            node_type,
            description,
            location=location.location_within_layer,
            has_no_layers=location.has_no_layers,
            needs_objective=True,
            estimate_of=exact if estimate else None,
        )

    a = location.value
    channels = "" if len(shape) == len(location.shape) else "Σ_channels "
    return (
        Recipe(
            dst("attribution_patching", f"first-order estimate of patching each {unit}", True),
            f"{channels}({a}[main] − {a}[baseline])·∇{a}[main]",
            kernel,
            (raw_source(location, FORWARD, DIFF), raw_source(location, BACKWARD)),
        ),
        Recipe(
            dst("integrated_gradients", f"integrated gradients at each {unit}", True),
            f"{channels}({a}[main] − {a}[baseline])·Σ_k w_k ∇{a}(baseline + α_k·(main − baseline))",
            kernel,
            (raw_source(location, FORWARD, DIFF), raw_source(location, BACKWARD, INTEGRATED)),
        ),
        Recipe(
            dst("activation_patching", f"exact effect of patching each {unit}", False),
            f"objective(main) − objective(main with {a} of the {unit} from the baseline)",
            _patched_per_token if per_token else _patched,
            (raw_source(location, FORWARD, PATCHED),),
        ),
    )


RECIPES: tuple[Recipe, ...] = (
    *_family("attn", ALT.ATTN_WEIGHTED_SUM_OF_VALUES, (T, H), NodeType.ATTENTION_HEAD, "head"),
    *_family("mlp", ALT.MLP_POST_ACT, (T, F), NodeType.MLP_NEURON, "neuron"),
    *_family(
        "resid.post_emb", ALT.RESID_POST_EMBEDDING, (T, ONE), NodeType.LAYER, "residual position"
    ),
    *_family("resid.post_attn", ALT.RESID_POST_ATTN, (T, ONE), NodeType.LAYER, "residual position"),
    *_family("resid.post_mlp", ALT.RESID_POST_MLP, (T, ONE), NodeType.LAYER, "residual position"),
)

FACTORIES = recipe_factories(RECIPES)
