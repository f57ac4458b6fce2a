"""Attention entropy: how spread out each head's attention is at each query token."""

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

ATTENTION_ENTROPY = DerivedScalarType(
    "entropy.attention",
    (Dimension.TOKENS, Dimension.ATTN_HEADS),
    NodeType.ATTENTION_HEAD,
    "entropy (nats) of each head's attention pattern at a query token",
    location=LocationWithinLayer.ATTN,
)


def attention_entropy(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    probs = need(inputs[0], "attention probabilities")  # T×S×H
    # xlogy(0, 0) is 0: masked (future) keys have p = 0 and add nothing, where p·log p would
    # give 0·(−inf) = NaN.
    return -torch.special.xlogy(probs, probs).sum(dim=1)


RECIPES = (
    Recipe(
        ATTENTION_ENTROPY,
        "−Σ_s p[t,s,h]·log p[t,s,h]  (p = attn.qk_probs, 0·log 0 = 0)",
        attention_entropy,
        (raw_source(ActivationLocationType.ATTN_QK_PROBS),),
    ),
)


@hookimpl
def scalarlens_derivers() -> dict[DerivedScalarType, Factory]:
    return recipe_factories(RECIPES)
