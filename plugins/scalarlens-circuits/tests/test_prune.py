"""Influence pruning on hand-made graphs, where every number can be worked out by hand."""

from __future__ import annotations

import pytest
import torch

from scalarlens_circuits import AttributionGraph, Node, find_threshold, influence, prune


def _graph(kinds: list[str], edges: dict[tuple[int, int], float]) -> AttributionGraph:
    nodes = [Node(k, 0, i, 0, 0, 0.0, 0.0, 0.0) for i, k in enumerate(kinds)]
    index = torch.tensor(list(edges)).T
    values = torch.tensor(list(edges.values()), dtype=torch.float64)
    a = torch.sparse_coo_tensor(index, values, (len(kinds), len(kinds))).coalesce()
    return AttributionGraph(
        model="hand",
        tokens=[0],
        token_strings=["x"],
        nodes=nodes,
        edges=a,
        objective=len(kinds) - 1,
        n_layers=1,
        d_mlp=4,
        settings={},
    )


def test_the_threshold_keeps_the_score_that_crosses_it() -> None:
    scores = torch.tensor([0.1, 0.5, 0.4], dtype=torch.float64)
    assert float(find_threshold(scores, 0.8)) == 0.4  # 0.5 + 0.4 ≥ 0.8: both kept
    assert float(find_threshold(scores, 0.5)) == 0.5
    assert float(find_threshold(scores, 1.0)) == 0.1


def test_influence_sums_every_path_of_the_normalised_graph() -> None:
    # 0: embedding → 1, 2: neurons → 3: objective.  Edges A[target, source].
    g = _graph(
        ["embedding", "neuron", "neuron", "objective"],
        {(3, 1): 3.0, (3, 2): -1.0, (1, 0): 2.0, (2, 0): 5.0, (2, 1): 5.0},
    )
    start = torch.tensor([0, 0, 0, 1.0], dtype=torch.float64)
    got = influence(g.edges, start)
    # Row-normalised |A|: objective ← 1: 0.75, ← 2: 0.25; 2 ← 0: 0.5, ← 1: 0.5; 1 ← 0: 1.
    # Node 1: 0.75 direct + 0.25·0.5 via 2; node 0: (0.75 + 0.125)·1 + 0.25·0.5.
    want = torch.tensor([0.875 + 0.125, 0.875, 0.25, 0.0], dtype=torch.float64)
    assert torch.allclose(got, want)


def test_pruning_drops_weak_nodes_and_what_they_leave_dangling() -> None:
    # 1 carries most influence; 2 a little, and 3 feeds only 2.
    kinds = ["embedding", "neuron", "neuron", "neuron", "objective"]
    g = _graph(kinds, {(4, 1): 9.0, (4, 2): 1.0, (2, 3): 1.0, (1, 0): 1.0, (3, 0): 1.0})
    result = prune(g, node_threshold=0.7, edge_threshold=0.99)
    assert result.nodes == [0, 1, 4]  # 2 and 3 fall below the threshold; 3 would dangle anyway
    kept = {tuple(e) for e in result.edges.indices().T.tolist()}
    assert kept == {(4, 1), (1, 0)}
    # Influence: 0 → 1.0, 1 → 0.9, 2 → 0.1, 3 → 0.1 (total 2.1); the cumulative share of the
    # nodes at least as influential is what Neuronpedia's influence field holds.
    assert torch.allclose(
        result.influence, torch.tensor([1.0, 0.9, 0.1, 0.1, 0.0], dtype=torch.float64)
    )
    cumulative = g.cumulative_influence
    assert cumulative is not None
    assert float(cumulative[0]) == pytest.approx(1.0 / 2.1)
    assert float(cumulative[1]) == pytest.approx(1.9 / 2.1)
