"""Residual-stream family (reference §2.2): the stream entering each layer, norms, projections.

Norms and projections onto g are one recipe each, applied to a location; the MLP/attention
*layer* writes (``δm``, ``δa``) reuse the same two recipes and are declared in their families.
"""

from __future__ import annotations

import torch
from scalarlens import PREVIOUS_LAYER, DeriveContext, NodeType, PassType, RawScalarSource

from ._recipes import (
    ALT,
    FIRST_LAYER_ONLY,
    ONE,
    D,
    Inputs,
    Loc,
    Recipe,
    T,
    declare,
    factories,
    need,
    raw,
    row_norm,
)

__all__ = ["FACTORIES", "RECIPES", "norm_recipe", "proj_recipe"]


def _norm_kernel(inputs: Inputs, layer: int | None, ctx: DeriveContext) -> torch.Tensor:
    (x,) = inputs
    return row_norm(need(x))


def _proj_kernel(inputs: Inputs, layer: int | None, ctx: DeriveContext) -> torch.Tensor:
    x, g = need(inputs[0]), inputs[1]
    if g is None:  # the component does not precede the direction
        return x.new_zeros((x.shape[0], 1))
    return (x * g).sum(dim=-1, keepdim=True)


def norm_recipe(name: str, location: ALT, symbol: str, description: str) -> Recipe:
    """``‖X[t]‖₂`` of a ``T×D`` raw location, as ``T×1``."""
    dst = declare(
        name, (T, ONE), NodeType.LAYER, location.location_within_layer, description,
        has_no_layers=location.has_no_layers,
    )
    return Recipe(dst, f"‖{symbol}[t]‖₂", _norm_kernel, (raw(location),))


def proj_recipe(name: str, location: ALT, symbol: str, description: str) -> Recipe:
    """``X[t]·g[t]`` of a ``T×D`` raw location, as ``T×1``, causally zeroed."""
    dst = declare(
        name, (T, ONE), NodeType.LAYER, location.location_within_layer, description,
        has_no_layers=location.has_no_layers,
    )
    return Recipe(
        dst, f"{symbol}[t]·g[t] (0 where not strictly before g)", _proj_kernel,
        (raw(location),), direction=True,
    )


def _previous_kernel(inputs: Inputs, layer: int | None, ctx: DeriveContext) -> torch.Tensor:
    previous, embedding = inputs
    return need(embedding if previous is None else previous)


PREVIOUS_LAYER_RESID = Recipe(
    dst=declare(
        "resid.prev_layer_post_mlp", (T, D), NodeType.RESIDUAL_STREAM_CHANNEL,
        Loc.END_OF_PREV_LAYER,
        "residual stream entering the layer: previous layer's resid.post_mlp, x_emb at layer 0",
        passes=(PassType.FORWARD, PassType.BACKWARD),
    ),
    formula="r_l = xm_{l−1} for l > 0, x_emb for l = 0 (BACKWARD: ∇r_l, same sources' gradients)",
    kernel=_previous_kernel,
    # Same-pass sources (pass_type=None) give the gradient when BACKWARD is requested; the
    # embedding is read only by layer 0.
    sources=(
        RawScalarSource(ALT.RESID_POST_MLP, None, PREVIOUS_LAYER),
        RawScalarSource(ALT.RESID_POST_EMBEDDING, None, FIRST_LAYER_ONLY),
    ),
)

RECIPES: tuple[Recipe, ...] = (
    PREVIOUS_LAYER_RESID,
    norm_recipe("resid.post_emb.norm", ALT.RESID_POST_EMBEDDING, "x_emb", "‖x_emb‖ per token"),
    norm_recipe("resid.post_attn.norm", ALT.RESID_POST_ATTN, "xa", "‖resid.post_attn‖ per token"),
    norm_recipe("resid.post_mlp.norm", ALT.RESID_POST_MLP, "xm", "‖resid.post_mlp‖ per token"),
    proj_recipe(
        "resid.post_emb.proj_to_final_residual_grad", ALT.RESID_POST_EMBEDDING, "x_emb",
        "embedding projected onto the direction g (embedding always precedes g)",
    ),
    proj_recipe(
        "resid.post_attn.proj_to_final_residual_grad", ALT.RESID_POST_ATTN, "xa",
        "resid.post_attn projected onto the direction g",
    ),
    proj_recipe(
        "resid.post_mlp.proj_to_final_residual_grad", ALT.RESID_POST_MLP, "xm",
        "resid.post_mlp projected onto the direction g (0 at g's own location)",
    ),
)

FACTORIES = factories(RECIPES)
