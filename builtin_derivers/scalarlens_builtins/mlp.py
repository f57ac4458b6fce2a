"""MLP family (reference §2.3): per-neuron writes, their norms, act×grad and direct effects.

Notation: ``a`` = ``mlp.post_act`` (``T×F``), ``W_out`` (``F×D``), ``b_out`` (``D``), g the
direction.  Projections and norms are taken *before* expanding to ``T×F×D``: the write norm is
``a·‖W_out[n]‖`` and the direct effect ``a·(g W_outᵀ)``, so only ``mlp.write`` itself ever
materialises the per-neuron write vectors.
"""

from __future__ import annotations

import torch
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

from ._shared import ALT, BACKWARD, D, F, Loc, T
from .residual import norm_recipe, proj_recipe

__all__ = ["FACTORIES", "RECIPES"]

W_OUT = WeightLocationType.MLP_TO_RESIDUAL
NEURON, MLP = NodeType.MLP_NEURON, Loc.MLP
ACT = raw_source(ALT.MLP_POST_ACT)
ACT_GRAD = raw_source(ALT.MLP_POST_ACT, BACKWARD)


def _delta_from_act(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    return need(inputs[0]) @ ctx.weight(W_OUT, layer)


def _write(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    return need(inputs[0]).unsqueeze(-1) * ctx.weight(W_OUT, layer)


def _write_norm(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    row_norms: torch.Tensor = ctx.weight(W_OUT, layer).norm(dim=-1)
    return need(inputs[0]) * row_norms


def _write_to_grad(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    act, g = need(inputs[0]), inputs[1]
    if g is None:  # the neuron does not precede the direction
        return torch.zeros_like(act)
    # Project g first (T×D · D×F), then scale in place: one T×F allocation, never T×F×D.
    return (g @ ctx.weight(W_OUT, layer).T).mul_(act)


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        DerivedScalarType(
            "mlp.resid_delta_from_post_act",
            (T, D),
            NodeType.RESIDUAL_STREAM_CHANNEL,
            "MLP write to the residual stream without b_out",
            location=MLP,
        ),
        "a[t,:] W_out (= resid.delta_mlp − b_out)",
        _delta_from_act,
        (ACT,),
    ),
    Recipe(
        DerivedScalarType(
            "mlp.write",
            (T, F, D),
            NEURON,
            "each neuron's write vector to the residual stream",
            location=MLP,
        ),
        "a[t,n]·W_out[n,:]",
        _write,
        (ACT,),
    ),
    Recipe(
        DerivedScalarType(
            "mlp.write_norm",
            (T, F),
            NEURON,
            "signed norm of each neuron's write (negative when a < 0)",
            location=MLP,
        ),
        "a[t,n]·‖W_out[n,:]‖₂",
        _write_norm,
        (ACT,),
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
        "a[t,n]·(W_out[n,:]·g[t]), 0 where the layer does not precede g",
        _write_to_grad,
        (ACT,),
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
