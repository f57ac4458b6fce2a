"""Capture points that exist only while a plugin's intervention is spliced in.

Kept apart from the model contract (``_model``) because sources, DSTs and plans name these
locations without needing anything else about models.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from ._config import FrozenOptions
from ._vocab import (
    ActivationLocationType,
    Dimension,
    LocationWithinLayer,
    NodeType,
    ShapeSpec,
)

__all__ = ["CaptureLocation", "PluginLocation"]


def _to_shape(value: Sequence[Dimension]) -> ShapeSpec:
    return tuple(value)


@attrs.frozen
class PluginLocation:
    """A capture point that exists only while a plugin's intervention is spliced in.

    Example: the latents of a sparse autoencoder spliced in at ``mlp.post_act`` of layer 3.
    It quacks like an ``ActivationLocationType`` (``value``, ``shape``, ``node_type``,
    ``location_within_layer``, ``has_no_layers``), so raw sources, plans and stores treat it
    the same way.  ``provider`` names the intervention factory (hook
    ``scalarlens_interventions``) that creates it, and ``params`` are what that factory is
    called with; two locations with different params are different capture points.
    """

    name: str
    provider: str
    host: ActivationLocationType
    shape: ShapeSpec = attrs.field(converter=_to_shape)
    node_type: NodeType
    location_within_layer: LocationWithinLayer | None = None
    params: FrozenOptions = attrs.field(factory=FrozenOptions, converter=FrozenOptions)
    has_no_layers: bool = False

    @property
    def value(self) -> str:
        return self.name


CaptureLocation = ActivationLocationType | PluginLocation
