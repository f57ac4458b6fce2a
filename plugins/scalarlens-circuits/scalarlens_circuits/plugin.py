"""Hook implementations of the ``circuits`` plugin (the contract: ``scalarlens.hookspecs``)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from scalarlens import DerivedScalarType, DstConfig, Factory, hookimpl

from ._edges import EXAMPLES, FACTORIES

SCALARLENS_PLUGIN_API = 1


@functools.cache  # asked by two hooks on every registry load: look the metadata up once
def _with_sae() -> bool:
    """Whether ``scalarlens-sae`` is installed: the SAE edges read its DSTs by name, so they are
    offered only beside it (checked in the package metadata; the plugin is never imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("scalarlens-sae")
    except PackageNotFoundError:
        return False
    return True


@hookimpl
def scalarlens_derivers() -> Mapping[DerivedScalarType, Factory]:
    """Edge attributions, edge activations, single-node writes and node read/write converters;
    edges into and out of SAE latents when ``scalarlens-sae`` is installed."""
    if not _with_sae():
        return dict(FACTORIES)
    from ._edges_sae import SAE_EDGE_FACTORIES

    return {**FACTORIES, **SAE_EDGE_FACTORIES}


@hookimpl
def scalarlens_dst_examples() -> Mapping[str, DstConfig]:
    """Every edge DST needs a node index: one valid node of whatever model the kit uses."""
    if not _with_sae():
        return dict(EXAMPLES)
    from ._edges_sae import SAE_EDGE_EXAMPLES

    return {**EXAMPLES, **SAE_EDGE_EXAMPLES}


@hookimpl
def scalarlens_cli_commands() -> Mapping[str, Any]:
    """``scalarlens graph``: a pruned attribution graph as Neuronpedia JSON and a PNG."""
    from ._cli import configure

    return {"graph": configure}
