"""Immutable containers for per-layer tensors.

``ActivationsAndMetadata`` is one DST in one pass for every layer of one prompt;
``RawActivationStore`` holds what a model run captured.  Every operation returns a new value:
re-indexing layers never mutates its input (the reference pops and inserts keys in place), and
a layer that was not computed is *absent*, never a zero tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import attrs

from ._dst import DerivedScalarType, raw_dst
from ._layers import NOT_NEEDED, LayerIndex, LayerIndexer
from ._vocab import ActivationLocationType, PassType
from .exceptions import MissingActivationError, ShapeError

if TYPE_CHECKING:
    import torch

    from ._locations import PluginLocation


def _freeze(mapping: Mapping[LayerIndex, torch.Tensor]) -> Mapping[LayerIndex, torch.Tensor]:
    return MappingProxyType(dict(mapping))


def _layer_sort_key(layer: LayerIndex) -> int:
    return -1 if layer is None else layer


@attrs.frozen
class ActivationsAndMetadata:
    """One DST, one pass, all computed layers, one prompt."""

    dst: DerivedScalarType
    pass_type: PassType
    activations_by_layer_index: Mapping[LayerIndex, torch.Tensor] = attrs.field(
        converter=_freeze, eq=False
    )

    @property
    def layer_indices(self) -> tuple[LayerIndex, ...]:
        return tuple(sorted(self.activations_by_layer_index, key=_layer_sort_key))

    def __getitem__(self, layer: LayerIndex) -> torch.Tensor:
        try:
            return self.activations_by_layer_index[layer]
        except KeyError:
            raise MissingActivationError(
                f"{self.dst.name} ({self.pass_type.value}) has no layer {layer!r}; "
                f"computed layers: {list(self.layer_indices)}"
            ) from None

    def __iter__(self) -> Iterator[LayerIndex]:
        return iter(self.layer_indices)

    def __len__(self) -> int:
        return len(self.activations_by_layer_index)

    @property
    def shape(self) -> tuple[int, ...]:
        first = next(iter(self.activations_by_layer_index.values()), None)
        return () if first is None else tuple(first.shape)

    def apply_layer_indexer(
        self, indexer: LayerIndexer, targets: tuple[LayerIndex, ...], n_layers: int
    ) -> ActivationsAndMetadata:
        """Re-key so that entry ``t`` holds what target layer ``t`` needs.

        Targets whose indexer answers ``NOT_NEEDED`` are left out; a needed source layer that
        was never computed raises instead of being filled with zeros.
        """
        out: dict[LayerIndex, torch.Tensor] = {}
        for target in targets:
            source = indexer.source_layer(target, n_layers)
            if source is NOT_NEEDED:
                continue
            out[target] = self[source]
        return ActivationsAndMetadata(self.dst, self.pass_type, out)

    def filter_layers(self, layers: frozenset[int] | None) -> ActivationsAndMetadata:
        """Keep the listed layers (and the layer-less ``None`` entry); ``None`` keeps all."""
        if layers is None:
            return self
        kept = {
            k: v for k, v in self.activations_by_layer_index.items() if k is None or k in layers
        }
        return ActivationsAndMetadata(self.dst, self.pass_type, kept)

    def apply_transform_fn_to_activations(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        output_dst: DerivedScalarType,
        output_pass_type: PassType,
    ) -> ActivationsAndMetadata:
        return self.apply_layerwise_transform_fn_to_activations(
            lambda t, _layer: fn(t), output_dst, output_pass_type
        )

    def apply_layerwise_transform_fn_to_activations(
        self,
        fn: Callable[[torch.Tensor, LayerIndex], torch.Tensor],
        output_dst: DerivedScalarType,
        output_pass_type: PassType,
    ) -> ActivationsAndMetadata:
        out = {layer: fn(t, layer) for layer, t in self.activations_by_layer_index.items()}
        return ActivationsAndMetadata(output_dst, output_pass_type, out)

    def numel(self) -> int:
        return sum(t.numel() for t in self.activations_by_layer_index.values())

    def sum(self) -> float:
        return float(sum(float(t.sum()) for t in self.activations_by_layer_index.values()))

    def allclose(
        self, other: ActivationsAndMetadata, rtol: float = 1e-5, atol: float = 1e-8
    ) -> bool:
        """Same layers, same shapes, close values; labels are ignored on purpose."""
        import torch

        if set(self.activations_by_layer_index) != set(other.activations_by_layer_index):
            return False
        return all(
            a.shape == other[k].shape and torch.allclose(a, other[k], rtol=rtol, atol=atol)
            for k, a in self.activations_by_layer_index.items()
        )

    def cpu(self) -> ActivationsAndMetadata:
        out = {k: t.cpu() for k, t in self.activations_by_layer_index.items()}
        return ActivationsAndMetadata(self.dst, self.pass_type, out)


RawKey = tuple["ActivationLocationType | PluginLocation", PassType]


def _freeze_raw(
    mapping: Mapping[RawKey, ActivationsAndMetadata],
) -> Mapping[RawKey, ActivationsAndMetadata]:
    return MappingProxyType(dict(mapping))


@attrs.frozen
class RawActivationStore:
    """What one model run captured for one prompt, keyed by (location, pass)."""

    entries: Mapping[RawKey, ActivationsAndMetadata] = attrs.field(converter=_freeze_raw, eq=False)

    @classmethod
    def from_nested_dict(
        cls, nested: Mapping[RawKey, Mapping[LayerIndex, torch.Tensor]]
    ) -> RawActivationStore:
        entries: dict[RawKey, ActivationsAndMetadata] = {}
        for (location, pass_type), by_layer in nested.items():
            for layer in by_layer:
                if (layer is None) != location.has_no_layers:
                    raise ShapeError(
                        f"{location.value}: layer key {layer!r} is wrong; "
                        + (
                            "use None for this layer-less location"
                            if location.has_no_layers
                            else "this location needs integer layer keys"
                        )
                    )
            entries[(location, pass_type)] = ActivationsAndMetadata(
                raw_dst(location, ""), pass_type, by_layer
            )
        return cls(entries)

    def get(
        self, location: ActivationLocationType | PluginLocation, pass_type: PassType
    ) -> ActivationsAndMetadata:
        try:
            return self.entries[(location, pass_type)]
        except KeyError:
            held = ", ".join(f"{loc.value}/{p.value}" for loc, p in self.entries) or "nothing"
            raise MissingActivationError(
                f"raw activation {location.value} ({pass_type.value}) was not captured "
                f"(the store holds: {held}); plan the run with the engine so it captures "
                "what the derivers need"
            ) from None

    def keys(self) -> tuple[RawKey, ...]:
        return tuple(self.entries)
