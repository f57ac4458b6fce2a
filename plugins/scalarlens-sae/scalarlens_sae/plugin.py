"""Hook implementations of the ``sae`` plugin (the whole contract: ``scalarlens.hookspecs``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from scalarlens import DerivedScalarType, DstConfig, Factory, hookimpl

from ._derivers import FACTORIES, PROVIDER, example_configs, make_interventions

if TYPE_CHECKING:
    from scalarlens import Intervention, ModelAdapter

SCALARLENS_PLUGIN_API = 1


@hookimpl
def scalarlens_derivers() -> Mapping[DerivedScalarType, Factory]:
    """Offline ``sae.*`` and online ``sae.online.*`` DSTs (see the README's table)."""
    return dict(FACTORIES)


@hookimpl
def scalarlens_dst_examples() -> Mapping[str, DstConfig]:
    """Every SAE DST needs options; a random 8-latent SAE at layer 0 works on any model."""
    return example_configs()


@hookimpl
def scalarlens_interventions() -> Mapping[
    str, Callable[[Mapping[str, Any], ModelAdapter], Sequence[Intervention]]
]:
    """``sae``: splice an SAE (with its error term) into the forward pass."""
    return {PROVIDER: make_interventions}
