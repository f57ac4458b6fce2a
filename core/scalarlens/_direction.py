"""The direction of interest ``g``: where direct effects are measured, and what precedes it.

Every "write projected on the gradient" DST — in the builtins or in any plugin — projects onto
the objective's gradient at one residual-stream location (reference §0).  By default that is
the residual just before the final LayerNorm; to trace upstream from a node it is the residual
immediately before the node.  The choice is shared configuration (``DstConfig.direction``), so
every plugin's direct effects agree on it, and causal zeroing is one layer indexer: a component
that does not strictly precede ``g`` reads nothing and has no direct effect on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ._layers import NOT_NEEDED, SourceLayer
from ._vocab import ActivationLocationType, LocationWithinLayer
from .exceptions import ConfigError

ALT = ActivationLocationType
RESIDUAL_LOCATIONS = (ALT.RESID_POST_EMBEDDING, ALT.RESID_POST_ATTN, ALT.RESID_POST_MLP)
_EMBEDDING_LOCATION = LocationWithinLayer.END_OF_PREV_LAYER


def _to_location(value: Any) -> ActivationLocationType:
    try:
        location = ALT(value)  # type: ignore[call-arg]
    except ValueError:
        location = None
    if location not in RESIDUAL_LOCATIONS:
        raise ConfigError(
            f"DstConfig.direction.location must be one of "
            f"{[loc.value for loc in RESIDUAL_LOCATIONS]}, got {value!r}"
        )
    assert location is not None
    return location


@attrs.frozen
class Direction:
    """``g`` = the objective's gradient at ``location`` of ``layer`` (negative: from the end).

    ``layer`` is ``None`` exactly for ``resid.post_emb``, which has no layer.
    """

    location: ActivationLocationType = attrs.field(
        default=ALT.RESID_POST_MLP, converter=_to_location
    )
    layer: int | None = -1

    def __attrs_post_init__(self) -> None:
        layer = self.layer
        if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)):
            raise ConfigError(f"DstConfig.direction.layer must be an integer, got {self.layer!r}")
        if (self.layer is None) != self.location.has_no_layers:
            raise ConfigError(
                "DstConfig.direction.layer must be null exactly when the location is "
                f"'resid.post_emb' (got location={self.location.value!r}, layer={self.layer!r})"
            )

    @classmethod
    def trace_upstream(cls, location: ActivationLocationType, layer: int) -> Direction:
        """The residual immediately before a node at ``location`` of ``layer``.

        ``resid.post_attn`` of the same layer for MLP nodes; ``resid.post_mlp`` of the previous
        layer (the embedding at layer 0) for attention nodes.
        """
        where = location.location_within_layer
        if where is None or location.has_no_layers:
            raise ConfigError(f"{location.value} has no place inside a layer to trace from")
        if where > LocationWithinLayer.RESID_POST_ATTN:
            return cls(ALT.RESID_POST_ATTN, layer)
        if layer == 0:
            return cls(ALT.RESID_POST_EMBEDDING, None)
        return cls(ALT.RESID_POST_MLP, layer - 1)

    def resolved_layer(self, n_layers: int) -> int | None:
        if self.layer is None:
            return None
        layer = self.layer + n_layers if self.layer < 0 else self.layer
        if not 0 <= layer < n_layers:
            raise ConfigError(
                f"DstConfig.direction.layer {self.layer} is outside the model's {n_layers} layers"
            )
        return layer

    @property
    def location_within_layer(self) -> LocationWithinLayer:
        return self.location.location_within_layer or _EMBEDDING_LOCATION

    def to_dict(self) -> dict[str, Any]:
        return {"location": self.location.value, "layer": self.layer}


def to_direction(value: Any) -> Direction:
    if isinstance(value, Direction):
        return value
    if value is None:
        return Direction()
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"DstConfig.direction must be a Direction or a mapping {{location, layer}}, "
            f"got {value!r}"
        )
    unknown = sorted(set(value) - {"location", "layer"})
    if unknown:
        raise ConfigError(
            f"DstConfig.direction: unknown field(s) {unknown}; valid: location, layer"
        )
    return Direction(**value)


def precedes(
    layer: int | None,
    location: LocationWithinLayer | None,
    direction_layer: int | None,
    direction_location: LocationWithinLayer,
) -> bool:
    """Can a component at (``layer``, ``location``) influence ``g``?

    Layer-less components (the embedding) precede everything; nothing in a layer precedes the
    embedding; otherwise earlier layers precede, and within a layer the location
    must be strictly earlier (a component at ``g``'s own location does not precede it).
    """
    if layer is None:
        return True  # the embedding precedes everything, itself included (reference §2.2)
    if direction_layer is None:
        return False
    if layer != direction_layer:
        return layer < direction_layer
    if location is None:
        raise ConfigError("same-layer causality needs the component's location within the layer")
    return location < direction_location


@attrs.frozen
class CausalDirectionIndexer:
    """Layer ``l`` of a component reads ``g``'s layer iff the component precedes ``g``.

    Otherwise the kernel receives ``None`` and returns zeros; because such layers never demand
    ``g``, the planner captures the gradient only where it is used.
    """

    direction: Direction
    component_location: LocationWithinLayer | None

    def source_layer(self, target: int | None, n_layers: int) -> SourceLayer:
        layer = self.direction.resolved_layer(n_layers)
        if not precedes(
            target, self.component_location, layer, self.direction.location_within_layer
        ):
            return NOT_NEEDED
        return layer

    def describe(self) -> str:
        return f"causal(g at {self.direction.location.value}, layer {self.direction.layer})"
