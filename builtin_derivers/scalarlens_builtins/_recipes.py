"""Primitives shared by every catalogue family, so each DST is a short declaration.

A catalogue entry is a :class:`Recipe`: the DST (name, shape, metadata, one-line description),
the formula it computes, its sources, and a per-layer kernel.  Three cross-cutting concerns live
here once instead of in every family (reference §6 item 3):

* **the direction g** — the gradient every ``*_to_final_residual_grad`` DST projects onto, with
  causal zeroing expressed as a layer indexer (layers that cannot influence g receive ``None``
  and never read the gradient, so nothing past the direction is even captured);
* **token-pair flattening** — one generic transform from a ``T×S×…`` DST to a
  ``TOKEN_PAIRS×…`` view;
* **the plugin option namespace** ``options["builtins"]`` and its attrs schema.

Only the public ``scalarlens`` API is used, as a third-party plugin would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch
from scalarlens import NOT_NEEDED as _NOT_NEEDED
from scalarlens import (
    ActivationLocationType,
    DeriveContext,
    DerivedScalarType,
    Dimension,
    DstConfig,
    DstReference,
    LocationWithinLayer,
    NodeType,
    NoLayersLayerIndexer,
    PassType,
    RawScalarSource,
    ScalarDeriver,
    ScalarSource,
)

ALT = ActivationLocationType
Loc = LocationWithinLayer
FORWARD, BACKWARD = PassType.FORWARD, PassType.BACKWARD
Inputs = tuple[torch.Tensor | None, ...]
Kernel = Callable[[Inputs, int | None, DeriveContext], torch.Tensor]
Factory = Callable[[DstConfig], ScalarDeriver]
NAMESPACE = "builtins"

# Dimension shorthands for the declaration tables.
T, S, P = Dimension.TOKENS, Dimension.ATTENDED_TO_TOKENS, Dimension.TOKEN_PAIRS
D, H, F = Dimension.RESIDUAL_STREAM_CHANNELS, Dimension.ATTN_HEADS, Dimension.MLP_ACTS
DV, V, ONE = Dimension.VALUE_CHANNELS, Dimension.VOCAB_SIZE, Dimension.SINGLETON


# --- plugin options ------------------------------------------------------------------------

_DIRECTION_LOCATIONS = {
    ALT.RESID_POST_EMBEDDING.value: ALT.RESID_POST_EMBEDDING,
    ALT.RESID_POST_ATTN.value: ALT.RESID_POST_ATTN,
    ALT.RESID_POST_MLP.value: ALT.RESID_POST_MLP,
}


def _check_direction_location(_: object, __: attrs.Attribute[str], value: str) -> None:
    if value not in _DIRECTION_LOCATIONS:
        raise ValueError(
            f"direction.location must be one of {sorted(_DIRECTION_LOCATIONS)}, got {value!r}"
        )


def _check_int(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{attribute.name} must be an integer, got {value!r}")


@attrs.frozen
class DirectionOption:
    """Where g is read: the BACKWARD gradient at a residual location and layer.

    ``layer`` may be negative (``-1`` = last layer); it must be ``None`` for
    ``resid.post_emb``, which has no layer.  Default: ``resid.post_mlp`` at the last layer, the
    residual just before the final LayerNorm.
    """

    location: str = attrs.field(
        default=ALT.RESID_POST_MLP.value, validator=_check_direction_location
    )
    layer: int | None = attrs.field(default=-1, validator=_check_int)

    def __attrs_post_init__(self) -> None:
        if (self.layer is None) != (self.location == ALT.RESID_POST_EMBEDDING.value):
            raise ValueError(
                "direction.layer must be null exactly when direction.location is "
                f"'resid.post_emb' (got location={self.location!r}, layer={self.layer!r})"
            )

    @property
    def alt(self) -> ActivationLocationType:
        return _DIRECTION_LOCATIONS[self.location]


@attrs.frozen
class NeuronOption:
    """An MLP neuron: ``layer`` and ``index`` into its ``F`` axis."""

    layer: int = attrs.field(validator=_check_int)
    index: int = attrs.field(validator=_check_int)


def _to_direction(value: Any) -> DirectionOption:
    if isinstance(value, DirectionOption):
        return value
    if value is None:
        return DirectionOption()
    if not isinstance(value, Mapping):
        raise ValueError(f"direction must be a mapping {{location, layer}}, got {value!r}")
    return DirectionOption(**value)


def _to_neuron(value: Any) -> NeuronOption | None:
    if value is None or isinstance(value, NeuronOption):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"neuron must be a mapping {{layer, index}}, got {value!r}")
    return NeuronOption(**value)


@attrs.frozen
class BuiltinsOptions:
    """Schema of ``DstConfig.options["builtins"]``.

    * ``direction`` — see :class:`DirectionOption` (used by every ``*_to_final_residual_grad``).
    * ``neuron`` — the MLP neuron of ``vocab.write_to_input_direction``.
    * ``layer_norm_eps`` — LayerNorm epsilon for recomputing an LN outside the model; ``None``
      reads ``layer_norm_epsilon`` from the adapter's ``config_dict()``.
    """

    direction: DirectionOption = attrs.field(factory=DirectionOption, converter=_to_direction)
    neuron: NeuronOption | None = attrs.field(default=None, converter=_to_neuron)
    layer_norm_eps: float | None = None


def builtin_options(config: DstConfig) -> BuiltinsOptions:
    return config.plugin_options(NAMESPACE, BuiltinsOptions)


def trace_upstream_direction(location: ActivationLocationType, layer: int) -> dict[str, Any]:
    """The ``direction`` option for tracing upstream from a node at ``location``/``layer``.

    g becomes the gradient at the residual immediately preceding the node (reference §0):
    ``resid.post_attn`` of the same layer for MLP nodes, ``r_λ`` (``resid.post_mlp`` of layer
    ``λ−1``, or ``resid.post_emb`` at layer 0) for attention nodes.  Use as
    ``DstConfig(options={"builtins": {"direction": trace_upstream_direction(alt, λ)}})``.
    """
    loc = location.location_within_layer
    if loc is None or location.has_no_layers:
        raise ValueError(f"{location.value} has no unambiguous place inside a layer to trace from")
    if loc > Loc.RESID_POST_ATTN:
        return {"location": ALT.RESID_POST_ATTN.value, "layer": layer}
    if layer == 0:
        return {"location": ALT.RESID_POST_EMBEDDING.value, "layer": None}
    return {"location": ALT.RESID_POST_MLP.value, "layer": layer - 1}


# --- layer indexers ------------------------------------------------------------------------


def precedes(
    layer: int | None,
    location: LocationWithinLayer | None,
    direction_layer: int | None,
    direction_location: LocationWithinLayer | None,
) -> bool:
    """Reference §1.2 ``precedes_final_layer``: can a component here influence the direction?

    Strict: a component at the direction's own location does not precede it.
    """
    if layer is None:
        return True
    if direction_layer is None:
        return False
    if layer != direction_layer:
        return layer < direction_layer
    if location is None or direction_location is None:
        raise ValueError("same-layer causality needs both locations to be known")
    return location < direction_location


@attrs.frozen
class CausalDirectionIndexer:
    """Layer ``l`` of a component reads g's layer iff the component precedes g; else nothing.

    The kernel then gets ``None`` and returns exact zeros: a component downstream of the
    direction has no direct effect on it.  Because ``NOT_NEEDED`` layers are never demanded, the
    planner captures the gradient only where it is used.
    """

    direction_layer: int | None
    direction_location: LocationWithinLayer | None
    component_location: LocationWithinLayer | None

    def source_layer(self, target: int | None, n_layers: int) -> int | Any | None:
        dir_layer = self.direction_layer
        if dir_layer is not None and dir_layer < 0:
            dir_layer += n_layers
        if dir_layer is not None and not 0 <= dir_layer < n_layers:
            raise ValueError(
                f"direction layer {self.direction_layer} is outside the model's {n_layers} layers"
            )
        if not precedes(target, self.component_location, dir_layer, self.direction_location):
            return _NOT_NEEDED
        return dir_layer

    def describe(self) -> str:
        return f"causal(direction at layer {self.direction_layer})"


@attrs.frozen
class FirstLayerOnly(NoLayersLayerIndexer):
    """Layer 0 reads a layer-less source (the embedding); every other layer reads nothing.

    Subclasses ``NoLayersLayerIndexer`` because ``RawScalarSource`` insists on that type for
    layer-less locations.
    """

    def source_layer(self, target: int | None, n_layers: int) -> int | Any | None:
        return None if target == 0 else _NOT_NEEDED

    def describe(self) -> str:
        return "no_layers(first layer only)"


FIRST_LAYER_ONLY = FirstLayerOnly()


def direction_source(
    config: DstConfig, component_location: LocationWithinLayer | None
) -> ScalarSource:
    """g as a source: the objective's gradient at the configured residual, causally masked.

    A reference to the raw twin (rather than a raw source) because the embedding has no layer,
    and raw layer-less sources only accept the plain no-layer indexer.
    """
    option = builtin_options(config).direction
    indexer = CausalDirectionIndexer(
        option.layer, option.alt.location_within_layer, component_location
    )
    return DstReference(option.location, BACKWARD, indexer)


# --- declarations --------------------------------------------------------------------------


def declare(
    name: str,
    shape: Iterable[Dimension],
    node_type: NodeType,
    location: LocationWithinLayer | None,
    description: str,
    *,
    passes: Iterable[PassType] = (FORWARD,),
    has_no_layers: bool = False,
) -> DerivedScalarType:
    return DerivedScalarType(
        name=name,
        shape=tuple(shape),
        node_type=node_type,
        location=location,
        pass_types=frozenset(passes),
        description=description,
        has_no_layers=has_no_layers,
    )


def raw(
    location: ActivationLocationType, pass_type: PassType | None = FORWARD
) -> RawScalarSource:
    """A raw source with the right indexer for the location (no-layer for the embedding)."""
    from scalarlens import IDENTITY, NO_LAYERS

    return RawScalarSource(location, pass_type, NO_LAYERS if location.has_no_layers else IDENTITY)


@attrs.frozen
class Recipe:
    """One catalogue entry: DST + formula + sources + kernel.

    ``direction=True`` appends g (see :func:`direction_source`) as the last input, masked
    causally relative to the DST's declared location.  ``sources`` may be a callable of the
    config for entries whose inputs depend on options.
    """

    dst: DerivedScalarType
    formula: str
    kernel: Kernel
    sources: tuple[ScalarSource, ...] | Callable[[DstConfig], tuple[ScalarSource, ...]] = ()
    direction: bool = False

    def build(self, config: DstConfig) -> ScalarDeriver:
        sources = self.sources(config) if callable(self.sources) else self.sources
        if self.direction:
            sources = (*sources, direction_source(config, self.dst.location))
        return ScalarDeriver(
            dst=self.dst,
            config=config,
            sub_scalar_sources=sources,
            tensor_calculate_derived_scalar_fn=self.kernel,
            derivable_pass_types=self.dst.pass_types,
        )

    def factory(self) -> Factory:
        def build(config: DstConfig) -> ScalarDeriver:
            return self.build(config)

        build.__name__ = "build_" + self.dst.name.replace(".", "_")
        build.__doc__ = f"{self.dst.name} = {self.formula}\n\n{self.dst.description}"
        return build


def factories(recipes: Iterable[Recipe]) -> dict[DerivedScalarType, Factory]:
    return {recipe.dst: recipe.factory() for recipe in recipes}


# --- kernel helpers ------------------------------------------------------------------------


def need(tensor: torch.Tensor | None) -> torch.Tensor:
    """Narrow an input the indexer always provides (identity/no-layer sources)."""
    assert tensor is not None, "an always-needed input was not provided"
    return tensor


def row_norm(tensor: torch.Tensor) -> torch.Tensor:
    """``‖x‖₂`` over the last axis, kept as a size-1 axis (``T×D → T×1``)."""
    norm: torch.Tensor = tensor.norm(dim=-1, keepdim=True)
    return norm


def token_pair_index(n_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, s) of every pair with ``s ≤ t``, row-major: flat index ``t(t+1)/2 + s``."""
    t, s = torch.tril_indices(n_tokens, n_tokens, device=device)
    return t, s


def flatten_lower_triangle(tensor: torch.Tensor) -> torch.Tensor:
    """``T×S×…`` → ``TOKEN_PAIRS×…``: keep the causal lower triangle, row-major."""
    t, s = token_pair_index(tensor.shape[0], tensor.device)
    return tensor[t, s]


def unflatten_lower_triangle(tensor: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Inverse of :func:`flatten_lower_triangle`; entries with ``s > t`` are 0."""
    out = tensor.new_zeros((n_tokens, n_tokens, *tensor.shape[1:]))
    t, s = token_pair_index(n_tokens, tensor.device)
    out[t, s] = tensor
    return out


def _flatten_kernel(inputs: Inputs, layer: int | None, ctx: DeriveContext) -> torch.Tensor:
    (tensor,) = inputs
    return flatten_lower_triangle(need(tensor))


def pairs_view(base: DerivedScalarType, name: str, description: str) -> Recipe:
    """The token-pair ("flattened") view of a ``T×S×…`` DST, for any pass the base supports.

    One transform for every pair DST: the base is referenced by name in the same pass as
    requested, so the gradient of the view is the flattened gradient of the base.
    """
    if base.shape[:2] != (T, S):
        raise ValueError(f"{base.name} is not a T×S×… DST; cannot take token pairs")
    dst = declare(
        name,
        (P, *base.shape[2:]),
        base.node_type,
        base.location,
        description,
        passes=base.pass_types,
        has_no_layers=base.has_no_layers,
    )
    return Recipe(
        dst=dst,
        formula=f"flatten_lower_triangle({base.name}): [t(t+1)/2 + s, …] = {base.name}[t, s, …]",
        kernel=_flatten_kernel,
        sources=(DstReference(base.name, None),),
    )
