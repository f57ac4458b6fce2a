"""The SAE catalogue: offline DSTs (from captured activations) and online ones (SAE spliced in).

Notation: ``x`` is the SAE's input at ``options.sae.location`` of layer ``L = options.sae.layer``
(``T×d_in``), ``z = enc(x)`` the latents (``T×A``), ``e = x − dec(z)`` the reconstruction
error, ``W_write`` the latents' write to the residual stream (``A×D``): ``W_dec`` for
residual-basis SAEs, ``W_dec W_out`` for ``mlp.post_act`` SAEs, and ``g`` the direction.

Layers: an SAE lives at one layer.  Every DST still has every layer (the contract asks for
``{0..Λ−1}``); at layers other than ``L`` the SAE has no latents and its error is 0 (the model
runs unchanged there), so those layers hold exact zeros and read nothing from the model.  Ask
for ``layers=[L]`` to get only the meaningful layer.

Offline vs online: offline DSTs chain onto the builtin raw twins by name (``mlp.post_act``,
``resid.delta_mlp``, …) and compute the SAE after the fact; online DSTs read the
``PluginLocation`` s the splice emits (:func:`online_locations`).  With the same input convention
they agree: offline ``sae.latents`` = online ``sae.online.latents``, and the offline BACKWARD
pass of ``sae.latents`` (``∇x W_decᵀ``) is exactly the gradient the splice gives the latents.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch
from scalarlens import (
    NOT_NEEDED,
    CausalDirectionIndexer,
    DeriveContext,
    DerivedScalarType,
    Dimension,
    DstConfig,
    DstReference,
    Intervention,
    LocationWithinLayer,
    NodeType,
    PassType,
    PluginLocation,
    RawScalarSource,
    ScalarDeriver,
    ScalarSource,
    StaticLayerIndexer,
    WeightLocationType,
)

# Not re-exported by ``scalarlens`` (yet); the contract documents it in ``scalarlens._model``.
from ._errors import SaeConfigError, SaeLoadError
from ._options import SaeOptions, options_from_params, sae_options
from ._sae import SparseAutoencoder, load_sae, random_sae, read_sae_config

if TYPE_CHECKING:
    from scalarlens import ModelAdapter

__all__ = [
    "DSTS",
    "FACTORIES",
    "PROVIDER",
    "example_configs",
    "make_interventions",
    "online_locations",
]

FORWARD, BACKWARD = PassType.FORWARD, PassType.BACKWARD
BOTH = (FORWARD, BACKWARD)
T, A = Dimension.TOKENS, Dimension.AUTOENCODER_LATENTS
D, F = Dimension.RESIDUAL_STREAM_CHANNELS, Dimension.MLP_ACTS
LATENT = NodeType.AUTOENCODER_LATENT
W_OUT = WeightLocationType.MLP_TO_RESIDUAL
PROVIDER = "sae"
Inputs = tuple[torch.Tensor | None, ...]
Kernel = Callable[[Inputs, int | None, DeriveContext], torch.Tensor]
Factory = Callable[[DstConfig], ScalarDeriver]

_WHERE = "(location follows options['sae']['location'])"


def _dst(
    name: str,
    shape: tuple[Dimension, ...],
    node_type: NodeType,
    description: str,
    *,
    passes: Sequence[PassType] = (FORWARD,),
    location: LocationWithinLayer | None = None,
) -> DerivedScalarType:
    return DerivedScalarType(
        name=name,
        shape=shape,
        node_type=node_type,
        location=location,
        pass_types=frozenset(passes),
        description=description,
    )


# --- the SAE at derive time ----------------------------------------------------------------


def model_width(opts: SaeOptions, ctx_or_model: DeriveContext | ModelAdapter) -> int:
    dims = ctx_or_model.dims
    return dims.d_mlp if opts.is_mlp_basis else dims.d_model


def resolve_sae(opts: SaeOptions, d_in: int, like: torch.Tensor | None = None) -> SparseAutoencoder:
    """The SAE the options name (cached), checked against the input width, cast to ``like``."""
    if opts.random_init is not None:
        sae = random_sae(opts.random_init.n_latents, d_in, opts.random_init.seed)
    else:
        assert opts.path is not None
        sae = load_sae(opts.path)
        if sae.d_in != d_in:
            raise SaeLoadError(
                f"SAE {sae.source} has d_in={sae.d_in}, but {opts.location} at layer "
                f"{opts.layer} has {d_in} channels; was it trained for another model or location?"
            )
    return sae if like is None else sae.cast(like)


def n_latents(opts: SaeOptions) -> int:
    """``A``, from the options or ``cfg.json`` (no weights are read): build-time metadata."""
    if opts.random_init is not None:
        return opts.random_init.n_latents
    assert opts.path is not None
    return int(read_sae_config(opts.path)["d_sae"])


def _sae_for(opts: SaeOptions, ctx: DeriveContext, like: torch.Tensor) -> SparseAutoencoder:
    d_in = model_width(opts, ctx) if opts.random_init is not None else like.shape[-1]
    return resolve_sae(opts, int(d_in), like)


def write_weights(opts: SaeOptions, ctx: DeriveContext, like: torch.Tensor) -> torch.Tensor:
    """``W_write`` (``A×D``): ``W_dec`` for residual inputs, ``W_dec W_out`` for MLP inputs."""
    sae = resolve_sae(opts, model_width(opts, ctx), like)
    if opts.is_mlp_basis:
        w_out = ctx.weight(W_OUT, opts.layer).to(dtype=like.dtype, device=like.device)
        return sae.W_dec @ w_out
    return sae.W_dec


def _need(tensor: torch.Tensor | None) -> torch.Tensor:
    assert tensor is not None, "an always-needed input was not provided"
    return tensor


# --- layer indexers ------------------------------------------------------------------------


@attrs.frozen
class SaeDirectionIndexer:
    """g for the SAE's layer iff the SAE's location strictly precedes g; else nothing.

    The core's causal rule, restricted to the one layer that has an SAE.  The kernel turns
    ``None`` into exact zeros, and the planner captures the gradient only where it is used.
    """

    sae_layer: int
    causal: CausalDirectionIndexer

    def source_layer(self, target: int | None, n_layers: int) -> Any:
        if target != self.sae_layer:
            return NOT_NEEDED
        return self.causal.source_layer(target, n_layers)

    def describe(self) -> str:
        return f"sae_layer({self.sae_layer}) {self.causal.describe()}"


def _at_sae_layer(opts: SaeOptions) -> StaticLayerIndexer:
    """Every layer reads layer L (only L is captured; other layers use it for the token count)."""
    return StaticLayerIndexer(opts.layer)


def _direction(opts: SaeOptions) -> ScalarSource:
    causal = CausalDirectionIndexer(opts.direction, opts.location_within_layer)
    return RawScalarSource(
        opts.direction.location, BACKWARD, SaeDirectionIndexer(opts.layer, causal)
    )


# --- online locations and the splice -------------------------------------------------------


def online_locations(opts: SaeOptions) -> tuple[Any, Any]:
    """The two capture points the splice emits: latents (``T×A``) and error (``T×d_in``)."""
    host = opts.alt
    params = opts.splice_params()
    latents = PluginLocation(
        name="sae.online.latents",
        provider=PROVIDER,
        host=host,
        shape=(T, A),
        node_type=LATENT,
        location_within_layer=host.location_within_layer,
        params=params,
    )
    error = PluginLocation(
        name="sae.online.error",
        provider=PROVIDER,
        host=host,
        shape=host.shape,
        node_type=host.node_type,
        location_within_layer=host.location_within_layer,
        params=params,
    )
    return latents, error


def make_interventions(params: Mapping[str, Any], model: ModelAdapter) -> list[Intervention]:
    """The ``sae`` intervention provider: splice the SAE in at its location and layer.

    The spliced value is ``dec(z) + e`` with ``z = emit(latents, enc(x))`` and
    ``e = emit(error, x − dec(enc(x)))`` from a *second* encode: numerically ``x`` (logits are
    unchanged), ``∂J/∂z = ∇x W_decᵀ`` and ``∂J/∂e = ∇x`` (the gradients one wants), and the
    gradient reaching ``x`` is still ``∇x`` (the error path carries ``∇x`` minus exactly what
    the latent path adds), so everything upstream is unchanged too.
    """
    opts = options_from_params(params)
    latents_loc, error_loc = online_locations(opts)
    sae = resolve_sae(opts, model_width(opts, model))  # load now: fail before the forward pass
    dims = model.dims
    if opts.layer >= dims.n_layers:
        raise SaeConfigError(
            f"options['sae']['layer']={opts.layer} is outside the model's {dims.n_layers} layers"
        )

    def splice(value: torch.Tensor, layer: int | None, emit: Any) -> torch.Tensor:
        cast = sae.cast(value)
        latents = emit(latents_loc, cast.encode(value))
        error = emit(error_loc, value - cast.decode(cast.encode(value)))
        spliced: torch.Tensor = cast.decode(latents) + error
        return spliced

    return [
        Intervention(
            location=opts.alt,
            fn=splice,
            layers=frozenset({opts.layer}),
            name=f"sae splice ({sae.source} at {opts.location}, layer {opts.layer})",
            emits=(latents_loc, error_loc),
        )
    ]


# --- kernels -------------------------------------------------------------------------------


def _latents_kernel(opts: SaeOptions, n: int) -> Kernel:
    """Offline latents: ``enc(x)`` (FORWARD), ``∇x W_decᵀ`` (BACKWARD; the splice's gradient)."""

    def kernel(inputs: Inputs, layer: int | None, ctx: DeriveContext) -> torch.Tensor:
        x = _need(inputs[0])  # x or ∇x at layer L
        if layer != opts.layer:
            return x.new_zeros((x.shape[0], n))
        sae = _sae_for(opts, ctx, x)
        if ctx.pass_type is FORWARD:
            return sae.encode(x)
        return x @ sae.W_dec.T

    return kernel


def _error_kernel(opts: SaeOptions) -> Kernel:
    """Offline error: ``x − dec(enc(x))`` (FORWARD), ``∇x`` (BACKWARD; ``∂x̂'/∂e = I``)."""

    def kernel(inputs: Inputs, layer: int | None, ctx: DeriveContext) -> torch.Tensor:
        x = _need(inputs[0])
        if layer != opts.layer:
            return torch.zeros_like(x)
        if ctx.pass_type is BACKWARD:
            return x
        sae = _sae_for(opts, ctx, x)
        return x - sae.decode(sae.encode(x))

    return kernel


def _online_kernel(opts: SaeOptions, n: int | None) -> Kernel:
    """A spliced location's capture (value or gradient) at L; zeros elsewhere."""

    def kernel(inputs: Inputs, layer: int | None, ctx: DeriveContext) -> torch.Tensor:
        x = _need(inputs[0])
        if layer != opts.layer:
            return x.new_zeros((x.shape[0], n)) if n is not None else torch.zeros_like(x)
        return x

    return kernel


def _write_kernel(opts: SaeOptions) -> Kernel:
    def kernel(inputs: Inputs, layer: int | None, ctx: DeriveContext) -> torch.Tensor:
        z = _need(inputs[0])
        if layer != opts.layer:
            return z.new_zeros((*z.shape, ctx.dims.d_model))
        return z.unsqueeze(-1) * write_weights(opts, ctx, z)

    return kernel


def _write_norm_kernel(opts: SaeOptions) -> Kernel:
    def kernel(inputs: Inputs, layer: int | None, ctx: DeriveContext) -> torch.Tensor:
        z = _need(inputs[0])
        if layer != opts.layer:
            return torch.zeros_like(z)
        norms: torch.Tensor = write_weights(opts, ctx, z).norm(dim=-1)
        return z * norms

    return kernel


def _act_times_grad_kernel(inputs: Inputs, layer: int | None, ctx: DeriveContext) -> torch.Tensor:
    return _need(inputs[0]) * _need(inputs[1])


def _write_to_grad_kernel(opts: SaeOptions) -> Kernel:
    def kernel(inputs: Inputs, layer: int | None, ctx: DeriveContext) -> torch.Tensor:
        z, g = _need(inputs[0]), inputs[1]
        if g is None:  # other layer, or the SAE does not precede g
            return torch.zeros_like(z)
        projected: torch.Tensor = g.to(z) @ write_weights(opts, ctx, z).T
        return projected.mul_(z)

    return kernel


# --- declarations ---------------------------------------------------------------------------


# --- recipes --------------------------------------------------------------------------------


@attrs.frozen
class SaeRecipe:
    """One DST: declaration, formula, and ``build(opts) -> (sources, kernel)``."""

    dst: DerivedScalarType
    formula: str
    build: Callable[[SaeOptions, int], tuple[tuple[ScalarSource, ...], Kernel]]
    basis: str | None = None  # "mlp" / "resid": DSTs whose shape fixes the SAE's input basis

    def factory(self) -> Factory:
        def build(config: DstConfig) -> ScalarDeriver:
            opts = sae_options(config)
            self._check_basis(opts)
            n = n_latents(opts)
            sources, kernel = self.build(opts, n)
            return ScalarDeriver(
                dst=self.dst,
                config=config,
                sub_scalar_sources=sources,
                tensor_calculate_derived_scalar_fn=kernel,
                derivable_pass_types=self.dst.pass_types,
                dimension_sizes={A: n},
            )

        build.__name__ = "build_" + self.dst.name.replace(".", "_")
        build.__doc__ = f"{self.dst.name} = {self.formula}\n\n{self.dst.description}"
        return build

    def _check_basis(self, opts: SaeOptions) -> None:
        if self.basis is None or (self.basis == "mlp") == opts.is_mlp_basis:
            return
        other = self.dst.name.replace(f"_{self.basis}", "_resid" if self.basis == "mlp" else "_mlp")
        raise SaeConfigError(
            f"{self.dst.name} is the error of an SAE on "
            f"{'mlp.post_act' if self.basis == 'mlp' else 'resid.delta_mlp / resid.delta_attn'}"
            f", but options['sae']['location'] is {opts.location!r}; use {other} instead"
        )


def _offline_input(opts: SaeOptions, pass_type: PassType | None) -> DstReference:
    # The builtin raw twin, by name: full activation, biases included (same as the splice).
    return DstReference(opts.location, pass_type, _at_sae_layer(opts))


def _derived_recipes(
    prefix: str, latents_name: str, kind: str
) -> tuple[SaeRecipe, ...]:
    """write / write_norm / act_times_grad / write_to_final_residual_grad over some latents."""

    def z(pass_type: PassType = FORWARD) -> DstReference:
        return DstReference(latents_name, pass_type)

    return (
        SaeRecipe(
            _dst(f"{prefix}.write", (T, A, D), LATENT,
                 f"each {kind} SAE latent's write to the residual stream {_WHERE}"),
            "z[t,j]·W_write[j,:]",
            lambda opts, n: ((z(),), _write_kernel(opts)),
        ),
        SaeRecipe(
            _dst(f"{prefix}.write_norm", (T, A), LATENT,
                 f"norm of each {kind} SAE latent's write (z ≥ 0) {_WHERE}"),
            "z[t,j]·‖W_write[j,:]‖₂",
            lambda opts, n: ((z(),), _write_norm_kernel(opts)),
        ),
        SaeRecipe(
            _dst(f"{prefix}.act_times_grad", (T, A), LATENT,
                 f"{kind} SAE latent × its gradient: first-order attribution to the objective"),
            "z[t,j]·∇z[t,j]"
            + (" with ∇z = ∇x W_decᵀ (gradient through the decoder, from the captured ∇x)"
               if kind == "offline" else " (∇z captured from the spliced model)"),
            lambda opts, n: ((z(FORWARD), z(BACKWARD)), _act_times_grad_kernel),
        ),
        SaeRecipe(
            _dst(f"{prefix}.write_to_final_residual_grad", (T, A), LATENT,
                 f"direct effect of each {kind} SAE latent's write on the direction g"),
            "z[t,j]·(W_write[j,:]·g[t]), 0 where the SAE does not strictly precede g",
            lambda opts, n: ((z(), _direction(opts)), _write_to_grad_kernel(opts)),
        ),
    )


def _online_raw(opts: SaeOptions, which: int) -> RawScalarSource:
    return RawScalarSource(online_locations(opts)[which], None, _at_sae_layer(opts))


RECIPES: tuple[SaeRecipe, ...] = (
    # offline
    SaeRecipe(
        _dst("sae.latents", (T, A), LATENT,
             f"SAE latents computed from the captured input {_WHERE}; BACKWARD: ∇x W_decᵀ",
             passes=BOTH),
        "relu((x − b_dec) W_enc + b_enc); BACKWARD ∇z = ∇x W_decᵀ",
        lambda opts, n: ((_offline_input(opts, None),), _latents_kernel(opts, n)),
    ),
    SaeRecipe(
        _dst("sae.reconstruction_error_mlp", (T, F), NodeType.MLP_NEURON,
             "SAE reconstruction error of an mlp.post_act SAE, per neuron; BACKWARD: ∇x",
             passes=BOTH, location=LocationWithinLayer.MLP),
        "x − (z W_dec + b_dec); BACKWARD ∇e = ∇x",
        lambda opts, n: ((_offline_input(opts, None),), _error_kernel(opts)),
        basis="mlp",
    ),
    SaeRecipe(
        _dst("sae.reconstruction_error_resid", (T, D), NodeType.RESIDUAL_STREAM_CHANNEL,
             f"SAE reconstruction error of a resid.delta_* SAE {_WHERE}; BACKWARD: ∇x",
             passes=BOTH),
        "x − (z W_dec + b_dec); BACKWARD ∇e = ∇x",
        lambda opts, n: ((_offline_input(opts, None),), _error_kernel(opts)),
        basis="resid",
    ),
    *_derived_recipes("sae", "sae.latents", "offline"),
    # online
    SaeRecipe(
        _dst("sae.online.latents", (T, A), LATENT,
             f"latents of the SAE spliced into the forward pass {_WHERE}; BACKWARD: real ∇z",
             passes=BOTH),
        "emit(enc(x)) at the splice (captured value / gradient)",
        lambda opts, n: ((_online_raw(opts, 0),), _online_kernel(opts, n)),
    ),
    SaeRecipe(
        _dst("sae.online.error_mlp", (T, F), NodeType.MLP_NEURON,
             "error term of an mlp.post_act SAE spliced into the forward pass; BACKWARD: ∇e",
             passes=BOTH, location=LocationWithinLayer.MLP),
        "emit(x − dec(enc(x))) at the splice (captured value / gradient)",
        lambda opts, n: ((_online_raw(opts, 1),), _online_kernel(opts, None)),
        basis="mlp",
    ),
    SaeRecipe(
        _dst("sae.online.error_resid", (T, D), NodeType.RESIDUAL_STREAM_CHANNEL,
             f"error term of a resid.delta_* SAE spliced into the forward pass {_WHERE}",
             passes=BOTH),
        "emit(x − dec(enc(x))) at the splice (captured value / gradient)",
        lambda opts, n: ((_online_raw(opts, 1),), _online_kernel(opts, None)),
        basis="resid",
    ),
    *_derived_recipes("sae.online", "sae.online.latents", "online"),
)

DSTS: tuple[DerivedScalarType, ...] = tuple(r.dst for r in RECIPES)
FACTORIES: dict[DerivedScalarType, Factory] = {r.dst: r.factory() for r in RECIPES}


def example_configs(n_latents: int = 8, seed: int = 0, layer: int = 0) -> dict[str, DstConfig]:
    """A config for every DST that works on any model: a random SAE at ``layer``.

    ``mlp.post_act`` for all but the ``*_resid`` error DSTs, which use ``resid.delta_attn``.
    """
    out = {}
    for recipe in RECIPES:
        location = "resid.delta_attn" if recipe.basis == "resid" else "mlp.post_act"
        out[recipe.dst.name] = DstConfig(
            options={
                "sae": {
                    "random_init": {"n_latents": n_latents, "seed": seed},
                    "location": location,
                    "layer": layer,
                }
            }
        )
    return out

