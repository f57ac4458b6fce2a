"""Transcoder DSTs: a (cross-layer) transcoder spliced in place of the MLPs, with error terms.

Notation: at source layer ``s`` the latents ``z_s = enc_s(x_s)`` (``x_s`` the MLP input, see
``input`` below); at target layer ``t`` the MLP output ``y_t`` is replaced by

    ŷ_t = Σ_{s ≤ t} z_s W_dec[s→t] + b_dec[t],       e_t = y_t − ŷ'_t

where ``ŷ'`` is computed from a *second* encode, so the spliced value ``ŷ_t + e_t`` equals
``y_t`` (logits and every upstream gradient unchanged) while ``∂J/∂z_s = Σ_t ∇y_t W_dec[s→t]ᵀ``
and ``∂J/∂e_t = ∇y_t`` are real gradients.  Latents and errors are emitted as plugin locations
(``transcoder.latents`` at each source layer, ``transcoder.error`` at each target layer), so
the circuits plugin can address transcoder features and error nodes by DST name and layer.

``input``: ``mlp.input`` (default) is the MLP's normalised input — the model's pre-MLP norm
(``dims.norm_kind`` with the model's gain, bias and epsilon) applied to ``resid.post_attn`` —
what circuit-tracer's ``mlp.hook_in`` / TransformerLens' ``ln2.hook_normalized`` hold;
``resid.post_attn`` is the residual stream before that norm (``hook_resid_mid``).  The output
is always ``resid.delta_mlp`` (the MLP's write, after any post-norm).  Parallel-residual models
(NeoX) are refused: their MLP does not read ``resid.post_attn``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from scalarlens import (
    NOT_NEEDED,
    ActivationLocationType,
    CausalDirectionIndexer,
    DeriveContext,
    DerivedScalarType,
    Dimension,
    Direction,
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
    RawScalarSource,
    Recipe,
    ScalarDeriver,
    ScalarSource,
    WeightLocationType,
    act_times_grad,
    need,
    precedes,
    recipe_factories,
)

from ._errors import SaeConfigError, SaeLoadError
from ._options import _check_release_field, _is_int
from ._transcoder import (
    Transcoder,
    load_transcoder,
    random_transcoder,
    transcoder_layers,
    transcoder_n_latents,
)

if TYPE_CHECKING:
    import torch
    from scalarlens import ModelAdapter

__all__ = [
    "TRANSCODER_DSTS",
    "TRANSCODER_FACTORIES",
    "TRANSCODER_PROVIDER",
    "TranscoderOptions",
    "make_transcoder_interventions",
    "transcoder_example_configs",
    "transcoder_locations",
    "transcoder_options",
]

NAMESPACE = TRANSCODER_PROVIDER = "transcoder"
ALT = ActivationLocationType
FORWARD, BACKWARD = PassType.FORWARD, PassType.BACKWARD
BOTH = (FORWARD, BACKWARD)
T, A = Dimension.TOKENS, Dimension.AUTOENCODER_LATENTS
D, ONE = Dimension.RESIDUAL_STREAM_CHANNELS, Dimension.SINGLETON
LATENT = NodeType.AUTOENCODER_LATENT
MLP = LocationWithinLayer.MLP
INPUTS = ("mlp.input", "resid.post_attn")


# --- options ---------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class RandomTranscoder:
    """A deterministic random transcoder over every layer (tests, examples, conformance)."""

    n_latents: int
    seed: int = 0
    cross_layer: bool = True

    def __attrs_post_init__(self) -> None:
        if not _is_int(self.n_latents) or self.n_latents <= 0:
            raise ValueError(
                f"random_init.n_latents must be a positive integer, got {self.n_latents!r}"
            )
        if not _is_int(self.seed):
            raise ValueError(f"random_init.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.cross_layer, bool):
            raise ValueError(
                f"random_init.cross_layer must be true or false, got {self.cross_layer!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"n_latents": self.n_latents, "seed": self.seed, "cross_layer": self.cross_layer}


def _to_random(value: Any) -> RandomTranscoder | None:
    if value is None or isinstance(value, RandomTranscoder):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(
            f"random_init must be a mapping {{n_latents, seed, cross_layer}}, got {value!r}"
        )
    unknown = sorted(set(value) - {"n_latents", "seed", "cross_layer"})
    if unknown:
        raise ValueError(
            f"random_init: unknown field(s) {unknown}; valid: ['cross_layer', 'n_latents', 'seed']"
        )
    if "n_latents" not in value:
        raise ValueError("random_init.n_latents is required (latents per layer)")
    return RandomTranscoder(**value)


def _check_input(_: object, __: attrs.Attribute[Any], value: Any) -> None:
    if value not in INPUTS:
        raise ValueError(f"input must be one of {list(INPUTS)}, got {value!r}")


def _check_layer(_: object, __: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not _is_int(value) or value < 0):
        raise ValueError(f"layer must be a non-negative integer, got {value!r}")


@attrs.frozen(kw_only=True)
class TranscoderOptions:
    """Schema of ``DstConfig.options["transcoder"]``.

    * ``path`` — a transcoder directory (SAELens transcoder, circuit-tracer ``layer_{i}``
      files, or a circuit-tracer CLT); or ``random_init`` —
      ``{"n_latents": A, "seed": 0, "cross_layer": true}`` (every layer of the model); or
      ``release`` + ``sae_id`` (+ ``releases``), as for SAEs.  Exactly one.
    * ``layer`` — the layer a single SAELens transcoder replaces (other formats know theirs).
    * ``input`` — ``mlp.input`` (default, the normalised MLP input) or ``resid.post_attn``.
    """

    path: str | None = attrs.field(default=None, validator=_check_release_field)
    random_init: RandomTranscoder | None = attrs.field(default=None, converter=_to_random)
    release: str | None = attrs.field(default=None, validator=_check_release_field)
    sae_id: str | None = attrs.field(default=None, validator=_check_release_field)
    releases: str | None = attrs.field(default=None, validator=_check_release_field)
    layer: int | None = attrs.field(default=None, validator=_check_layer)
    input: str = attrs.field(default="mlp.input", validator=_check_input)
    direction: Direction = attrs.field(factory=Direction)

    def __attrs_post_init__(self) -> None:
        given = [n for n in ("path", "random_init", "release") if getattr(self, n) is not None]
        if len(given) != 1:
            got = f"got {' and '.join(given)}" if given else "got neither"
            raise ValueError(
                "give exactly one of path (a transcoder directory), random_init "
                f"({{'n_latents': A}}) or release + sae_id; {got}"
            )
        if (self.release is None) != (self.sae_id is None):
            raise ValueError("release and sae_id go together")

    @property
    def resolved_path(self) -> str | None:
        if self.release is not None:
            from ._release import resolve_release

            assert self.sae_id is not None
            return str(resolve_release(self.releases, self.release, self.sae_id))
        if self.path is None:
            return None
        from pathlib import Path

        return str(Path(self.path).expanduser().resolve())

    def layers(self) -> frozenset[int] | None:
        """Source layers (``None``: every layer of the model, for ``random_init``)."""
        path = self.resolved_path
        if path is None:
            return None
        return frozenset(transcoder_layers(path, self.layer))

    def n_latents(self) -> int:
        if self.random_init is not None:
            return self.random_init.n_latents
        path = self.resolved_path
        assert path is not None
        return transcoder_n_latents(path)

    def splice_params(self) -> dict[str, Any]:
        source: dict[str, Any] = (
            {"random_init": self.random_init.to_dict()}
            if self.random_init is not None
            else {"path": self.resolved_path}
        )
        layer = {} if self.layer is None else {"layer": self.layer}
        return {**source, **layer, "input": self.input}


def transcoder_options(config: DstConfig) -> TranscoderOptions:
    """Validate ``config.options["transcoder"]``; errors are ``SaeConfigError`` naming the field."""
    if NAMESPACE not in config.options:
        raise SaeConfigError(
            "transcoder DSTs need DstConfig(options={'transcoder': {'path': <transcoder "
            "directory> (or 'random_init': {'n_latents': A}, or 'release' + 'sae_id'), "
            "'input': 'mlp.input' | 'resid.post_attn'}}); options['transcoder'] is missing"
        )
    raw = config.options[NAMESPACE]
    if isinstance(raw, Mapping) and "direction" in raw:
        raise SaeConfigError(
            "options['transcoder']['direction'] is not a transcoder option: set "
            "DstConfig(direction=...)"
        )
    try:
        options = config.plugin_options(NAMESPACE, TranscoderOptions)
    except SaeConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise SaeConfigError(f"options['transcoder']: {exc}") from exc
    return attrs.evolve(options, direction=config.direction)


# --- the transcoder at derive time -----------------------------------------------------------


def resolve_transcoder(opts: TranscoderOptions, model: Any) -> Transcoder:
    """The transcoder the options name, checked against the model's widths and layers."""
    dims = model.dims
    if opts.random_init is not None:
        r = opts.random_init
        return random_transcoder(
            r.n_latents, dims.d_model, dims.n_layers, r.seed, cross_layer=r.cross_layer
        )
    path = opts.resolved_path
    assert path is not None
    transcoder = load_transcoder(path, opts.layer)
    for what, width in (("input", transcoder.d_in), ("output", transcoder.d_out)):
        if width != dims.d_model:
            where = opts.input if what == "input" else "resid.delta_mlp"
            raise SaeLoadError(
                f"transcoder {transcoder.source} has {what} width {width}, but {where} of "
                f"{model.name if hasattr(model, 'name') else 'the model'} has {dims.d_model} "
                "channels (d_model); was it trained for another model?"
            )
    beyond = [layer for layer in transcoder.targets if layer >= dims.n_layers]
    if beyond:
        raise SaeLoadError(
            f"transcoder {transcoder.source} replaces layer(s) {beyond}, but the model has "
            f"{dims.n_layers} layers"
        )
    return transcoder


# --- online locations and the splice -------------------------------------------------------


def transcoder_locations(opts: TranscoderOptions) -> tuple[PluginLocation, PluginLocation]:
    """Latents (``T×A``, at each source layer) and error (``T×D``, at each target layer)."""
    params = opts.splice_params()
    latents = PluginLocation(
        name="transcoder.latents",
        provider=TRANSCODER_PROVIDER,
        host=ALT.RESID_POST_ATTN,
        shape=(T, A),
        node_type=LATENT,
        location_within_layer=MLP,
        params=params,
    )
    error = PluginLocation(
        name="transcoder.error",
        provider=TRANSCODER_PROVIDER,
        host=ALT.RESID_DELTA_MLP,
        shape=(T, D),
        node_type=NodeType.RESIDUAL_STREAM_CHANNEL,
        location_within_layer=MLP,
        params=params,
    )
    return latents, error


def mlp_input_norm(model: Any, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The model's pre-MLP norm of ``x`` (``dims.norm_kind``, effective gain, bias, epsilon)."""
    dims = model.dims
    W = WeightLocationType
    gain = model.weight(W.LAYER_NORM_GAIN_PRE_MLP, layer).to(x)
    if dims.norm_kind == "layernorm":
        x = x - x.mean(dim=-1, keepdim=True)
    out: torch.Tensor = x / (x.pow(2).mean(dim=-1, keepdim=True) + dims.norm_eps).sqrt() * gain
    if dims.norm_kind == "layernorm":
        out = out + model.weight(W.LAYER_NORM_BIAS_PRE_MLP, layer).to(x)
    return out


def make_transcoder_interventions(
    params: Mapping[str, Any], model: ModelAdapter
) -> list[Intervention]:
    """The ``transcoder`` provider: encode at ``resid.post_attn``, replace ``resid.delta_mlp``.

    Two interventions per forward pass share a stash (it lives as long as the interventions,
    one derive call): the first (at each source layer's ``resid.post_attn``, value unchanged)
    emits ``z_s`` and keeps a second encode ``z'_s``; the second (at each target layer's
    ``resid.delta_mlp``) returns ``ŷ_t(z) + e_t`` with ``e_t = emit(y_t − ŷ_t(z'))``.  With
    ``memory="low"`` a recomputed layer ``t`` re-encodes its own source and reads the earlier
    layers' latents from the stash, which still holds the first forward's tensors (the graph
    non-reentrant checkpointing keeps), so cross-layer gradients are the default mode's.
    """
    try:
        opts = TranscoderOptions(**dict(params))
    except (ValueError, TypeError) as exc:
        raise SaeConfigError(f"transcoder splice params {dict(params)}: {exc}") from exc
    if model.dims.parallel_residual:
        raise SaeConfigError(
            f"transcoders on {model.name}: the model has a parallel residual (its MLP reads the "
            "layer input, not resid.post_attn), which the transcoder splice does not support"
        )
    transcoder = resolve_transcoder(opts, model)
    latents_loc, error_loc = transcoder_locations(opts)
    stash: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode(value: torch.Tensor, layer: LayerIndex, emit: Any) -> torch.Tensor:
        assert layer is not None
        tc = transcoder.cast(value)
        x = mlp_input_norm(model, layer, value) if opts.input == "mlp.input" else value
        stash[layer] = (emit(latents_loc, tc.encode(layer, x)), tc.encode(layer, x))
        return value

    def replace(value: torch.Tensor, layer: LayerIndex, emit: Any) -> torch.Tensor:
        assert layer is not None
        tc = transcoder.cast(value)
        sources = sorted(s for s, t in transcoder.decoders if t == layer)
        missing = [s for s in sources if s not in stash]
        if missing:
            raise SaeConfigError(
                f"transcoder splice: layer {layer}'s MLP output needs latents of layer(s) "
                f"{missing}, which were not encoded in this forward pass; does the model call "
                "resid.post_attn before resid.delta_mlp in every layer?"
            )
        z = {s: stash[s][0] for s in sources}
        z_again = {s: stash[s][1] for s in sources}
        error = emit(error_loc, value - tc.reconstruct(layer, z_again))
        spliced: torch.Tensor = tc.reconstruct(layer, z) + error
        return spliced

    name = f"transcoder splice ({transcoder.source})"
    return [
        Intervention(
            location=ALT.RESID_POST_ATTN,
            fn=encode,
            layers=frozenset(transcoder.layers),
            name=f"{name}: encode",
            emits=(latents_loc,),
        ),
        Intervention(
            location=ALT.RESID_DELTA_MLP,
            fn=replace,
            layers=frozenset(transcoder.targets),
            name=f"{name}: replace the MLP output",
            emits=(error_loc,),
        ),
    ]


# --- layer indexers --------------------------------------------------------------------------


@attrs.frozen
class TranscoderLayers:
    """Layer ``l`` reads layer ``l`` where the transcoder has it; elsewhere its first layer
    (read only for the token count: the kernel returns zeros there)."""

    layers: frozenset[int] | None

    def source_layer(self, target: LayerIndex, n_layers: int) -> Any:
        if self.layers is None or target in self.layers:
            return target
        return min(self.layers)

    def describe(self) -> str:
        return "transcoder layers " + ("all" if self.layers is None else str(sorted(self.layers)))


@attrs.frozen
class TranscoderDirection:
    """g where the node at (layer, MLP) precedes it and the transcoder has that layer."""

    layers: frozenset[int] | None
    causal: CausalDirectionIndexer

    def source_layer(self, target: LayerIndex, n_layers: int) -> Any:
        if self.layers is not None and target not in self.layers:
            return NOT_NEEDED
        return self.causal.source_layer(target, n_layers)

    def describe(self) -> str:
        return f"transcoder {self.causal.describe()}"


def _has(opts: TranscoderOptions, layer: LayerIndex) -> bool:
    layers = opts.layers()
    return layers is None or layer in layers


# --- sources ---------------------------------------------------------------------------------


def _latents_source(config: DstConfig) -> tuple[ScalarSource, ...]:
    opts = transcoder_options(config)
    return (RawScalarSource(transcoder_locations(opts)[0], None, TranscoderLayers(opts.layers())),)


def _error_source(config: DstConfig) -> tuple[ScalarSource, ...]:
    opts = transcoder_options(config)
    return (RawScalarSource(transcoder_locations(opts)[1], None, TranscoderLayers(opts.layers())),)


def _direction(opts: TranscoderOptions) -> ScalarSource:
    causal = CausalDirectionIndexer(opts.direction, MLP)
    return RawScalarSource(
        opts.direction.location, BACKWARD, TranscoderDirection(opts.layers(), causal)
    )


def _with_direction(first: Callable[[DstConfig], tuple[ScalarSource, ...]] | DstReference) -> Any:
    def sources(config: DstConfig) -> tuple[ScalarSource, ...]:
        head = first(config) if callable(first) else (first,)
        return (*head, _direction(transcoder_options(config)))

    return sources


# --- kernels ---------------------------------------------------------------------------------


def _capture(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    """The captured latents / error (value or gradient) where the transcoder has the layer."""
    import torch

    x = need(inputs[0])
    opts = transcoder_options(ctx.config)
    if _has(opts, layer):
        return x
    return torch.zeros_like(x)


def _write_weights(
    opts: TranscoderOptions, ctx: DeriveContext, layer: int, like: torch.Tensor
) -> torch.Tensor:
    tc = resolve_transcoder(opts, ctx).cast(like)
    return tc.write_weights(layer)


def _write(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    opts = transcoder_options(ctx.config)
    z = need(inputs[0])
    if layer is None or not _has(opts, layer):
        return z.new_zeros((*z.shape, ctx.dims.d_model))
    return z.unsqueeze(-1) * _write_weights(opts, ctx, layer, z)


def _write_norm(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    import torch

    opts = transcoder_options(ctx.config)
    z = need(inputs[0])
    if layer is None or not _has(opts, layer):
        return torch.zeros_like(z)
    norms: torch.Tensor = _write_weights(opts, ctx, layer, z).norm(dim=-1)
    return z * norms


def _targets_before_g(opts: TranscoderOptions, ctx: DeriveContext, tc: Transcoder) -> set[int]:
    g_layer = opts.direction.resolved_layer(ctx.dims.n_layers)
    g_loc = opts.direction.location_within_layer
    return {t for t in tc.targets if precedes(t, MLP, g_layer, g_loc)}


def _latent_direct(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    import torch

    z, g = need(inputs[0]), inputs[1]
    if g is None or layer is None:
        return torch.zeros_like(z)
    opts = transcoder_options(ctx.config)
    tc = resolve_transcoder(opts, ctx).cast(z)
    weights = tc.write_weights(layer, _targets_before_g(opts, ctx, tc))
    projected: torch.Tensor = g.to(z) @ weights.T
    return projected.mul_(z)


def _error_direct(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    e, g = need(inputs[0]), inputs[1]
    if g is None:
        return e.new_zeros((e.shape[0], 1))
    return (e * g.to(e)).sum(-1, keepdim=True)


# --- recipes ---------------------------------------------------------------------------------


@attrs.frozen
class TranscoderRecipe(Recipe):
    """A recipe over ``options["transcoder"]`` that records ``A`` at build time."""

    sized: bool = True

    def build(self, config: DstConfig) -> ScalarDeriver:
        opts = transcoder_options(config)
        deriver = Recipe.build(self, config)
        if not self.sized:
            return deriver
        return attrs.evolve(deriver, dimension_sizes={A: opts.n_latents()})


LATENTS = DstReference("transcoder.latents", FORWARD)
LATENTS_GRAD = DstReference("transcoder.latents", BACKWARD)
ERROR = DstReference("transcoder.error", FORWARD)

TRANSCODER_RECIPES: tuple[TranscoderRecipe, ...] = (
    TranscoderRecipe(
        DerivedScalarType(
            "transcoder.latents",
            (T, A),
            LATENT,
            "latents of the (cross-layer) transcoder spliced in place of the MLPs, at their "
            "source layer; BACKWARD: real ∇z",
            location=MLP,
            pass_types=BOTH,
        ),
        "z_l = enc_l(x_l), x_l the MLP input of layer l (captured value / gradient)",
        _capture,
        _latents_source,
    ),
    TranscoderRecipe(
        DerivedScalarType(
            "transcoder.error",
            (T, D),
            NodeType.RESIDUAL_STREAM_CHANNEL,
            "error node of the spliced transcoder at layer l: MLP output minus its "
            "reconstruction; BACKWARD: ∇e = ∇y",
            location=MLP,
            pass_types=BOTH,
        ),
        "e_l = y_l − (Σ_{s≤l} z_s W_dec[s→l] + b_dec[l]) (captured value / gradient)",
        _capture,
        _error_source,
        sized=False,
    ),
    TranscoderRecipe(
        DerivedScalarType(
            "transcoder.write",
            (T, A, D),
            LATENT,
            "each transcoder latent's total write to the residual stream (every layer it "
            "writes to)",
            location=MLP,
        ),
        "z_l[t,j]·Σ_{t'≥l} W_dec[l→t'][j,:]",
        _write,
        (LATENTS,),
    ),
    TranscoderRecipe(
        DerivedScalarType(
            "transcoder.write_norm",
            (T, A),
            LATENT,
            "norm of each transcoder latent's total write (z ≥ 0 for ReLU-family encoders)",
            location=MLP,
        ),
        "z_l[t,j]·‖Σ_{t'≥l} W_dec[l→t'][j,:]‖₂",
        _write_norm,
        (LATENTS,),
    ),
    TranscoderRecipe(
        DerivedScalarType(
            "transcoder.act_times_grad",
            (T, A),
            LATENT,
            "transcoder latent × its gradient: first-order attribution to the objective",
            location=MLP,
        ),
        "z_l[t,j]·∇z_l[t,j] with ∇z_l = Σ_{t'≥l} ∇y_{t'} W_dec[l→t']ᵀ (captured)",
        act_times_grad,
        (LATENTS, LATENTS_GRAD),
    ),
    TranscoderRecipe(
        DerivedScalarType(
            "transcoder.write_to_final_residual_grad",
            (T, A),
            LATENT,
            "direct effect of each transcoder latent on the direction g (writes to layers "
            "that precede g)",
            location=MLP,
        ),
        "z_l[t,j]·Σ_{t'≥l, t' precedes g} W_dec[l→t'][j,:]·g[t]",
        _latent_direct,
        _with_direction(LATENTS),
    ),
    TranscoderRecipe(
        DerivedScalarType(
            "transcoder.error_write_to_final_residual_grad",
            (T, ONE),
            NodeType.LAYER,
            "direct effect of the transcoder's error node at layer l on the direction g",
            location=MLP,
        ),
        "e_l[t]·g[t], 0 where layer l's MLP does not precede g",
        _error_direct,
        _with_direction(ERROR),
        sized=False,
    ),
)

TRANSCODER_DSTS: tuple[DerivedScalarType, ...] = tuple(r.dst for r in TRANSCODER_RECIPES)
TRANSCODER_FACTORIES: dict[DerivedScalarType, Factory] = recipe_factories(TRANSCODER_RECIPES)


def transcoder_example_configs(n_latents: int = 8, seed: int = 0) -> dict[str, DstConfig]:
    """A random cross-layer transcoder over every layer: works on any sequential model."""
    options = {"transcoder": {"random_init": {"n_latents": n_latents, "seed": seed}}}
    return {r.dst.name: DstConfig(options=options) for r in TRANSCODER_RECIPES}
