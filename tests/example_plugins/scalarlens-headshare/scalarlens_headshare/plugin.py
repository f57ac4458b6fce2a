"""Each attention head's share of its layer's write, chained onto a builtin DST by name.

The source is a ``DstReference``: the registry resolves ``attn.write_norm_per_token`` from
whichever plugin provides it when the deriver is built, so this plugin imports nothing from
the builtins.
"""

from __future__ import annotations

import torch
from scalarlens import (
    DeriveContext,
    DerivedScalarType,
    Dimension,
    DstReference,
    Factory,
    Inputs,
    LayerIndex,
    LocationWithinLayer,
    NodeType,
    Recipe,
    hookimpl,
    need,
    recipe_factories,
)

SCALARLENS_PLUGIN_API = 1

WRITE_SHARE = DerivedScalarType(
    "headshare.write_share",
    (Dimension.TOKENS, Dimension.ATTN_HEADS),
    NodeType.ATTENTION_HEAD,
    "each head's share of the summed write norms of its layer's heads, per query token",
    location=LocationWithinLayer.ATTN,
)


def write_share(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    norms = need(inputs[0], "per-head write norms")  # T×H, all ≥ 0
    total = norms.sum(dim=-1, keepdim=True)
    # A token where no head writes anything has no shares: 0/tiny = 0 rather than 0/0 = NaN.
    return norms / total.clamp_min(torch.finfo(norms.dtype).tiny)


RECIPES = (
    Recipe(
        WRITE_SHARE,
        "w[t,h] / Σ_h' w[t,h']  (w = attn.write_norm_per_token)",
        write_share,
        (DstReference("attn.write_norm_per_token"),),
    ),
)


@hookimpl
def scalarlens_derivers() -> dict[DerivedScalarType, Factory]:
    return recipe_factories(RECIPES)
