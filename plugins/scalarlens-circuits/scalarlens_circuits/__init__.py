"""ScalarLens circuits: edges between components, and pruned attribution graphs.

    >>> from scalarlens_circuits import attribution_graph, prune, write_neuronpedia, draw
    >>> graph = attribution_graph(model, "When Mary and John went ...", target=" Mary")
    >>> prune(graph)                       # influence pruning: 0.8 of nodes, 0.98 of edges
    >>> write_neuronpedia(graph, "graph.json"); draw(graph, "graph.png")

The edge DSTs are registered with ScalarLens through the ``circuits`` entry point; the graph
API lives here.  Names are imported on first use, so loading the plugin stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "._graph": ("AttributionGraph", "Node", "attribution_graph", "estimate_memory"),
    "._prune": ("PruneResult", "find_threshold", "influence", "prune"),
    "._neuronpedia": ("to_neuronpedia", "write_neuronpedia", "node_id"),
    "._draw": ("draw",),
}
__all__ = sorted(name for names in _LAZY.values() for name in names)


def __getattr__(name: str) -> Any:
    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(module, __name__), name)
    raise AttributeError(f"module 'scalarlens_circuits' has no attribute {name!r}")
