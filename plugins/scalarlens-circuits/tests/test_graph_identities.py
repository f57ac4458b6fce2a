"""The graph's exactness on a tiny random float64 GPT-2: the identities it promises."""

from __future__ import annotations

import pytest
import scalarlens
import torch
from conftest import DISTRACTOR, TARGET, TOKENS, random_gpt2
from scalarlens import ActivationLocationType as ALT

from scalarlens_circuits import attribution_graph


@pytest.fixture(scope="module")
def graph():  # type: ignore[no-untyped-def]
    return attribution_graph(
        random_gpt2(), TOKENS, target=TARGET, distractor=DISTRACTOR, max_nodes=60
    )


def _incoming_sum(graph, i: int) -> float:  # type: ignore[no-untyped-def]
    return sum(graph.incoming(i).values())


def test_edges_into_the_objective_sum_to_the_logit_difference(graph) -> None:  # type: ignore[no-untyped-def]
    model = random_gpt2()
    (run,) = model.run([TOKENS], [], None)
    want = float(run.logits[-1, TARGET] - run.logits[-1, DISTRACTOR])
    node = graph.nodes[graph.objective]
    assert node.value == pytest.approx(want, abs=1e-12)
    assert _incoming_sum(graph, graph.objective) + node.bias == pytest.approx(want, abs=1e-9)
    # The error nodes carry what the kept components do not; the graph is not trivially exact.
    errors = [s for s in graph.incoming(graph.objective) if "error" in graph.nodes[s].kind]
    assert errors and any(abs(graph.incoming(graph.objective)[s]) > 1e-6 for s in errors)


def test_each_node_s_incoming_edges_sum_to_its_pre_activation(graph) -> None:  # type: ignore[no-untyped-def]
    model = random_gpt2()
    caps = [
        scalarlens.CaptureRequest(ALT.MLP_PRE_ACT, scalarlens.PassType.FORWARD, [0, 1, 2]),
    ]
    (run,) = model.run([TOKENS], caps, None)
    checked = {"neuron": 0, "head": 0}
    for i, node in enumerate(graph.nodes):
        if node.kind not in checked:
            continue
        total = _incoming_sum(graph, i) + node.bias
        assert total == pytest.approx(node.value, abs=1e-9 * max(1.0, abs(node.value))), (
            graph.label(i)
        )
        if node.kind == "neuron":  # and the value is the captured pre-activation
            captured = run.captured[(ALT.MLP_PRE_ACT, scalarlens.PassType.FORWARD)][node.layer]
            assert node.value == pytest.approx(
                float(captured[node.position, node.index]), abs=1e-12
            )
        checked[node.kind] += 1
    assert checked["neuron"] > 5 and checked["head"] > 5


def test_edges_from_nodes_that_do_not_precede_their_target_are_zero(graph) -> None:  # type: ignore[no-untyped-def]
    a = graph.edges.coalesce()
    for target, source in a.indices().T.tolist():
        t, s = graph.nodes[target], graph.nodes[source]
        assert s.position <= t.position, (graph.label(source), graph.label(target))
        assert s.stage < t.stage
        if t.kind in ("neuron", "objective"):
            assert s.position == t.position  # MLPs and the unembedding read one token
    # ... and a node at a later token has no edge into an earlier one at all.
    later = [i for i, n in enumerate(graph.nodes) if n.position == len(TOKENS) - 1]
    earlier = [i for i, n in enumerate(graph.nodes) if n.kind == "neuron" and n.position == 0]
    for i in earlier:
        assert not set(graph.incoming(i)) & set(later)


def test_head_values_are_their_writes_projected_on_the_gradient(graph) -> None:  # type: ignore[no-untyped-def]
    """Independent of the graph's maths: the per-head write from captures, by autograd."""
    model = random_gpt2()
    fwd, bwd = scalarlens.PassType.FORWARD, scalarlens.PassType.BACKWARD
    caps = [
        scalarlens.CaptureRequest(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, fwd, [0, 1, 2]),
        scalarlens.CaptureRequest(ALT.RESID_DELTA_ATTN, bwd, [0, 1, 2]),
    ]
    objective = scalarlens.LogitDiffObjective(TARGET, DISTRACTOR)
    (run,) = model.run([TOKENS], caps, objective)
    for i, node in enumerate(graph.nodes):
        if node.kind != "head":
            continue
        mixed = run.captured[(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, fwd)][node.layer]
        w_o = model.weight(scalarlens.WeightLocationType.ATTN_TO_RESIDUAL, node.layer)
        g = run.captured[(ALT.RESID_DELTA_ATTN, bwd)][node.layer]
        want = mixed[node.position, node.index] @ w_o[node.index] @ g[node.position]
        assert node.value == pytest.approx(float(want), abs=1e-10), graph.label(i)


def test_every_in_edge_matches_a_finite_difference_of_the_target(graph) -> None:  # type: ignore[no-untyped-def]
    """Perturb one upstream write in the frozen (linearised) model: the target moves by the edge.

    The linearised model is the real one with σ and the attention pattern held: interventions
    detach nothing here; instead the target's pre-activation is recomputed from a residual
    with the write scaled by (1+ε), norm scale and pattern taken from the clean run.
    """
    model = random_gpt2()
    fwd = scalarlens.PassType.FORWARD
    neuron = next(i for i, n in enumerate(graph.nodes) if n.kind == "neuron" and n.layer == 2)
    node = graph.nodes[neuron]
    caps = [
        scalarlens.CaptureRequest(ALT.RESID_POST_ATTN, fwd, [2]),
        scalarlens.CaptureRequest(ALT.MLP_INPUT_LAYER_NORM_SCALE, fwd, [2]),
    ]
    (run,) = model.run([TOKENS], caps, None)
    resid = run.captured[(ALT.RESID_POST_ATTN, fwd)][2][node.position]
    sigma = run.captured[(ALT.MLP_INPUT_LAYER_NORM_SCALE, fwd)][2][node.position]
    block = model.model.block(2)
    w_in, b_in = block.mlp.c_fc.weight[:, node.index], block.mlp.c_fc.bias[node.index]

    def pre(r: torch.Tensor) -> float:
        normed = (r - r.mean()) / sigma * block.ln_2.weight + block.ln_2.bias
        return float(normed @ w_in + b_in)

    builder_rows = _writes(graph, model)
    checked = 0
    for source, weight in graph.incoming(neuron).items():
        write = builder_rows[source]
        eps = 1e-3
        fd = (pre(resid + eps * write) - pre(resid - eps * write)) / (2 * eps)
        assert fd == pytest.approx(weight, rel=1e-7, abs=1e-10), graph.label(source)
        checked += 1
    assert checked > 3


def _writes(graph, model):  # type: ignore[no-untyped-def]
    """Each source node's write vector at its token, recomputed from scratch."""
    fwd = scalarlens.PassType.FORWARD
    layers = list(range(model.dims.n_layers))
    caps = [
        scalarlens.CaptureRequest(ALT.RESID_POST_EMBEDDING, fwd),
        scalarlens.CaptureRequest(ALT.MLP_POST_ACT, fwd, layers),
        scalarlens.CaptureRequest(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, fwd, layers),
        scalarlens.CaptureRequest(ALT.RESID_DELTA_ATTN, fwd, layers),
        scalarlens.CaptureRequest(ALT.RESID_DELTA_MLP, fwd, layers),
    ]
    (run,) = model.run([TOKENS], caps, None)
    out = {}
    W = scalarlens.WeightLocationType
    for i, n in enumerate(graph.nodes):
        if n.kind == "embedding":
            out[i] = run.captured[(ALT.RESID_POST_EMBEDDING, fwd)][None][n.position]
        elif n.kind == "neuron":
            post = run.captured[(ALT.MLP_POST_ACT, fwd)][n.layer][n.position, n.index]
            out[i] = post * model.weight(W.MLP_TO_RESIDUAL, n.layer)[n.index]
        elif n.kind == "head":
            mixed = run.captured[(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, fwd)][n.layer]
            out[i] = mixed[n.position, n.index] @ model.weight(W.ATTN_TO_RESIDUAL, n.layer)[n.index]
        elif n.kind in ("attn_error", "mlp_error"):
            delta_loc = ALT.RESID_DELTA_ATTN if n.kind == "attn_error" else ALT.RESID_DELTA_MLP
            bias = W.ATTN_BIAS_RESIDUAL if n.kind == "attn_error" else W.MLP_BIAS_RESIDUAL
            rest = run.captured[(delta_loc, fwd)][n.layer][n.position] - model.weight(bias, n.layer)
            kind = "head" if n.kind == "attn_error" else "neuron"
            for j, m in enumerate(graph.nodes):
                if m.kind == kind and m.layer == n.layer and m.position == n.position:
                    rest = rest - out[j]
            out[i] = rest
    return out


def test_without_a_target_the_graph_traces_the_top_logits() -> None:
    """circuit-tracer's default: the most probable tokens, each ``logit − mean logit``."""
    from scalarlens_circuits import prune, to_neuronpedia

    model = random_gpt2()
    graph = attribution_graph(model, TOKENS, max_nodes=60, top_logits=4, logit_probability=0.9)
    (run,) = model.run([TOKENS], [], None)
    logits = run.logits[-1]
    probs = torch.softmax(logits, dim=-1)
    order = torch.argsort(probs, descending=True).tolist()
    tokens = [graph.nodes[i].index for i in graph.logit_nodes]
    assert tokens == order[: len(tokens)] and 1 <= len(tokens) <= 4
    weights = torch.tensor(graph.logit_weights, dtype=torch.float64)
    assert torch.allclose(weights, probs[tokens])
    assert len(tokens) == 4 or float(weights.sum()) >= 0.9
    for i, token in zip(graph.logit_nodes, tokens, strict=True):
        node = graph.nodes[i]
        want = float(logits[token] - logits.mean())
        assert node.value == pytest.approx(want, abs=1e-9) and node.activation == pytest.approx(
            want
        )
        assert sum(graph.incoming(i).values()) + node.bias == pytest.approx(want, abs=1e-9)
    prune(graph)
    data = to_neuronpedia(graph)
    logit_nodes = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert [n["is_target_logit"] for n in logit_nodes].count(True) == 1
    top = next(n for n in logit_nodes if n["is_target_logit"])
    assert top["feature"] == order[0] and top["token_prob"] == pytest.approx(float(probs[order[0]]))
