"""Edges into and out of SAE latents, chained onto ``scalarlens-sae`` by DST name only.

The SAE plugin owns the SAE (loading, encoder, decoder); this module owns nodes and edges.  They
meet through two DSTs of the SAE plugin, read by name with the same ``DstConfig`` (its
``options["sae"]`` names the SAE, ``options["circuits"]["node"]`` the node):

* ``sae.online.write`` (``T×A×D``): each latent's write ``z[t,j]·W_write[j]``;
* ``sae.input_jacobian_mlp`` / ``_resid`` (``T×A×d_in``): each latent's read vector in the
  SAE's input basis, ``∂z[t,j]/∂x[t,:]`` (zero for an inactive latent).

So the encoder is never needed as a function here: the first-order change of every latent
along an upstream write ``w_U`` is ``∂z/∂x · J_x(r)·w_U``, where ``J_x(r)·w_U`` — how the SAE's
input moves — is a forward-mode JVP of the model's own layer through reconstitution (the MLP
for ``mlp.post_act``/``resid.delta_mlp`` SAEs, attention with every path attached for
``resid.delta_attn``; a residual-stream SAE reads ``w_U`` itself, the sublayers in between held
fixed as for every edge).  From ``options["sae"]`` this module reads only the two documented
fields ``location`` and ``layer``, to decide causality.

* ``edge.sae_out_attribution`` (node = downstream N): ``z[t,j]·(W_write[j]·R[t])``.
* ``edge.sae_in_activation`` (node = upstream U): ``∂z[t,j]/∂x[t]·(J_x(r)·w_U)[t]``.
* ``edge.sae_in_attribution``: the same times ``stopgrad(∇z[t,j])`` (the spliced latents'
  real gradient), i.e. ``J_f(r)·w_U`` for ``f = z·stopgrad(∇z)``.

All are exact zeros at layers other than the SAE's and where the writer does not precede the
reader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scalarlens import (
    NO_LAYERS,
    ActivationLocationType,
    DeriveContext,
    DerivedScalarType,
    Dimension,
    DstConfig,
    DstReference,
    Inputs,
    LayerIndex,
    NodeType,
    PassType,
    RawScalarSource,
    Recipe,
    StaticLayerIndexer,
    WeightLocationType,
    recipe_factories,
)
from scalarlens.exceptions import ConfigError

from ._edges import _detach, _layer_input, _mlp_reading, _model, _need, _node, _read_stage
from ._options import read_stage

if TYPE_CHECKING:
    import torch

__all__ = ["SAE_EDGE_EXAMPLES", "SAE_EDGE_FACTORIES", "SAE_EDGE_RECIPES"]

ALT, W = ActivationLocationType, WeightLocationType
FWD, BWD = PassType.FORWARD, PassType.BACKWARD
T, A = Dimension.TOKENS, Dimension.AUTOENCODER_LATENTS
LATENT = NodeType.AUTOENCODER_LATENT
_ATTN_SITES = ("resid.delta_attn", "resid.post_attn")  # written at stage 2L+1, else 2L+2


def _site(config: DstConfig, dst: str) -> tuple[str, int]:
    """``(location, layer)`` from ``options["sae"]`` (the SAE plugin validates the rest)."""
    sae = config.options.get("sae")
    if not isinstance(sae, dict) or not isinstance(sae.get("layer"), int):
        raise ConfigError(
            f"{dst} is about the latents of an SAE: add options['sae'] (scalarlens-sae: path or "
            "random_init, location, layer) beside options['circuits']"
        )
    return str(sae.get("location")), int(sae["layer"])


def _write_stage(location: str, layer: int) -> int:
    """When a latent's write is in the residual stream (as ``NodeIndex.stage``)."""
    return 2 * layer + (1 if location in _ATTN_SITES else 2)


def _input_read_stage(location: str, layer: int, dims: Any) -> int:
    """The last write stage the SAE's input depends on."""
    if location == "resid.delta_attn":
        return 2 * layer
    if location in ("mlp.post_act", "resid.delta_mlp"):
        return read_stage(dims, "mlp", layer)
    return _write_stage(location, layer)  # a residual-stream SAE reads the residual itself


def _at(config: DstConfig, dst: str) -> StaticLayerIndexer:
    return StaticLayerIndexer(_site(config, dst)[1])


def _post_factor(
    scale: torch.Tensor | None, gain: WeightLocationType, layer: int, ctx: DeriveContext
) -> Any:
    if not ctx.dims.post_norms or scale is None:
        return 1.0
    return ctx.weight(gain, layer)[None, :] / scale


# --- many → one: latents into node N --------------------------------------------------------


def _out_sources(config: DstConfig) -> tuple[Any, ...]:
    return (
        DstReference("sae.online.write", FWD),
        RawScalarSource(ALT.MLP_POST_NORM_SCALE, FWD),
        DstReference("edge.node_attribution_grad", FWD, NO_LAYERS),
    )


def _sae_out(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    import torch

    write, r = _need(inputs[0], "sae.online.write"), _need(inputs[2], "R")
    location, sae_layer = _site(ctx.config, ctx.dst.name)
    node = _node(ctx, write.shape[0])
    if layer != sae_layer or _write_stage(location, sae_layer) > _read_stage(node, ctx.dims):
        return write.new_zeros(write.shape[:2])
    if location == "mlp.post_act":  # the write passes the MLP's post-norm (σ frozen)
        r = r * _post_factor(inputs[1], W.MLP_POST_NORM_GAIN, sae_layer, ctx)
    return torch.einsum("tad,td->ta", write, r.to(write.dtype))


# --- one → many: node U into every latent ---------------------------------------------------


def _in_sources(weighted: bool) -> Any:
    def sources(config: DstConfig) -> tuple[Any, ...]:
        dst = "edge.sae_in_" + ("attribution" if weighted else "activation")
        location, _ = _site(config, dst)
        at = _at(config, dst)
        basis = "mlp" if location == "mlp.post_act" else "resid"
        grad = (DstReference("sae.online.latents", BWD, at),) if weighted else ()
        return (
            RawScalarSource(ALT.RESID_POST_ATTN, FWD, at),
            RawScalarSource(
                ALT.RESID_POST_MLP, FWD, StaticLayerIndexer(max(at.layer_index - 1, 0))
            ),
            RawScalarSource(ALT.RESID_POST_EMBEDDING, FWD, NO_LAYERS),
            RawScalarSource(ALT.MLP_POST_NORM_SCALE, FWD, at),
            RawScalarSource(ALT.ATTN_POST_NORM_SCALE, FWD, at),
            DstReference(f"sae.input_jacobian_{basis}", FWD, at),
            *grad,
            DstReference("edge.node_write", FWD, NO_LAYERS),
        )

    return sources


def _input_tangent(
    inputs: Inputs, location: str, sae_layer: int, write: torch.Tensor, ctx: DeriveContext
) -> torch.Tensor:
    """``J_x(r)·w_U``: how the SAE's input moves along U's write (other sublayers fixed)."""
    import torch
    from scalarlens import attention_on_path, reconstitute_jvp

    if location not in ("mlp.post_act", "resid.delta_mlp", "resid.delta_attn"):
        return write  # a residual-stream SAE reads the write itself
    model, detach = _model(ctx), _detach(ctx)
    layer_input = _layer_input(inputs[1] if sae_layer > 0 else None, inputs[2])
    if location == "resid.delta_attn":
        factor = _post_factor(inputs[4], W.ATTN_POST_NORM_GAIN, sae_layer, ctx)
        w_o = ctx.weight(W.ATTN_TO_RESIDUAL, sae_layer)

        def attn(r: torch.Tensor) -> torch.Tensor:
            mixed = attention_on_path(model, r, sae_layer, None, detach_scale=detach).mixed
            out: torch.Tensor = torch.einsum("thv,hvd->td", mixed, w_o.to(r.dtype)) * factor
            return out

        return reconstitute_jvp(attn, layer_input, write)[1]
    resid = _mlp_reading(inputs[0], layer_input, ctx)
    if location == "mlp.post_act":

        def mlp(r: torch.Tensor) -> torch.Tensor:
            post: torch.Tensor = model.reconstitute_mlp(r, sae_layer, detach_scale=detach)[1]
            return post

        return reconstitute_jvp(mlp, resid, write)[1]
    factor = _post_factor(inputs[3], W.MLP_POST_NORM_GAIN, sae_layer, ctx)
    w_out = ctx.weight(W.MLP_TO_RESIDUAL, sae_layer)

    def delta(r: torch.Tensor) -> torch.Tensor:
        post = model.reconstitute_mlp(r, sae_layer, detach_scale=detach)[1]
        out: torch.Tensor = (post @ w_out.to(r.dtype)) * factor
        return out

    return reconstitute_jvp(delta, resid, write)[1]


def _in_kernel(weighted: bool) -> Any:
    def kernel(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
        import torch

        jac, write = _need(inputs[5], "∂z/∂x"), _need(inputs[-1], "edge.node_write")
        location, sae_layer = _site(ctx.config, ctx.dst.name)
        upstream = _node(ctx, write.shape[0])
        shape = jac.shape[:2]
        if layer != sae_layer or upstream.stage > _input_read_stage(location, layer, ctx.dims):
            return jac.new_zeros(shape)
        tangent = _input_tangent(inputs, location, sae_layer, write, ctx)
        change = torch.einsum("tai,ti->ta", jac, tangent.to(jac.dtype))
        if weighted:
            change = change * _need(inputs[6], "∇z").to(change.dtype)
        return torch.nan_to_num(change, nan=0.0)

    kernel.__name__ = f"sae_in_{'attribution' if weighted else 'activation'}"
    return kernel


# --- the catalogue --------------------------------------------------------------------------


def _dst(name: str, text: str) -> DerivedScalarType:
    return DerivedScalarType(name, (T, A), LATENT, text)


SAE_EDGE_RECIPES: tuple[Recipe, ...] = (
    Recipe(
        _dst(
            "edge.sae_out_attribution",
            "edge from every SAE latent into node N (zero where the SAE does not precede N)",
        ),
        "z[t,j]·(W_write[j]·R[t]) = sae.online.write[t,j]·edge.node_attribution_grad[t]",
        _sae_out,
        _out_sources,
    ),
    Recipe(
        _dst(
            "edge.sae_in_activation",
            "first-order change of every SAE latent along node U's write",
        ),
        "∂z[t,j]/∂x[t]·(J_x(r)·w_U)[t] (sae.input_jacobian_* · forward-mode JVP of the layer)",
        _in_kernel(False),
        _in_sources(False),
    ),
    Recipe(
        _dst(
            "edge.sae_in_attribution",
            "edge from node U into every SAE latent (zero where U does not precede the SAE)",
        ),
        "J_f(r)·w_U, f = z·stopgrad(∇z): edge.sae_in_activation · ∇z (spliced latents)",
        _in_kernel(True),
        _in_sources(True),
    ),
)

SAE_EDGE_FACTORIES = recipe_factories(SAE_EDGE_RECIPES)

_EXAMPLE_SAE = {"random_init": {"n_latents": 8, "seed": 0}, "location": "mlp.post_act", "layer": 0}
SAE_EDGE_EXAMPLES = {
    recipe.dst.name: DstConfig(
        options={
            "circuits": {"node": {"kind": "neuron", "layer": 0, "token": -1, "index": 0}},
            "sae": _EXAMPLE_SAE,
        }
    )
    for recipe in SAE_EDGE_RECIPES
}
