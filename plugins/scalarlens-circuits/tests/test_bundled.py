"""On the bundled induction model: the graph finds the induction circuit.

The prompt is a word sequence and its repeat minus the last word; the model should predict the
word that followed the current word last time.  An induction head at layer 1 attends from the
last token to the token after the previous occurrence of the current token and copies it; a
previous-token head at layer 0 writes "the token before me was X" at that earlier token, which
is what the induction head's key matches.  The graph must show exactly that.
"""

from __future__ import annotations

import pytest
import scalarlens
from scalarlens import ActivationLocationType as ALT
from scalarlens import demo_prompt

from scalarlens_circuits import attribution_graph, prune


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    model = scalarlens.load_model("tiny-induction")
    prompt, target, distractor = demo_prompt()
    # Every neuron and head as a node (17,160 on this model): no error node can hide a source.
    graph = attribution_graph(
        model, prompt, target=target, distractor=distractor, max_nodes=20_000, qk_heads=4
    )
    tokens = model.tokenizer.encode(prompt)
    fwd = scalarlens.PassType.FORWARD
    (run,) = model.run([tokens], [scalarlens.CaptureRequest(ALT.ATTN_QK_PROBS, fwd, [0, 1])])
    probs = run.captured[(ALT.ATTN_QK_PROBS, fwd)]
    return model, graph, tokens, probs


def test_an_induction_head_is_on_the_top_path(setup) -> None:  # type: ignore[no-untyped-def]
    _, graph, tokens, probs = setup
    last = len(tokens) - 1
    previous = max(i for i in range(last) if tokens[i] == tokens[last])  # earlier occurrence
    path = [graph.nodes[i] for i in graph.top_path()]
    heads = [n for n in path if n.kind == "head"]
    assert heads, [graph.label(i) for i in graph.top_path()]
    head = heads[0]
    assert head.layer == 1 and head.position == last
    # It is an induction head: from the last token it attends most to the token after the
    # previous occurrence of the last token.
    assert int(probs[1][last, :, head.index].argmax()) == previous + 1


def test_the_previous_token_head_leads_the_induction_head_s_key_path(setup) -> None:  # type: ignore[no-untyped-def]
    _, graph, tokens, probs = setup
    last = len(tokens) - 1
    induction = next(graph.nodes[i] for i in graph.top_path() if graph.nodes[i].kind == "head")
    node_id = graph.find("head", 1, induction.index, last)
    key_edges = graph.qk_edges[node_id]["k"]
    first = max(key_edges, key=lambda s: abs(key_edges[s]))
    source = graph.nodes[first]
    attended = int(probs[1][last, :, induction.index].argmax())
    assert (source.kind, source.layer, source.position) == ("head", 0, attended), graph.label(first)
    # ... and that layer-0 head is a previous-token head at the attended token.
    assert int(probs[0][attended, :, source.index].argmax()) == attended - 1
    # The key path is not the value path: the query-path edges exist too, and differ.
    assert graph.qk_edges[node_id]["q"] and graph.qk_edges[node_id]["q"] != key_edges


def test_pruning_keeps_the_circuit_and_drops_most_nodes(setup) -> None:  # type: ignore[no-untyped-def]
    _, graph, _, _ = setup
    result = prune(graph)
    path = graph.top_path()
    assert set(path[:2]) <= set(result.nodes)  # the objective and the induction head
    assert len(result.nodes) < len(graph.nodes) / 5
    assert result.edges._nnz() < graph.edges._nnz() / 5
    # Influence is a distribution over what reaches the objective: the head leads the components.
    components = [i for i in result.nodes if graph.nodes[i].kind in ("head", "neuron")]
    assert max(components, key=lambda i: float(graph.influence[i])) == path[1]
