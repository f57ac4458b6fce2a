"""Attention family (reference §2.4): per-(query, key, head) writes, norms, act×grad, effects.

Notation: ``p`` = ``attn.qk_probs`` (``T×S×H``), ``Vv`` = ``attn.v`` (``S×H×dv``),
``o`` = ``attn.v_out`` (``T×H×dv``), ``W_O`` (``H×dv×D``), ``c[s,h] = Vv[s,h] W_O[h]`` (the
write of one attended-to position), g the direction.  Nothing but ``attn.write`` builds the
``T×S×H×D`` tensor: norms use ``‖c‖`` (``S×H``) and direct effects contract ``Vv`` with
``W_O[h] g[t]`` (``T×H×dv``).  On models with an attention post-norm (``γ``, scale ``σ``
frozen) every write is multiplied by ``γ/σ[t]`` at its query token ``t`` (``_shared.post_norm``).
With grouped-query attention ``Vv`` is already per query head (its key/value group's values).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from scalarlens import (
    NOT_NEEDED,
    DeriveContext,
    DerivedScalarType,
    Direction,
    DstConfig,
    DstReference,
    Inputs,
    LayerIndex,
    NodeType,
    Recipe,
    WeightLocationType,
    act_times_grad,
    need,
    precedes,
    raw_source,
    recipe_factories,
)

from ._shared import (
    ALT,
    BACKWARD,
    DV,
    FORWARD,
    D,
    H,
    Loc,
    S,
    T,
    nonzero_rows,
    pairs_view,
    post_norm,
)
from .raw import RAW_DSTS
from .residual import norm_recipe, proj_recipe

if TYPE_CHECKING:
    import torch

__all__ = ["FACTORIES", "RECIPES"]

W_O = WeightLocationType.ATTN_TO_RESIDUAL
HEAD, ATTN = NodeType.ATTENTION_HEAD, Loc.ATTN
PROBS, PROBS_GRAD = raw_source(ALT.ATTN_QK_PROBS), raw_source(ALT.ATTN_QK_PROBS, BACKWARD)
VALUES, MIXED = raw_source(ALT.ATTN_VALUE), raw_source(ALT.ATTN_WEIGHTED_SUM_OF_VALUES)
POST_SCALE = raw_source(ALT.ATTN_POST_NORM_SCALE)
GAIN = WeightLocationType.ATTN_POST_NORM_GAIN


def _w_o(layer: LayerIndex, ctx: DeriveContext, gain: torch.Tensor | None) -> torch.Tensor:
    """``W_O`` (``H×dv×D``), times the post-norm gain ``γ`` where the model has one."""
    w_o = ctx.weight(W_O, layer)
    return w_o if gain is None else w_o * gain


def _head_writes(
    values: torch.Tensor, layer: LayerIndex, ctx: DeriveContext, gain: torch.Tensor | None = None
) -> torch.Tensor:
    """``c[s,h,:] = Vv[s,h] W_O[h]`` (also ``o[t,h] W_O[h]`` when given ``o``)."""
    import torch

    return torch.einsum("shv,hvd->shd", values, _w_o(layer, ctx, gain))


def _projected_direction(g: torch.Tensor, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    """``W_O[h] g[t]`` (``T×H×dv``): g pulled back to each head's value space (only the rows
    where g is non-zero are projected; the others are exact zeros)."""
    import torch

    w_o = ctx.weight(W_O, layer)
    rows = nonzero_rows(g)
    if rows is None:
        return torch.einsum("hvd,td->thv", w_o, g)
    out = g.new_zeros((g.shape[0], *w_o.shape[:2]))
    out[rows] = torch.einsum("hvd,td->thv", w_o, g[rows])
    return out


def _weighted_value(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    import torch

    return torch.einsum("tsh,shv->tshv", need(inputs[0]), need(inputs[1]))


def _write(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    probs, post = need(inputs[0]), post_norm(inputs[2], GAIN, layer, ctx)
    if post is None:
        return probs.unsqueeze(-1) * _head_writes(need(inputs[1]), layer, ctx)
    c = _head_writes(need(inputs[1]), layer, ctx, post[0])
    return (probs / post[1].unsqueeze(-1)).unsqueeze(-1) * c


def _write_norm(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    probs, post = need(inputs[0]), post_norm(inputs[2], GAIN, layer, ctx)
    if post is None:
        return probs * _head_writes(need(inputs[1]), layer, ctx).norm(dim=-1)
    c_norm = _head_writes(need(inputs[1]), layer, ctx, post[0]).norm(dim=-1)
    return probs / post[1].unsqueeze(-1) * c_norm


def _write_norm_per_token(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    post = post_norm(inputs[1], GAIN, layer, ctx)
    if post is None:
        norm: torch.Tensor = _head_writes(need(inputs[0]), layer, ctx).norm(dim=-1)
        return norm
    return _head_writes(need(inputs[0]), layer, ctx, post[0]).norm(dim=-1) / post[1]


def _sum_over_keys(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    return need(inputs[0]).sum(dim=1)


def _v_out_direct_grad(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    import torch

    mixed, g = need(inputs[0]), inputs[2]
    if g is None:  # the head does not precede the direction
        return torch.zeros_like(mixed)
    post = post_norm(inputs[1], GAIN, layer, ctx)
    if post is not None:  # pull g back through the post-norm, its scale frozen
        g = g * post[0] / post[1]
    return _projected_direction(g, layer, ctx)


def _write_to_grad(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    import torch

    probs, values, w = need(inputs[0]), need(inputs[1]), inputs[2]
    if w is None:  # the head does not precede the direction
        return torch.zeros_like(probs)
    return torch.einsum("shv,thv->tsh", values, w).mul_(probs)  # T×S×H only


def _write_to_grad_per_token(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    import torch

    mixed, w = need(inputs[0]), inputs[1]
    if w is None:
        return mixed.new_zeros(mixed.shape[:2])
    return torch.einsum("thv,thv->th", mixed, w)


WRITE_NORM = Recipe(
    DerivedScalarType(
        "attn.write_norm",
        (T, S, H),
        HEAD,
        "norm of each head's write from one attended-to token",
        location=ATTN,
    ),
    "p[t,s,h]·‖Vv[s,h] W_O[h]‖₂ (‖Vv W_O·γ‖₂/σ[t] through a post-norm)",
    _write_norm,
    (PROBS, VALUES, POST_SCALE),
)
ACT_TIMES_GRAD = Recipe(
    DerivedScalarType(
        "attn.act_times_grad",
        (T, S, H),
        HEAD,
        "attention probability × its gradient, per (query, key, head)",
        location=ATTN,
    ),
    "p[t,s,h]·∇p[t,s,h]",
    act_times_grad,
    (PROBS, PROBS_GRAD),
)
V_OUT_DIRECT_GRAD = Recipe(
    DerivedScalarType(
        "attn.v_out_direct_grad",
        (T, H, DV),
        NodeType.V_CHANNEL,
        "the direction g pulled back through W_O: the direct-path gradient at each head's v_out",
        location=ATTN,
    ),
    "W_O[h]·g[t], 0 where the layer does not precede g (g·γ/σ[t] through a post-norm)",
    _v_out_direct_grad,
    (MIXED, POST_SCALE),
    direction=True,
)


@attrs.frozen
class SameLayerIfPrecedes:
    """Layer ``l`` reads layer ``l`` of its source where an attention component at ``l``
    precedes the direction g, and nothing (``NOT_NEEDED``) where it cannot influence g."""

    direction: Direction

    def source_layer(self, target: LayerIndex, n_layers: int) -> Any:
        g_layer = self.direction.resolved_layer(n_layers)
        if precedes(target, ATTN, g_layer, self.direction.location_within_layer):
            return target
        return NOT_NEEDED

    def describe(self) -> str:
        return f"same layer where it precedes g at {self.direction.location.value}"


def _through_w_o(config: DstConfig) -> DstReference:
    """``attn.v_out_direct_grad`` at layers that precede g (``None`` elsewhere), shared by the
    direct-effect DSTs so a plan asking for several computes ``W_O[h]·g[t]`` once."""
    indexer = SameLayerIfPrecedes(config.direction)
    return DstReference(V_OUT_DIRECT_GRAD.dst.name, FORWARD, indexer)


WRITE_TO_GRAD = Recipe(
    DerivedScalarType(
        "attn.write_to_final_residual_grad",
        (T, S, H),
        HEAD,
        "direct effect on g of each head's write from one attended-to token",
        location=ATTN,
    ),
    "p[t,s,h]·((Vv[s,h] W_O[h])·g[t]), 0 where the layer does not precede g",
    _write_to_grad,
    lambda config: (PROBS, VALUES, _through_w_o(config)),
)

RECIPES: tuple[Recipe, ...] = (
    Recipe(
        DerivedScalarType(
            "attn.weighted_value",
            (T, S, H, DV),
            NodeType.V_CHANNEL,
            "value vectors weighted by attention, per (query, key, head)",
            location=ATTN,
        ),
        "p[t,s,h]·Vv[s,h,:]",
        _weighted_value,
        (PROBS, VALUES),
    ),
    Recipe(
        DerivedScalarType(
            "attn.write",
            (T, S, H, D),
            HEAD,
            "each head's write vector from one attended-to token",
            location=ATTN,
        ),
        "p[t,s,h]·(Vv[s,h] W_O[h]) (·γ/σ[t] through a post-norm)",
        _write,
        (PROBS, VALUES, POST_SCALE),
    ),
    WRITE_NORM,
    Recipe(
        DerivedScalarType(
            "attn.write_norm_per_token",
            (T, H),
            HEAD,
            "norm of each head's total write at a query token",
            location=ATTN,
        ),
        "‖o[t,h] W_O[h]‖₂ (‖o W_O·γ‖₂/σ[t] through a post-norm)",
        _write_norm_per_token,
        (MIXED, POST_SCALE),
    ),
    ACT_TIMES_GRAD,
    Recipe(
        DerivedScalarType(
            "attn.act_times_grad_per_token",
            (T, H),
            HEAD,
            "attention act×grad summed over attended-to tokens",
            location=ATTN,
        ),
        # A reduction of the pair DST (referenced, so a plan asking for both computes p·∇p once).
        "Σ_s attn.act_times_grad[t,s,h]",
        _sum_over_keys,
        (DstReference(ACT_TIMES_GRAD.dst.name, FORWARD),),
    ),
    V_OUT_DIRECT_GRAD,
    WRITE_TO_GRAD,
    Recipe(
        DerivedScalarType(
            "attn.write_to_final_residual_grad_per_token",
            (T, H),
            HEAD,
            "direct effect on g of each head's total write at a query token",
            location=ATTN,
        ),
        "(o[t,h] W_O[h])·g[t] = Σ_s attn.write_to_final_residual_grad[t,s,h]",
        _write_to_grad_per_token,
        lambda config: (MIXED, _through_w_o(config)),
    ),
    norm_recipe(
        "attn.layer_write_norm",
        ALT.RESID_DELTA_ATTN,
        "δa",
        "norm of the whole attention layer's write (incl. b_O)",
    ),
    proj_recipe(
        "attn.layer_write_to_final_residual_grad",
        ALT.RESID_DELTA_ATTN,
        "δa",
        "whole attention layer's write (incl. b_O) projected onto the direction g",
    ),
    pairs_view(
        RAW_DSTS[ALT.ATTN_QK_PROBS],
        "attn.qk_probs.pairs",
        "attention probabilities over causal (query, key) pairs",
    ),
    pairs_view(
        WRITE_NORM.dst, "attn.write_norm.pairs", "attn.write_norm over causal (query, key) pairs"
    ),
    pairs_view(
        ACT_TIMES_GRAD.dst,
        "attn.act_times_grad.pairs",
        "attn.act_times_grad over causal (query, key) pairs",
    ),
    pairs_view(
        WRITE_TO_GRAD.dst,
        "attn.write_to_final_residual_grad.pairs",
        "attn.write_to_final_residual_grad over causal (query, key) pairs",
    ),
)

FACTORIES = recipe_factories(RECIPES)
