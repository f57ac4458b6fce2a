"""Transcoder features as graph nodes (a cross-layer transcoder from scalarlens-sae, by shape:
the circuits plugin never imports it), on the tiny random float64 GPT-2."""

from __future__ import annotations

import json

import pytest
import scalarlens
import torch
from conftest import DISTRACTOR, TARGET, TOKENS, random_gpt2
from scalarlens import ActivationLocationType as ALT

from scalarlens_circuits import attribution_graph, prune, to_neuronpedia

sae = pytest.importorskip("scalarlens_sae")
FWD = scalarlens.PassType.FORWARD
N_LATENTS = 40  # more than the MLP's 32 neurons: head ids must move past the latents


@pytest.fixture(scope="module", params=[True, False], ids=["clt", "plt"])
def setup(request):  # type: ignore[no-untyped-def]
    model = random_gpt2()
    tc = sae.random_transcoder(N_LATENTS, 16, 3, seed=1, cross_layer=request.param)
    graph = attribution_graph(
        model, TOKENS, target=TARGET, distractor=DISTRACTOR, max_nodes=80, transcoder=tc
    )
    return model, tc, graph


def _normalised_mlp_input(model, layer: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    caps = [scalarlens.CaptureRequest(ALT.RESID_POST_ATTN, FWD, [layer])]
    (run,) = model.run([TOKENS], caps, None)
    resid = run.captured[(ALT.RESID_POST_ATTN, FWD)][layer]
    return model.sublayer_input(resid, layer, "mlp")


def test_features_replace_neurons_and_keep_every_identity(setup) -> None:  # type: ignore[no-untyped-def]
    model, tc, graph = setup
    kinds = {n.kind for n in graph.nodes}
    assert "feature" in kinds and "neuron" not in kinds  # every MLP is written by the transcoder
    checked = 0
    for i, node in enumerate(graph.nodes):
        if node.kind not in ("feature", "head", "objective"):
            continue
        total = sum(graph.incoming(i).values()) + node.bias
        assert total == pytest.approx(node.value, abs=1e-9 * max(1.0, abs(node.value))), (
            graph.label(i)
        )
        if node.kind == "feature":  # the value is the transcoder's own latent, recomputed here
            z = tc.encode(node.layer, _normalised_mlp_input(model, node.layer))
            assert node.value == pytest.approx(float(z[node.position, node.index]), abs=1e-12)
            assert node.value > 0  # only active latents are nodes worth keeping
            checked += 1
    assert checked > 5
    # The objective is still exact: the error nodes carry what the transcoder misses.
    (run,) = model.run([TOKENS], [], None)
    want = float(run.logits[-1, TARGET] - run.logits[-1, DISTRACTOR])
    objective = graph.nodes[graph.objective]
    assert sum(graph.incoming(graph.objective).values()) + objective.bias == pytest.approx(
        want, abs=1e-9
    )


def test_an_edge_carries_each_write_that_precedes_its_target(setup) -> None:  # type: ignore[no-untyped-def]
    """A cross-layer latent at layer 0 writes at layers 0, 1 and 2; a layer-2 latent reads the
    residual after layer 1, so the edge between them carries the writes to layers 0 and 1
    (a per-layer transcoder's latent writes at its own layer only).  Recomputed by autograd."""
    model, tc, graph = setup
    edges = graph.edges.coalesce()
    pairs = [
        (int(tgt), int(src))
        for tgt, src in edges.indices().T.tolist()
        if graph.nodes[src].kind == "feature"
        and graph.nodes[src].layer == 0
        and graph.nodes[tgt].kind == "feature"
        and graph.nodes[tgt].layer == 2
    ]
    assert pairs
    for target, source in pairs[:5]:
        u, n = graph.nodes[source], graph.nodes[target]
        caps = [scalarlens.CaptureRequest(ALT.RESID_POST_ATTN, FWD, [2])]
        (run,) = model.run([TOKENS], caps, None)
        resid = run.captured[(ALT.RESID_POST_ATTN, FWD)][2].clone().requires_grad_(True)
        z = tc.encode(2, model.sublayer_input(resid, 2, "mlp", detach_scale=True))
        (read,) = torch.autograd.grad(z[n.position, n.index], resid)
        x0 = _normalised_mlp_input(model, 0)
        z_u = tc.encode(0, x0)[u.position, u.index]
        write = sum(z_u * tc.decoders[(0, t)][u.index] for t in (0, 1) if (0, t) in tc.decoders)
        want = float(write @ read[n.position])
        assert graph.incoming(target)[source] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert ((0, 1) in tc.decoders) == tc.cross_layer


def test_json_ids_stay_unique_with_wide_transcoders(setup) -> None:  # type: ignore[no-untyped-def]
    _, _, graph = setup
    prune(graph)
    data = json.loads(json.dumps(to_neuronpedia(graph)))
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))
    types = {n["feature_type"] for n in data["nodes"]}
    assert "cross layer transcoder" in types
    heads = [n for n in data["nodes"] if n["feature_type"] == "attention head"]
    assert all(n["feature"] >= N_LATENTS for n in heads)


def test_a_transcoder_without_the_right_shape_is_refused() -> None:
    with pytest.raises(
        scalarlens.ModelInputError, match="object has no 'layers'; pass a transcoder with layers"
    ):
        attribution_graph(random_gpt2(), TOKENS, target=TARGET, transcoder=object(), max_nodes=4)
