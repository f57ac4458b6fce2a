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

__all__ = ["PruneResult", "find_threshold", "influence", "prune"]

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
    return _series(_normalised(edges), start, max_steps)


def _series(normalised: torch.Tensor, start: torch.Tensor, max_steps: int = 10_000) -> torch.Tensor:
    """The Neumann series of an already normalised adjacency ``Â``."""
    a_t = normalised.t().coalesce()
    total = torch.zeros_like(start)
    x = start
    for _ in range(max_steps):
        x = torch.sparse.mm(a_t, x[:, None])[:, 0]
        if not bool(x.abs().max() > 0):
            return total
        total = total + x
    from scalarlens.exceptions import ConfigError

    raise ConfigError("influence did not converge: the graph has a cycle (edges must go forward)")


def find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The smallest score to keep so the kept scores carry at least ``threshold`` of the total:
    sort descending, and take the score where the running fraction first reaches the threshold
    (circuit-tracer's rule — the score that crosses it is kept)."""
    if scores.numel() == 0:
        return torch.tensor(0.0, dtype=scores.dtype)
    ordered = torch.sort(scores, descending=True).values
    total = ordered.sum()
    if not bool(total > 0):
        return ordered[0]
    fraction = torch.cumsum(ordered, 0) / total
    at = int(torch.searchsorted(fraction, torch.tensor(threshold, dtype=fraction.dtype)))
    return ordered[min(at, ordered.numel() - 1)]


def prune(
    graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> PruneResult:
    """Prune ``graph`` in place (``kept_nodes``, ``kept_edges``, ``influence``) and return it.

    As circuit-tracer: keep the nodes whose influence on the objective reaches
    ``node_threshold`` of the total (embeddings and the objective always), score the edges
    among them by ``Â[t,s]·(influence[t] + objective weight[t])`` and keep those reaching
    ``edge_threshold``; then, repeatedly, drop components and error nodes with no kept outgoing
    edge and components with no kept incoming edge.  ``graph.influence`` is each node's
    influence on the objective; ``graph.cumulative_influence`` the share of the total carried by
    the nodes at least as influential as it (Neuronpedia's ``influence`` field).
    """
    from scalarlens.exceptions import ConfigError

    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < value <= 1:
            raise ConfigError(f"prune: {name} must be in (0, 1], got {value}")
    n = len(graph.nodes)
    start = torch.zeros(n, dtype=torch.float64)
    for node, weight in zip(
        graph.logit_nodes or [graph.objective], graph.logit_weights or [1.0], strict=True
    ):
        start[node] = weight
    node_influence = influence(graph.edges, start)

    kinds = [node.kind for node in graph.nodes]
    always = torch.tensor([k in ("embedding", "objective") for k in kinds])
    component = torch.tensor([k in COMPONENTS for k in kinds])
    keep = (node_influence >= find_threshold(node_influence, node_threshold)) | always

    a = graph.edges.coalesce()
    rows, cols = a.indices()
    alive = keep[rows] & keep[cols]
    sub = torch.sparse_coo_tensor(
        a.indices()[:, alive], a.values()[alive], a.shape, check_invariants=False
    ).coalesce()
    normalised = _normalised(sub)  # once, for both the series and the edge scores
    score = normalised.values() * (_series(normalised, start) + start)[normalised.indices()[0]]
    kept = score >= find_threshold(score, edge_threshold)
    targets, sources = normalised.indices()

    # Drop what no longer connects: nodes (not embeddings) with no outgoing kept edge, and
    # components with no incoming one, until nothing changes.
    while True:
        kept = kept & keep[targets] & keep[sources]
        has_out = torch.zeros(n, dtype=torch.bool)
        has_out[sources[kept]] = True
        has_in = torch.zeros(n, dtype=torch.bool)
        has_in[targets[kept]] = True
        new = keep & (always | has_out) & (~component | has_in)
        if bool((new == keep).all()):
            break
        keep = new
    edges = torch.sparse_coo_tensor(
        normalised.indices()[:, kept], sub.values()[kept], a.shape, check_invariants=False
    ).coalesce()
    nodes = torch.nonzero(keep)[:, 0].tolist()
    order = torch.argsort(node_influence, descending=True)
    cumulative = torch.zeros_like(node_influence)
    total = node_influence.sum()
    if bool(total > 0):
        cumulative[order] = torch.cumsum(node_influence[order], 0) / total
    graph.influence, graph.kept_nodes, graph.kept_edges = node_influence, nodes, edges
    graph.cumulative_influence = cumulative
    graph.settings.update(node_threshold=node_threshold, edge_threshold=edge_threshold)
    return PruneResult(nodes, edges, node_influence)
