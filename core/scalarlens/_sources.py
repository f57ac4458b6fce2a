"""Scalar sources: the inputs of a deriver.

A source is a raw captured activation, another deriver's output, or a *reference by name* to
another DST.  References are what let a plugin chain onto a DST from a different plugin without
importing it: the registry resolves them into derived sources when the deriver is built.

``pass_type=None`` means "whatever pass the consuming deriver is asked for", which is how a raw
twin serves both the value and its gradient through one declaration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from ._config import DstConfig
from ._direction import CausalDirectionIndexer, Direction
from ._layers import (
    IDENTITY,
    IdentityLayerIndexer,
    LayerIndexer,
    OffsetLayerIndexer,
    StaticLayerIndexer,
)
from ._vocab import ActivationLocationType, LocationWithinLayer, PassType
from .exceptions import ConfigError

if TYPE_CHECKING:
    from ._locations import PluginLocation


@runtime_checkable
class ScalarSource(Protocol):
    """An input of a deriver: where it comes from, in which pass, through which layer indexer."""

    @property
    def pass_type(self) -> PassType | None: ...

    @property
    def layer_indexer(self) -> LayerIndexer: ...

    def describe(self) -> str: ...


def _check_raw_indexer(
    inst: RawScalarSource, _: attrs.Attribute[Any], indexer: LayerIndexer
) -> None:
    # Indexers that always answer an integer layer can never read a layer-less location;
    # others (e.g. causal masks) are checked per layer when the plan is made.
    if inst.location.has_no_layers and isinstance(
        indexer, (IdentityLayerIndexer, OffsetLayerIndexer, StaticLayerIndexer)
    ):
        raise ConfigError(
            f"raw source {inst.location.value} has no layers: use NoLayersLayerIndexer "
            f"(got {indexer.describe()})"
        )


@attrs.frozen
class RawScalarSource:
    """A captured activation (or its gradient) at a model location or a plugin's splice."""

    location: ActivationLocationType | PluginLocation
    pass_type: PassType | None = PassType.FORWARD
    layer_indexer: LayerIndexer = attrs.field(default=IDENTITY, validator=_check_raw_indexer)

    def describe(self) -> str:
        indexer = self.layer_indexer.describe()
        return f"raw {self.location.value}/{pass_name(self.pass_type)} [{indexer}]"


@attrs.frozen
class DstReference:
    """Another DST named by its key, resolved by the registry at build time.

    ``config=None`` builds the referenced DST with the consuming deriver's config.
    """

    dst_name: str
    pass_type: PassType | None = PassType.FORWARD
    layer_indexer: LayerIndexer = IDENTITY
    config: DstConfig | None = None

    def describe(self) -> str:
        return f"ref {self.dst_name}/{pass_name(self.pass_type)} [{self.layer_indexer.describe()}]"


def pass_name(pass_type: PassType | None) -> str:
    return "same-pass" if pass_type is None else pass_type.value


def direction_source(
    direction: Direction, component_location: LocationWithinLayer | None
) -> RawScalarSource:
    """``g`` as a deriver input, causally masked for components at ``component_location``."""
    return RawScalarSource(
        direction.location,
        PassType.BACKWARD,
        CausalDirectionIndexer(direction, component_location),
    )
