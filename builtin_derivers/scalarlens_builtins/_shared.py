"""Primitives shared by every catalogue family, so each DST is a short declaration.

A catalogue entry is a :class:`Recipe`: the DST (name, shape, metadata, one-line description),
the formula it computes, its sources, and a per-layer kernel.  Three cross-cutting concerns live
here once instead of in every family (reference §6 item 3):

* **the direction g** — every ``*_to_final_residual_grad`` DST appends the core's
  ``direction_source(config.direction, location)``: layers that cannot influence g receive
  ``None`` and never read the gradient, so nothing past the direction is even captured;
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
    PassType,
    RawScalarSource,
    ScalarDeriver,
    ScalarSource,
    direction_source,
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


def _check_int(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{attribute.name} must be an integer, got {value!r}")


@attrs.frozen
class NeuronOption:
    """An MLP neuron: ``layer`` and ``index`` into its ``F`` axis."""

    layer: int = attrs.field(validator=_check_int)
    index: int = attrs.field(validator=_check_int)


def _to_neuron(value: Any) -> NeuronOption | None:
    if value is None or isinstance(value, NeuronOption):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"neuron must be a mapping {{layer, index}}, got {value!r}")
    return NeuronOption(**value)


@attrs.frozen
class BuiltinsOptions:
    """Schema of ``DstConfig.options["builtins"]``.

    * ``neuron`` — the MLP neuron of ``vocab.write_to_input_direction``.
    * ``layer_norm_eps`` — LayerNorm epsilon for recomputing an LN outside the model; ``None``
      reads ``layer_norm_epsilon`` from the adapter's ``config_dict()``.

    The direction g of every ``*_to_final_residual_grad`` DST is core configuration,
    ``DstConfig.direction``, shared with other plugins.
    """

    neuron: NeuronOption | None = attrs.field(default=None, converter=_to_neuron)
    layer_norm_eps: float | None = None


def builtin_options(config: DstConfig) -> BuiltinsOptions:
    return config.plugin_options(NAMESPACE, BuiltinsOptions)


# --- layer indexers ------------------------------------------------------------------------


@attrs.frozen
class FirstLayerOnly:
    """Layer 0 reads a layer-less source (the embedding); every other layer reads nothing."""

    def source_layer(self, target: int | None, n_layers: int) -> int | Any | None:
        return None if target == 0 else _NOT_NEEDED

    def describe(self) -> str:
        return "no_layers(first layer only)"


FIRST_LAYER_ONLY = FirstLayerOnly()


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

    ``direction=True`` appends g (``scalarlens.direction_source`` of ``config.direction``) as
    the last input, masked causally relative to the DST's declared location.  ``sources`` may
    be a callable of the config for entries whose inputs depend on options.
    """

    dst: DerivedScalarType
    formula: str
    kernel: Kernel
    sources: tuple[ScalarSource, ...] | Callable[[DstConfig], tuple[ScalarSource, ...]] = ()
    direction: bool = False

    def build(self, config: DstConfig) -> ScalarDeriver:
        sources = self.sources(config) if callable(self.sources) else self.sources
        if self.direction:
            sources = (*sources, direction_source(config.direction, self.dst.location))
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
