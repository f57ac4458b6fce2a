"""Influence pruning, as circuit-tracer and Neuronpedia do it, on a sparse adjacency.

Why influence and not edge weight: a node matters if it reaches the objective through *any*
path.  Normalise ``|A|`` so each target's incoming weights sum to one; the total influence of
a source on the objective is then the sum over path lengths of the objective's row of
``Â + Â² + …`` (a Neumann series that ends, because the graph is acyclic: each power moves at
least one stage down).  Keep the components carrying ``node_threshold`` of the total influence,
then the edges carrying ``edge_threshold`` of the edge scores, then whatever still connects.
The series is summed by sparse matrix–vector products, so no dense ``nodes × nodes`` matrix.
"""

from __future__ import annotations

import attrs
import torch

from ._graph import AttributionGraph

__all__ = ["PruneResult", "influence", "prune"]

COMPONENTS = ("neuron", "feature", "head")


@attrs.frozen
class PruneResult:
    """Which nodes and edges survive, and every node's influence on the objective."""

    nodes: list[int]
    edges: torch.Tensor = attrs.field(eq=False)  # coalesced sparse, pruned weights (signed)
    influence: torch.Tensor = attrs.field(eq=False)  # per node, of the unpruned graph


def _normalised(edges: torch.Tensor) -> torch.Tensor:
    """``|A|`` with each row (a target's incoming edges) divided by its sum."""
    a = edges.coalesce()
    rows, values = a.indices()[0], a.values().abs()
    sums = torch.zeros(a.shape[0], dtype=values.dtype).index_add_(0, rows, values)
    scaled = values / sums[rows].clamp_min(torch.finfo(values.dtype).tiny)
    return torch.sparse_coo_tensor(a.indices(), scaled, a.shape, check_invariants=False).coalesce()


def influence(edges: torch.Tensor, start: torch.Tensor, max_steps: int = 10_000) -> torch.Tensor:
    """``Σ_{k≥1} start·Âᵏ`` (per node): indirect influence of each node on the ``start`` mix."""
    a_t = _normalised(edges).t().coalesce()
    total = torch.zeros_like(start)
    x = start
    for _ in range(max_steps):
        x = torch.sparse.mm(a_t, x[:, None])[:, 0]
        if not bool(x.abs().max() > 0):
            return total
        total = total + x
    raise RuntimeError("influence did not converge: the graph has a cycle")


def _cumulative_keep(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mask of the highest ``scores`` whose running total stays within ``threshold`` of the
    sum (the first one always kept)."""
    order = torch.argsort(scores, descending=True)
    running = torch.cumsum(scores[order], 0)
    total = running[-1] if running.numel() else torch.tensor(0.0)
    keep_sorted = running <= threshold * total
    if keep_sorted.numel():
        keep_sorted[0] = True
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order] = keep_sorted
    return keep


def prune(
    graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> PruneResult:
    """Prune ``graph`` in place (``kept_nodes``, ``kept_edges``, ``influence``) and return it."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < value <= 1:
            from scalarlens.exceptions import ConfigError

            raise ConfigError(f"prune: {name} must be in (0, 1], got {value}")
    n = len(graph.nodes)
    start = torch.zeros(n, dtype=torch.float64)
    start[graph.objective] = 1.0
    node_influence = influence(graph.edges, start)

    is_component = torch.tensor([node.kind in COMPONENTS for node in graph.nodes])
    keep = ~is_component
    if bool(is_component.any()):
        comp = torch.nonzero(is_component)[:, 0]
        keep[comp[_cumulative_keep(node_influence[comp], node_threshold)]] = True

    a = graph.edges.coalesce()
    rows, cols = a.indices()
    alive = keep[rows] & keep[cols]
    sub = torch.sparse_coo_tensor(
        a.indices()[:, alive], a.values()[alive], a.shape, check_invariants=False
    ).coalesce()
    sub_influence = influence(sub, start)
    normalised = _normalised(sub)
    score = normalised.values() * (sub_influence + start)[normalised.indices()[0]]
    kept = (
        _cumulative_keep(score, edge_threshold)
        if score.numel()
        else torch.zeros(0, dtype=torch.bool)
    )
    kept_index = sub.indices()[:, kept]
    edges = torch.sparse_coo_tensor(
        kept_index, sub.values()[kept], a.shape, check_invariants=False
    ).coalesce()

    # Nodes still connected to the objective through kept edges.
    reach = torch.zeros(n, dtype=torch.bool)
    reach[graph.objective] = True
    for _ in range(n):
        grow = reach.clone()
        targets, sources = kept_index
        grow[sources[reach[targets]]] = True
        if bool((grow == reach).all()):
            break
        reach = grow
    nodes = torch.nonzero(reach)[:, 0].tolist()
    both = reach[kept_index[0]] & reach[kept_index[1]]
    edges = torch.sparse_coo_tensor(
        kept_index[:, both], sub.values()[kept][both], a.shape, check_invariants=False
    )
    edges = edges.coalesce()
    graph.influence, graph.kept_nodes, graph.kept_edges = node_influence, nodes, edges
    graph.settings.update(node_threshold=node_threshold, edge_threshold=edge_threshold)
    return PruneResult(nodes, edges, node_influence)
