"""A logit lens of the objective: how far each layer's residual stream already prefers the target.

The kernel reads the target and distractor from ``ctx.objective``, so the DST takes no plugin
options: ``--target fox --distractor king`` (or ``target=``/``distractor=``) is all it needs.
"""

from __future__ import annotations

import torch
from scalarlens import (
    ActivationLocationType,
    DeriveContext,
    DerivedScalarType,
    Dimension,
    Factory,
    Inputs,
    LayerIndex,
    LocationWithinLayer,
    NodeType,
    Recipe,
    hookimpl,
    need,
    raw_source,
    recipe_factories,
)

SCALARLENS_PLUGIN_API = 1

LOGIT_DIFF = DerivedScalarType(
    "lens.logit_diff",
    (Dimension.TOKENS, Dimension.SINGLETON),
    NodeType.LAYER,
    "logit lens: logit[target] − logit[distractor] read off each layer's residual stream",
    location=LocationWithinLayer.RESID_POST_MLP,
    # The kernel reads ctx.objective: derive() and the CLI then insist on target/distractor
    # before the model runs, instead of the kernel failing halfway through.
    needs_objective=True,
)


def logit_diff(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    objective = ctx.objective
    if objective.target is None or objective.distractor is None:
        raise ValueError(
            f"lens.logit_diff needs a logit-difference objective (target= and distractor=), "
            f"got a {objective.kind!r} objective"
        )
    logits = ctx.unembed(ctx.final_norm(need(inputs[0], "residual stream")))  # T×V
    return (logits[:, objective.target] - logits[:, objective.distractor]).unsqueeze(-1)


RECIPES = (
    Recipe(
        LOGIT_DIFF,
        "(U·LN_f(resid.post_mlp[l][t]))[target] − (U·LN_f(resid.post_mlp[l][t]))[distractor]",
        logit_diff,
        (raw_source(ActivationLocationType.RESID_POST_MLP),),
    ),
)


@hookimpl
def scalarlens_derivers() -> dict[DerivedScalarType, Factory]:
    return recipe_factories(RECIPES)
