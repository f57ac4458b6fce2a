"""Hook implementations of the ``circuits`` plugin (the contract: ``scalarlens.hookspecs``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scalarlens import DerivedScalarType, DstConfig, Factory, hookimpl

from ._edges import EXAMPLES, FACTORIES

SCALARLENS_PLUGIN_API = 1


@hookimpl
def scalarlens_derivers() -> Mapping[DerivedScalarType, Factory]:
    """Edge attributions, edge activations, single-node writes and node read/write converters."""
    return dict(FACTORIES)


@hookimpl
def scalarlens_dst_examples() -> Mapping[str, DstConfig]:
    """Every edge DST needs a node index: one valid node of whatever model the kit uses."""
    return dict(EXAMPLES)


@hookimpl
def scalarlens_cli_commands() -> Mapping[str, Any]:
    """``scalarlens graph``: a pruned attribution graph as Neuronpedia JSON and a PNG."""
    from ._cli import configure

    return {"graph": configure}
