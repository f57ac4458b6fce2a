"""Residual-stream family (reference §2.2): the stream entering each layer, norms, projections.

Norms and projections onto g are one recipe each, applied to a location; the MLP/attention
*layer* writes (``δm``, ``δa``) reuse the same two recipes and are declared in their families.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scalarlens import (
    PREVIOUS_LAYER,
    DeriveContext,
    DerivedScalarType,
    Inputs,
    LayerIndex,
    NodeType,
    PassType,
    RawScalarSource,
    Recipe,
    need,
    project_onto_direction,
    raw_source,
    recipe_factories,
    row_norm,
)

from ._shared import ALT, FIRST_LAYER_ONLY, ONE, D, Loc, T

if TYPE_CHECKING:
    import torch

__all__ = ["FACTORIES", "RECIPES", "norm_recipe", "proj_recipe"]


def _norm_kernel(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    (x,) = inputs
    return row_norm(need(x))


def _layer_dst(name: str, location: ALT, description: str) -> DerivedScalarType:
    """A ``T×1`` per-layer scalar read at ``location``."""
    return DerivedScalarType(
        name,
        (T, ONE),
        NodeType.LAYER,
        description,
        location=location.location_within_layer,
        has_no_layers=location.has_no_layers,
    )


def norm_recipe(name: str, location: ALT, symbol: str, description: str) -> Recipe:
    """``‖X[t]‖₂`` of a ``T×D`` raw location, as ``T×1``."""
    dst = _layer_dst(name, location, description)
    return Recipe(dst, f"‖{symbol}[t]‖₂", _norm_kernel, (raw_source(location),))


def proj_recipe(name: str, location: ALT, symbol: str, description: str) -> Recipe:
    """``X[t]·g[t]`` of a ``T×D`` raw location, as ``T×1``, causally zeroed."""
    dst = _layer_dst(name, location, description)
    return Recipe(
        dst,
        f"{symbol}[t]·g[t] (0 where not strictly before g)",
        project_onto_direction,
        (raw_source(location),),
        direction=True,
    )


def _previous_kernel(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    previous, embedding = inputs
    return need(embedding if previous is None else previous)


PREVIOUS_LAYER_RESID = Recipe(
    dst=DerivedScalarType(
        "resid.prev_layer_post_mlp",
        (T, D),
        NodeType.RESIDUAL_STREAM_CHANNEL,
        "residual stream entering the layer: previous layer's resid.post_mlp, x_emb at layer 0",
        location=Loc.END_OF_PREV_LAYER,
        pass_types=(PassType.FORWARD, PassType.BACKWARD),
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
        "resid.post_emb.proj_to_final_residual_grad",
        ALT.RESID_POST_EMBEDDING,
        "x_emb",
        "embedding projected onto the direction g (embedding always precedes g)",
    ),
    proj_recipe(
        "resid.post_attn.proj_to_final_residual_grad",
        ALT.RESID_POST_ATTN,
        "xa",
        "resid.post_attn projected onto the direction g",
    ),
    proj_recipe(
        "resid.post_mlp.proj_to_final_residual_grad",
        ALT.RESID_POST_MLP,
        "xm",
        "resid.post_mlp projected onto the direction g (0 at g's own location)",
    ),
)

FACTORIES = recipe_factories(RECIPES)
