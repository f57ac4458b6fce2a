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

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from scalarlens import (
    NOT_NEEDED,
    CausalDirectionIndexer,
    DeriveContext,
    DerivedScalarType,
    Dimension,
    DstConfig,
    DstReference,
    Factory,
    Inputs,
    Intervention,
    LayerIndex,
    LocationWithinLayer,
    NodeType,
    PassType,
    PluginLocation,
    PromptCombo,
    RawScalarSource,
    Recipe,
    ScalarDeriver,
    ScalarSource,
    StaticLayerIndexer,
    WeightLocationType,
    act_times_grad,
    need,
    recipe_factories,
)

from ._errors import SaeConfigError, SaeLoadError
from ._options import SaeOptions, options_from_params, sae_options
from ._sae import SparseAutoencoder, load_sae, random_sae, read_sae_config

if TYPE_CHECKING:  # kernels import torch when they run: the catalogue loads without it
    import torch
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

_WHERE = "(location follows options['sae']['location'])"


# --- the SAE at derive time ----------------------------------------------------------------


def model_width(opts: SaeOptions, ctx_or_model: DeriveContext | ModelAdapter) -> int:
    dims = ctx_or_model.dims
    return dims.d_mlp if opts.is_mlp_basis else dims.d_model


def resolve_sae(opts: SaeOptions, d_in: int, like: torch.Tensor | None = None) -> SparseAutoencoder:
    """The SAE the options name (cached), checked against the input width, cast to ``like``.

    ``k`` and ``fold_decoder_norm`` give the inference-time variant of the loaded SAE.
    """
    if opts.random_init is not None:
        sae = random_sae(opts.random_init.n_latents, d_in, opts.random_init.seed)
    else:
        path = opts.resolved_path
        assert path is not None
        sae = load_sae(path)
        if sae.transcoder:
            raise SaeConfigError(
                f"{sae.source} is a transcoder (it writes {sae.d_out} channels elsewhere); use "
                "the transcoder.* DSTs with options['transcoder'], not options['sae']"
            )
        if sae.d_in != d_in:
            raise SaeLoadError(
                f"SAE {sae.source} has d_in={sae.d_in}, but {opts.location} at layer "
                f"{opts.layer} has {d_in} channels; was it trained for another model or location?"
            )
        sae = _variant(opts, sae)
    return sae if like is None else sae.cast(like)


_VARIANTS: dict[tuple[int, float | None, bool], tuple[SparseAutoencoder, SparseAutoencoder]] = {}


def _variant(opts: SaeOptions, sae: SparseAutoencoder) -> SparseAutoencoder:
    if opts.k is None and not opts.fold_decoder_norm:
        return sae
    key = (id(sae), opts.k, opts.fold_decoder_norm)
    cached = _VARIANTS.get(key)
    if cached is not None and cached[0] is sae:
        return cached[1]
    variant = sae
    if opts.k is not None:
        try:
            variant = variant.with_k(opts.k)
        except SaeLoadError as exc:
            raise SaeConfigError(f"options['sae']['k']: {exc}") from None
    if opts.fold_decoder_norm:
        variant = variant.fold_decoder_norm()
    _VARIANTS[key] = (sae, variant)
    return variant


def n_latents(opts: SaeOptions) -> int:
    """``A``, from the options or ``cfg.json`` (no weights are read): build-time metadata."""
    if opts.random_init is not None:
        return opts.random_init.n_latents
    path = opts.resolved_path
    assert path is not None
    return int(read_sae_config(path)["d_sae"])


def per_token_scale(opts: SaeOptions) -> bool:
    """Whether the SAE's decoder has a per-token scale (run-time input normalisation)."""
    if opts.random_init is not None:
        return False
    path = opts.resolved_path
    assert path is not None
    return bool(read_sae_config(path)["run_time_normalize"] != "none")


def _sae_for(opts: SaeOptions, ctx: DeriveContext, like: torch.Tensor) -> SparseAutoencoder:
    d_in = model_width(opts, ctx) if opts.random_init is not None else like.shape[-1]
    return resolve_sae(opts, int(d_in), like)


def _scaled(
    opts: SaeOptions, ctx: DeriveContext, z: torch.Tensor, inputs: Inputs, at: int
) -> torch.Tensor:
    """``z`` times the decoder's per-token scale (from ``x`` = ``inputs[at]``) when it has one."""
    if len(inputs) <= at:
        return z
    x = need(inputs[at])
    scale, _ = resolve_sae(opts, int(x.shape[-1]), x).output_map(x)
    return z if scale is None else z * scale


def write_weights(opts: SaeOptions, ctx: DeriveContext, like: torch.Tensor) -> torch.Tensor:
    """``W_write`` (``A×D``): ``W_dec`` for residual inputs, ``W_dec W_out`` for MLP inputs."""
    sae = resolve_sae(opts, model_width(opts, ctx), like)
    if opts.is_mlp_basis:
        w_out = ctx.weight(W_OUT, opts.layer).to(dtype=like.dtype, device=like.device)
        return sae.W_dec @ w_out
    return sae.W_dec


# --- layer indexers ------------------------------------------------------------------------


@attrs.frozen
class SaeDirectionIndexer:
    """g for the SAE's layer iff the SAE's location strictly precedes g; else nothing.

    The core's causal rule, restricted to the one layer that has an SAE.  The kernel turns
    ``None`` into exact zeros, and the planner captures the gradient only where it is used.
    """

    sae_layer: int
    causal: CausalDirectionIndexer

    def source_layer(self, target: LayerIndex, n_layers: int) -> Any:
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


def online_locations(opts: SaeOptions) -> tuple[PluginLocation, PluginLocation]:
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

    def splice(value: torch.Tensor, layer: LayerIndex, emit: Any) -> torch.Tensor:
        cast = sae.cast(value)
        if cast.architecture == "batchtopk" and cast.threshold is None and value.shape[0] > 1:
            raise SaeConfigError(
                f"{sae.source}: a BatchTopK SAE selecting by count (no saved threshold) ranks "
                "all tokens encoded together, so spliced into a padded batch of "
                f"{value.shape[0]} prompts it would depend on padding; derive one prompt at a "
                "time, or use the SAE's saved threshold (omit options['sae']['k'])"
            )
        latents = emit(latents_loc, cast.encode(value))
        error = emit(error_loc, value - cast.decode(cast.encode(value), value))
        spliced: torch.Tensor = cast.decode(latents, value) + error
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


# --- sources: functions of the config, since the SAE's location and layer are options --------


Sources = Callable[[DstConfig], tuple[ScalarSource, ...]]


def _sae_input(config: DstConfig) -> tuple[ScalarSource, ...]:
    """``x`` (or ``∇x``): the builtin raw twin, by name — full activation, biases included.

    Plus the forward ``x`` when the decoder has a per-token scale (run-time normalisation).
    """
    opts = sae_options(config)
    return (DstReference(opts.location, None, _at_sae_layer(opts)), *_scale_input(opts))


def _scale_input(opts: SaeOptions) -> tuple[ScalarSource, ...]:
    if not per_token_scale(opts):
        return ()
    return (DstReference(opts.location, FORWARD, _at_sae_layer(opts)),)


def _latents_only(latents: DstReference) -> Sources:
    def sources(config: DstConfig) -> tuple[ScalarSource, ...]:
        return (latents, *_scale_input(sae_options(config)))

    return sources


def _online_latents(config: DstConfig) -> tuple[ScalarSource, ...]:
    opts = sae_options(config)
    return (RawScalarSource(online_locations(opts)[0], None, _at_sae_layer(opts)),)


def _online_error(config: DstConfig) -> tuple[ScalarSource, ...]:
    opts = sae_options(config)
    return (RawScalarSource(online_locations(opts)[1], None, _at_sae_layer(opts)),)


def _latents_and_direction(latents: str) -> Sources:
    """``z`` (the DST ``latents``, by name) and the direction g at the SAE's layer."""
    z = DstReference(latents, FORWARD)

    def sources(config: DstConfig) -> tuple[ScalarSource, ...]:
        opts = sae_options(config)
        return (z, _direction(opts), *_scale_input(opts))

    return sources


# --- kernels: each reads the SAE options from ctx.config; layers other than L are zeros -----


def _latents(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    """Offline latents: ``enc(x)`` (FORWARD), ``∇x W_decᵀ`` (BACKWARD; the splice's gradient)."""
    opts = sae_options(ctx.config)
    x = need(inputs[0])  # x or ∇x at layer L
    if layer != opts.layer:
        return x.new_zeros((x.shape[0], n_latents(opts)))
    sae = _sae_for(opts, ctx, x)
    if ctx.pass_type is FORWARD:
        return sae.encode(x)
    return _scaled(opts, ctx, x @ sae.W_dec.T, inputs, 1)


def _error(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    """Offline error: ``x − dec(enc(x))`` (FORWARD), ``∇x`` (BACKWARD; ``∂x̂'/∂e = I``)."""
    import torch

    opts = sae_options(ctx.config)
    x = need(inputs[0])
    if layer != opts.layer:
        return torch.zeros_like(x)
    if ctx.pass_type is BACKWARD:
        return x
    sae = _sae_for(opts, ctx, x)
    return x - sae.decode(sae.encode(x), x)


def _online_latents_capture(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    """The spliced latents' capture (value or gradient) at L; zeros (``T×A``) elsewhere."""
    opts = sae_options(ctx.config)
    x = need(inputs[0])
    if layer != opts.layer:
        return x.new_zeros((x.shape[0], n_latents(opts)))
    return x


def _online_error_capture(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    """The spliced error's capture (value or gradient) at L; zeros elsewhere."""
    import torch

    x = need(inputs[0])
    if layer != sae_options(ctx.config).layer:
        return torch.zeros_like(x)
    return x


def _write(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    opts = sae_options(ctx.config)
    z = need(inputs[0])
    if layer != opts.layer:
        return z.new_zeros((*z.shape, ctx.dims.d_model))
    return _scaled(opts, ctx, z, inputs, 1).unsqueeze(-1) * write_weights(opts, ctx, z)


def _write_norm(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    import torch

    opts = sae_options(ctx.config)
    z = need(inputs[0])
    if layer != opts.layer:
        return torch.zeros_like(z)
    norms: torch.Tensor = write_weights(opts, ctx, z).norm(dim=-1)
    return _scaled(opts, ctx, z, inputs, 1) * norms


def _write_to_grad(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    import torch

    z, g = need(inputs[0]), inputs[1]
    if g is None:  # other layer, or the SAE does not precede g
        return torch.zeros_like(z)
    opts = sae_options(ctx.config)
    projected: torch.Tensor = g.to(z) @ write_weights(opts, ctx, z).T
    return projected.mul_(_scaled(opts, ctx, z, inputs, 2))


# --- recipes --------------------------------------------------------------------------------


@attrs.frozen
class SaeRecipe(Recipe):
    """A :class:`scalarlens.Recipe` over ``options["sae"]``, plus what only SAEs need.

    The factory (name, formula docstring) and the deriver are core's; the SAE adds two checks
    at build time: the options must parse, and ``A`` (the latent count, from the options or
    ``cfg.json``) is recorded as the deriver's ``AUTOENCODER_LATENTS`` size.  ``basis``
    (``"mlp"`` / ``"resid"``) marks error DSTs whose shape fixes the SAE's input basis.
    """

    basis: str | None = None

    def build(self, config: DstConfig) -> ScalarDeriver:
        opts = sae_options(config)
        self._check_basis(opts)
        n = n_latents(opts)
        return attrs.evolve(Recipe.build(self, config), dimension_sizes={A: n})

    def _check_basis(self, opts: SaeOptions) -> None:
        if self.basis is None or (self.basis == "mlp") == opts.is_mlp_basis:
            return
        other = self.dst.name.replace(f"_{self.basis}", "_resid" if self.basis == "mlp" else "_mlp")
        where = "mlp.post_act" if self.basis == "mlp" else "a residual-basis location"
        raise SaeConfigError(
            f"{self.dst.name} is for an SAE on {where}, but options['sae']['location'] is "
            f"{opts.location!r}; use {other} instead"
        )


LATENTS = DstReference("sae.latents", FORWARD)
LATENTS_GRAD = DstReference("sae.latents", BACKWARD)
LATENTS_DIFF = DstReference("sae.latents", FORWARD, prompt=PromptCombo.MAIN_MINUS_BASELINE)
ONLINE_LATENTS = DstReference("sae.online.latents", FORWARD)
ONLINE_LATENTS_GRAD = DstReference("sae.online.latents", BACKWARD)

RECIPES: tuple[SaeRecipe, ...] = (
    # --- offline: the SAE computed from the captured input
    SaeRecipe(
        DerivedScalarType(
            "sae.latents",
            (T, A),
            LATENT,
            f"SAE latents computed from the captured input {_WHERE}; BACKWARD: ∇x W_decᵀ",
            pass_types=BOTH,
        ),
        "relu((x − b_dec) W_enc + b_enc); BACKWARD ∇z = ∇x W_decᵀ",
        _latents,
        _sae_input,
    ),
    SaeRecipe(
        DerivedScalarType(
            "sae.reconstruction_error_mlp",
            (T, F),
            NodeType.MLP_NEURON,
            "SAE reconstruction error of an mlp.post_act SAE, per neuron; BACKWARD: ∇x",
            location=LocationWithinLayer.MLP,
            pass_types=BOTH,
        ),
        "x − (z W_dec + b_dec); BACKWARD ∇e = ∇x",
        _error,
        _sae_input,
        basis="mlp",
    ),
    SaeRecipe(
        DerivedScalarType(
            "sae.reconstruction_error_resid",
            (T, D),
            NodeType.RESIDUAL_STREAM_CHANNEL,
            f"SAE reconstruction error of a resid.delta_* SAE {_WHERE}; BACKWARD: ∇x",
            pass_types=BOTH,
        ),
        "x − (z W_dec + b_dec); BACKWARD ∇e = ∇x",
        _error,
        _sae_input,
        basis="resid",
    ),
    SaeRecipe(
        DerivedScalarType(
            "sae.write",
            (T, A, D),
            LATENT,
            f"each offline SAE latent's write to the residual stream {_WHERE}",
        ),
        "z[t,j]·W_write[j,:]",
        _write,
        _latents_only(LATENTS),
    ),
    SaeRecipe(
        DerivedScalarType(
            "sae.write_norm",
            (T, A),
            LATENT,
            f"norm of each offline SAE latent's write (z ≥ 0) {_WHERE}",
        ),
        "z[t,j]·‖W_write[j,:]‖₂",
        _write_norm,
        _latents_only(LATENTS),
    ),
    SaeRecipe(
        DerivedScalarType(
            "sae.act_times_grad",
            (T, A),
            LATENT,
            "offline SAE latent × its gradient: first-order attribution to the objective",
        ),
        "z[t,j]·∇z[t,j] with ∇z = ∇x W_decᵀ (gradient through the decoder, from the captured ∇x)",
        act_times_grad,
        (LATENTS, LATENTS_GRAD),
    ),
    SaeRecipe(
        DerivedScalarType(
            "sae.attribution_patching",
            (T, A),
            LATENT,
            "first-order estimate of patching each offline SAE latent from a baseline prompt "
            "(derive with baseline=): objective(main) − objective(latent at its baseline value)",
        ),
        "(z[main] − z[baseline])[t,j]·∇z[t,j] with ∇z = ∇x W_decᵀ on the main prompt",
        act_times_grad,
        (LATENTS_DIFF, LATENTS_GRAD),
    ),
    SaeRecipe(
        DerivedScalarType(
            "sae.write_to_final_residual_grad",
            (T, A),
            LATENT,
            "direct effect of each offline SAE latent's write on the direction g",
        ),
        "z[t,j]·(W_write[j,:]·g[t]), 0 where the SAE does not strictly precede g",
        _write_to_grad,
        _latents_and_direction("sae.latents"),
    ),
    # --- online: the SAE spliced into the forward pass
    SaeRecipe(
        DerivedScalarType(
            "sae.online.latents",
            (T, A),
            LATENT,
            f"latents of the SAE spliced into the forward pass {_WHERE}; BACKWARD: real ∇z",
            pass_types=BOTH,
        ),
        "emit(enc(x)) at the splice (captured value / gradient)",
        _online_latents_capture,
        _online_latents,
    ),
    SaeRecipe(
        DerivedScalarType(
            "sae.online.error_mlp",
            (T, F),
            NodeType.MLP_NEURON,
            "error term of an mlp.post_act SAE spliced into the forward pass; BACKWARD: ∇e",
            location=LocationWithinLayer.MLP,
            pass_types=BOTH,
        ),
        "emit(x − dec(enc(x))) at the splice (captured value / gradient)",
        _online_error_capture,
        _online_error,
        basis="mlp",
    ),
    SaeRecipe(
        DerivedScalarType(
            "sae.online.error_resid",
            (T, D),
            NodeType.RESIDUAL_STREAM_CHANNEL,
            f"error term of a resid.delta_* SAE spliced into the forward pass {_WHERE}",
            pass_types=BOTH,
        ),
        "emit(x − dec(enc(x))) at the splice (captured value / gradient)",
        _online_error_capture,
        _online_error,
        basis="resid",
    ),
    SaeRecipe(
        DerivedScalarType(
            "sae.online.write",
            (T, A, D),
            LATENT,
            f"each online SAE latent's write to the residual stream {_WHERE}",
        ),
        "z[t,j]·W_write[j,:]",
        _write,
        _latents_only(ONLINE_LATENTS),
    ),
    SaeRecipe(
        DerivedScalarType(
            "sae.online.write_norm",
            (T, A),
            LATENT,
            f"norm of each online SAE latent's write (z ≥ 0) {_WHERE}",
        ),
        "z[t,j]·‖W_write[j,:]‖₂",
        _write_norm,
        _latents_only(ONLINE_LATENTS),
    ),
    SaeRecipe(
        DerivedScalarType(
            "sae.online.act_times_grad",
            (T, A),
            LATENT,
            "online SAE latent × its gradient: first-order attribution to the objective",
        ),
        "z[t,j]·∇z[t,j] (∇z captured from the spliced model)",
        act_times_grad,
        (ONLINE_LATENTS, ONLINE_LATENTS_GRAD),
    ),
    SaeRecipe(
        DerivedScalarType(
            "sae.online.write_to_final_residual_grad",
            (T, A),
            LATENT,
            "direct effect of each online SAE latent's write on the direction g",
        ),
        "z[t,j]·(W_write[j,:]·g[t]), 0 where the SAE does not strictly precede g",
        _write_to_grad,
        _latents_and_direction("sae.online.latents"),
    ),
)

DSTS: tuple[DerivedScalarType, ...] = tuple(r.dst for r in RECIPES)
FACTORIES: dict[DerivedScalarType, Factory] = recipe_factories(RECIPES)


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
