"""Layer indexers: which layer of an input feeds which layer of a computation.

Derivers compute layer by layer.  When layer ``l``'s computation needs another layer of an
input (the previous layer's residual, the gradient at the last layer, an embedding that has no
layer at all) the source's indexer says which.  An indexer may answer ``NOT_NEEDED``: the
kernel then receives ``None`` for that input, never a silent zero.
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

import attrs

from .exceptions import ConfigError

LayerIndex = int | None


class _NotNeeded(enum.Enum):
    NOT_NEEDED = "not_needed"

    def __repr__(self) -> str:
        return "NOT_NEEDED"


NOT_NEEDED = _NotNeeded.NOT_NEEDED
"""Sentinel an indexer returns when a target layer needs nothing from this source."""

SourceLayer = int | None | _NotNeeded


@runtime_checkable
class LayerIndexer(Protocol):
    """Maps a target layer (of the computation) to the source layer it reads."""

    def source_layer(self, target: LayerIndex, n_layers: int) -> SourceLayer: ...

    def describe(self) -> str: ...


@attrs.frozen
class IdentityLayerIndexer:
    """Layer ``l`` reads layer ``l`` (the default)."""

    def source_layer(self, target: LayerIndex, n_layers: int) -> SourceLayer:
        return target

    def describe(self) -> str:
        return "identity"


@attrs.frozen
class StaticLayerIndexer:
    """Every target reads one fixed layer.

    Negative indices count from the end (``-1`` is the last layer), so a deriver can say "the
    gradient at the final layer" without knowing the model's depth at build time.
    """

    layer_index: int

    def source_layer(self, target: LayerIndex, n_layers: int) -> SourceLayer:
        layer = self.layer_index + n_layers if self.layer_index < 0 else self.layer_index
        if not 0 <= layer < n_layers:
            raise ConfigError(
                f"StaticLayerIndexer({self.layer_index}) points outside the model's "
                f"{n_layers} layers"
            )
        return layer

    def describe(self) -> str:
        return f"static({self.layer_index})"


@attrs.frozen
class OffsetLayerIndexer:
    """Layer ``l`` reads layer ``l + offset``; outside the model it reads nothing.

    Validity is judged against the model's layers, not the requested subset, so asking for
    layer 3 alone still reads layer 2 for "previous layer".
    """

    offset: int

    def source_layer(self, target: LayerIndex, n_layers: int) -> SourceLayer:
        if target is None:
            raise ConfigError("OffsetLayerIndexer cannot shift a layer-less target")
        layer = target + self.offset
        return layer if 0 <= layer < n_layers else NOT_NEEDED

    def describe(self) -> str:
        return f"offset({self.offset:+d})"


@attrs.frozen
class NoLayersLayerIndexer:
    """Every target reads the source's only entry, stored under layer ``None``."""

    def source_layer(self, target: LayerIndex, n_layers: int) -> SourceLayer:
        return None

    def describe(self) -> str:
        return "no_layers"


IDENTITY = IdentityLayerIndexer()
NO_LAYERS = NoLayersLayerIndexer()
PREVIOUS_LAYER = OffsetLayerIndexer(-1)
LAST_LAYER = StaticLayerIndexer(-1)
