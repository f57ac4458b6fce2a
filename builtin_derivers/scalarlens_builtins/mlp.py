"""MLP family (reference §2.3): per-neuron writes, their norms, act×grad and direct effects.

Notation: ``a`` = ``mlp.post_act`` (``T×F``), ``W_out`` (``F×D``), ``b_out`` (``D``), g the
direction.  On models with an MLP post-norm (``γ``, scale ``σ`` frozen) each write is further
multiplied by ``γ/σ[t]`` (see ``_shared.post_norm``); elsewhere that factor is 1 and skipped.
Projections and norms are taken *before* expanding to ``T×F×D``: the write norm is
``a·‖W_out[n]‖`` and the direct effect ``a·(g W_outᵀ)``, so only ``mlp.write`` itself ever
materialises the per-neuron write vectors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scalarlens import (
    DeriveContext,
    DerivedScalarType,
    Inputs,
    LayerIndex,
    NodeType,
    Recipe,
    WeightLocationType,
    act_times_grad,
    need,
    raw_source,
    recipe_factories,
)

from ._shared import ALT, BACKWARD, D, F, Loc, T, nonzero_rows, post_norm
from .residual import norm_recipe, proj_recipe

if TYPE_CHECKING:
    import torch

__all__ = ["FACTORIES", "RECIPES"]

W_OUT = WeightLocationType.MLP_TO_RESIDUAL
NEURON, MLP = NodeType.MLP_NEURON, Loc.MLP
ACT = raw_source(ALT.MLP_POST_ACT)
ACT_GRAD = raw_source(ALT.MLP_POST_ACT, BACKWARD)
POST_SCALE = raw_source(ALT.MLP_POST_NORM_SCALE)
GAIN = WeightLocationType.MLP_POST_NORM_GAIN


def _delta_from_act(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    delta = need(inputs[0]) @ ctx.weight(W_OUT, layer)
    post = post_norm(inputs[1], GAIN, layer, ctx)
    return delta if post is None else delta * post[0] / post[1]


def _write(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    w_out, post = ctx.weight(W_OUT, layer), post_norm(inputs[1], GAIN, layer, ctx)
    if post is None:
        return need(inputs[0]).unsqueeze(-1) * w_out
    return (need(inputs[0]) / post[1]).unsqueeze(-1) * (w_out * post[0])


def _write_norm(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    w_out, post = ctx.weight(W_OUT, layer), post_norm(inputs[1], GAIN, layer, ctx)
    if post is None:
        return need(inputs[0]) * w_out.norm(dim=-1)
    return need(inputs[0]) / post[1] * (w_out * post[0]).norm(dim=-1)


def _write_to_grad(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    import torch

    act, g = need(inputs[0]), inputs[2]
    if g is None:  # the neuron does not precede the direction
        return torch.zeros_like(act)
    post = post_norm(inputs[1], GAIN, layer, ctx)
    if post is not None:  # pull g back through the post-norm, its scale frozen
        g = g * post[0] / post[1]
    # Project g first (T×D · D×F), then scale in place: one T×F allocation, never T×F×D.
    # A logit objective's g is zero but at the positions it reads: project those rows only.
    rows = nonzero_rows(g)
    if rows is None:
        return (g @ ctx.weight(W_OUT, layer).T).mul_(act)
    out = torch.zeros_like(act)
    out[rows] = (g[rows] @ ctx.weight(W_OUT, layer).T).mul_(act[rows])
    return out


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        DerivedScalarType(
            "mlp.resid_delta_from_post_act",
            (T, D),
            NodeType.RESIDUAL_STREAM_CHANNEL,
            "MLP write to the residual stream without b_out",
            location=MLP,
        ),
        "a[t,:] W_out (= resid.delta_mlp − b_out; through the post-norm where there is one)",
        _delta_from_act,
        (ACT, POST_SCALE),
    ),
    Recipe(
        DerivedScalarType(
            "mlp.write",
            (T, F, D),
            NEURON,
            "each neuron's write vector to the residual stream",
            location=MLP,
        ),
        "a[t,n]·W_out[n,:] (·γ/σ[t] through a post-norm)",
        _write,
        (ACT, POST_SCALE),
    ),
    Recipe(
        DerivedScalarType(
            "mlp.write_norm",
            (T, F),
            NEURON,
            "signed norm of each neuron's write (negative when a < 0)",
            location=MLP,
        ),
        "a[t,n]·‖W_out[n,:]‖₂ (‖W_out[n,:]·γ‖₂/σ[t] through a post-norm)",
        _write_norm,
        (ACT, POST_SCALE),
    ),
    Recipe(
        DerivedScalarType(
            "mlp.act_times_grad",
            (T, F),
            NEURON,
            "activation × gradient: first-order attribution of each neuron to the objective",
            location=MLP,
        ),
        "a[t,n]·∇a[t,n]",
        act_times_grad,
        (ACT, ACT_GRAD),
    ),
    Recipe(
        DerivedScalarType(
            "mlp.write_to_final_residual_grad",
            (T, F),
            NEURON,
            "direct effect of each neuron's write on the direction g",
            location=MLP,
        ),
        "a[t,n]·(W_out[n,:]·g[t]), 0 where the layer does not precede g (g·γ/σ[t] through a "
        "post-norm)",
        _write_to_grad,
        (ACT, POST_SCALE),
        direction=True,
    ),
    norm_recipe(
        "mlp.layer_write_norm",
        ALT.RESID_DELTA_MLP,
        "δm",
        "norm of the whole MLP layer's write (incl. b_out)",
    ),
    proj_recipe(
        "mlp.layer_write_to_final_residual_grad",
        ALT.RESID_DELTA_MLP,
        "δm",
        "whole MLP layer's write (incl. b_out) projected onto the direction g",
    ),
)

FACTORIES = recipe_factories(RECIPES)
