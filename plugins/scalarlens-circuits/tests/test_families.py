"""The graph on every Hugging Face family ``scalarlens-transformers`` supports, float64.

Tiny random models of each family (Llama, Mistral, Qwen2/3, Gemma 2/3 with post-norms and a
final logit soft-cap, GPT-NeoX with a parallel residual, HF GPT-2) are built by the
transformers plugin's own test helper (``tiny_models``), saved, and loaded through
``HFAdapter``.  The graph has no model special cases, so every identity it promises must hold on
each: incoming edges + bias = value for neurons and heads; a neuron's value is the captured
pre-activation (non-gated) or post-activation (gated: ``act(gate)`` frozen); the objective's
edges + bias are the logit difference (before the soft-cap where the model caps); edges only
from preceding nodes; pruning and the top path run; query/key paths trace.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("scalarlens_transformers")
pytest.importorskip("transformers")

import scalarlens
from scalarlens import ActivationLocationType as ALT
from scalarlens import PassType
from scalarlens import WeightLocationType as W

from scalarlens_circuits import attribution_graph, prune

_TINY = Path(__file__).resolve().parents[2] / "scalarlens-transformers" / "tests"
if not (_TINY / "tiny_models.py").is_file():
    pytest.skip(
        "the scalarlens-transformers tests (tiny_models.py) are absent", allow_module_level=True
    )
if str(_TINY) not in sys.path:
    sys.path.append(str(_TINY))

import tiny_models as tm  # noqa: E402
from scalarlens_transformers import _hooks, load_hf_model  # noqa: E402

FWD = PassType.FORWARD
PROMPT = [1, 5, 9, 13, 2, 7, 11, 3]  # longer than the tiny models' sliding windows (4)
TARGET, DISTRACTOR = tm.VOCAB - 2, tm.VOCAB - 1
MAX_NODES = 60
REL = 1e-8
FAMILIES = pytest.mark.parametrize("model_type", tm.FAMILY_KEYS)


def _norm_output(kind: str, module: Any, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``_hooks.norm_output`` without the float32 rounding Hugging Face's RMSNorms do."""
    if kind == "layernorm":
        return HF_NORM_OUTPUT(kind, module, x, scale)
    normed = x / scale
    if kind == "rmsnorm_plus_one":
        return normed * (1.0 + module.weight)
    return module.weight * normed


def _norm_scale(kind: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    if kind == "layernorm":
        return HF_NORM_SCALE(kind, x, eps)
    return torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


HF_NORM_OUTPUT, HF_NORM_SCALE = _hooks.norm_output, _hooks.norm_scale


@pytest.fixture(autouse=True)
def float64_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every RMSNorm in float64.

    Hugging Face's RMSNorms (Llama, Mistral, Qwen, Gemma) compute ``x/σ`` in float32 even in a
    float64 model, and ``HFAdapter`` copies that bit for bit; the graph's linear algebra is
    float64, so on those families its identities would hold only to float32 rounding (~1e-7).
    To check the graph's maths to 1e-8 these tests run the norms in float64;
    ``test_identities_hold_to_float32_rounding_with_hugging_face_s_norms`` runs them as HF does.
    """
    monkeypatch.setattr(_hooks, "norm_output", _norm_output)
    monkeypatch.setattr(_hooks, "norm_scale", _norm_scale)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("circuits-families"))


@cache
def _saved(model_type: str, root: str) -> Path:
    return tm.save(model_type, Path(root) / model_type)


def adapter_for(model_type: str, root: str) -> Any:
    return load_hf_model(f"hf:{_saved(model_type, root)}", dtype=torch.float64)


_graphs: dict[tuple[str, str, int, bool], tuple[Any, Any]] = {}


def graph_for(
    model_type: str, root: str, qk_heads: int = 0, *, hf_norms: bool = False
) -> tuple[Any, Any]:
    """The model and its graph (cached: build it under the same norms as the check runs)."""
    key = (model_type, root, qk_heads, hf_norms)
    if key not in _graphs:
        model = adapter_for(model_type, root)
        graph = attribution_graph(
            model,
            PROMPT,
            target=TARGET,
            distractor=DISTRACTOR,
            max_nodes=MAX_NODES,
            qk_heads=qk_heads,
        )
        _graphs[key] = (model, graph)
    return _graphs[key]


_LIKE_THE_GRAPH = (
    ALT.ATTN_QK_PROBS,
    ALT.ATTN_INPUT_LAYER_NORM_SCALE,
    ALT.MLP_INPUT_LAYER_NORM_SCALE,
    ALT.ATTN_POST_NORM_SCALE,
    ALT.MLP_POST_NORM_SCALE,
)


def run_like_the_graph(
    model: Any, captures: list[Any], objective: Any = None, interventions: Any = ()
) -> Any:
    """``model.run`` taking the code paths the graph's own run takes.

    Capturing the pattern makes attention eager (its softmax rounds to float32, as Hugging
    Face's does; a fused float64 run differs by ~1e-9), and capturing a norm's ``σ`` makes it
    run through ``_hooks.norm_output`` (without, the HF module's own float32 RMSNorm runs).
    """
    layers = list(range(model.dims.n_layers))
    extra = [scalarlens.CaptureRequest(loc, FWD, layers) for loc in _LIKE_THE_GRAPH]
    extra.append(scalarlens.CaptureRequest(ALT.RESID_FINAL_LAYER_NORM_SCALE, FWD))
    return model.run([PROMPT], [*captures, *extra], objective, interventions=interventions)


def _close(got: float, want: float, rel: float = REL) -> bool:
    return abs(got - want) <= rel * max(1.0, abs(want))


def _incoming_sum(graph: Any, i: int) -> float:
    return sum(graph.incoming(i).values())


@FAMILIES
def test_neuron_and_head_identities(model_type: str, root: str) -> None:
    """Incoming edges + bias = value; a neuron's value is captured pre- or post-activation."""
    model, graph = graph_for(model_type, root)
    gated = model.dims.gated_mlp
    layers = list(range(model.dims.n_layers))
    loc = ALT.MLP_POST_ACT if gated else ALT.MLP_PRE_ACT
    (run,) = run_like_the_graph(model, [scalarlens.CaptureRequest(loc, FWD, layers)])
    checked = {"neuron": 0, "head": 0}
    for i, node in enumerate(graph.nodes):
        if node.kind not in checked:
            continue
        total = _incoming_sum(graph, i) + node.bias
        assert _close(total, node.value), (model_type, graph.label(i), total, node.value)
        if node.kind == "neuron":
            captured = float(run.captured[(loc, FWD)][node.layer][node.position, node.index])
            assert _close(node.value, captured, 1e-12), (model_type, graph.label(i))
        checked[node.kind] += 1
    assert checked["neuron"] > 5 and checked["head"] > 5, checked


@FAMILIES
def test_head_values_are_writes_projected_on_the_gradient(model_type: str, root: str) -> None:
    """From captures alone: ``mixed · W_O (· γ/σ post-norm) · ∂J/∂(attention write)``."""
    model, graph = graph_for(model_type, root)
    layers = list(range(model.dims.n_layers))
    caps = [
        scalarlens.CaptureRequest(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, FWD, layers),
        scalarlens.CaptureRequest(ALT.RESID_DELTA_ATTN, PassType.BACKWARD, layers),
        scalarlens.CaptureRequest(ALT.ATTN_POST_NORM_SCALE, FWD, layers),
    ]
    (run,) = run_like_the_graph(model, caps, scalarlens.LogitDiffObjective(TARGET, DISTRACTOR))
    for i, node in enumerate(graph.nodes):
        if node.kind != "head":
            continue
        layer, t = node.layer, node.position
        mixed = run.captured[(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, FWD)][layer][t, node.index]
        write = mixed @ model.weight(W.ATTN_TO_RESIDUAL, layer)[node.index]
        if model.dims.post_norms:
            sigma = run.captured[(ALT.ATTN_POST_NORM_SCALE, FWD)][layer][t]
            write = write * model.weight(W.ATTN_POST_NORM_GAIN, layer) / sigma
        g = run.captured[(ALT.RESID_DELTA_ATTN, PassType.BACKWARD)][layer][t]
        assert _close(node.value, float(write @ g), 1e-10), (model_type, graph.label(i))


def _logits(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pre-cap, model)`` logits at the last token: the unembedded final norm, and the run's."""
    last = model.dims.n_layers - 1
    (run,) = run_like_the_graph(model, [scalarlens.CaptureRequest(ALT.RESID_POST_MLP, FWD, [last])])
    final = run.captured[(ALT.RESID_POST_MLP, FWD)][last][-1]
    return model.final_norm(final) @ model.weight(W.UNEMBEDDING), run.logits[-1]


@FAMILIES
def test_objective_edges_are_the_logit_difference(model_type: str, root: str) -> None:
    """Edges + bias into the objective = its ``value``, the *pre-cap* logit difference.

    Without a soft-cap that is the logit difference the model outputs.  With Gemma's final
    ``c·tanh(l/c)`` the model outputs ``c·tanh(l_t/c) − c·tanh(l_d/c)``: that is the node's
    ``activation``, and the cap is outside the linearisation (as in circuit-tracer, which
    attributes pre-cap logits).
    """
    model, graph = graph_for(model_type, root)
    pre, logits = _logits(model)
    pre_diff = float(pre[TARGET] - pre[DISTRACTOR])
    capped_diff = float(logits[TARGET] - logits[DISTRACTOR])
    node = graph.nodes[graph.objective]
    total = _incoming_sum(graph, graph.objective) + node.bias
    assert _close(total, pre_diff), (model_type, total, pre_diff)
    assert _close(node.value, pre_diff, 1e-12), (model_type, node.value, pre_diff)
    assert _close(node.activation, capped_diff, 1e-12), (model_type, node.activation, capped_diff)
    cap = model.dims.logit_softcap
    if cap is None:
        assert _close(node.activation, node.value, 1e-12)
    else:
        capped = cap * torch.tanh(pre / cap)
        assert _close(node.activation, float(capped[TARGET] - capped[DISTRACTOR]), 1e-12)
        assert abs(node.activation - node.value) > 1e-3  # the cap is live on these logits
    errors = [s for s in graph.incoming(graph.objective) if "error" in graph.nodes[s].kind]
    assert errors and any(abs(graph.incoming(graph.objective)[s]) > 1e-6 for s in errors)


@FAMILIES
def test_edges_only_from_preceding_nodes(model_type: str, root: str) -> None:
    model, graph = graph_for(model_type, root)
    a = graph.edges.coalesce()
    assert a.values().numel() > 0
    parallel = model.dims.parallel_residual
    for target, source in a.indices().T.tolist():
        t, s = graph.nodes[target], graph.nodes[source]
        assert s.position <= t.position, (model_type, graph.label(source), graph.label(target))
        assert s.stage < t.stage, (model_type, graph.label(source), graph.label(target))
        if t.kind in ("neuron", "objective"):
            assert s.position == t.position
        if parallel and t.kind == "neuron":  # the MLP reads the layer's input, not its attention
            assert s.stage < 2 * t.layer + 1, (graph.label(source), graph.label(target))


@FAMILIES
def test_prune_and_top_path(model_type: str, root: str) -> None:
    _, graph = graph_for(model_type, root)
    result = prune(graph)
    assert graph.objective in result.nodes
    assert result.edges.values().numel() > 0
    path = graph.top_path()
    assert path[0] == graph.objective and len(path) >= 2
    assert graph.nodes[path[-1]].kind in ("embedding", "attn_error", "mlp_error")


@FAMILIES
def test_query_and_key_paths(model_type: str, root: str) -> None:
    """``qk_heads > 0`` through ``HFAdapter``'s reconstitution: edges traced, from preceding
    nodes only, and the value-path graph the same as without them."""
    model, graph = graph_for(model_type, root, qk_heads=4)
    assert isinstance(model, scalarlens.Reconstitutable)
    _, plain = graph_for(model_type, root)
    assert torch.equal(graph.edges.indices(), plain.edges.indices())
    assert torch.equal(graph.edges.values(), plain.edges.values())
    assert len(graph.qk_edges) == min(4, sum(n.kind == "head" for n in graph.nodes))
    some = 0
    for node_id, paths in graph.qk_edges.items():
        head = graph.nodes[node_id]
        assert set(paths) == {"q", "k"}
        for path, edges in paths.items():
            for source, weight in edges.items():
                s = graph.nodes[source]
                assert s.stage <= 2 * head.layer and s.position <= head.position
                if path == "q":
                    assert s.position == head.position
                assert torch.isfinite(torch.tensor(weight))
                some += abs(weight) > 1e-8
    assert some > 0


@FAMILIES
def test_identities_hold_to_float32_rounding_with_hugging_face_s_norms(
    model_type: str, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the model really runs (RMSNorm in float32): the identities hold to float32 rounding
    of the norms' output, ~1e-7 relative, and exactly for the LayerNorm families."""
    monkeypatch.undo()  # Hugging Face's norm numerics
    model, graph = graph_for(model_type, root, hf_norms=True)
    rel = 1e-8 if model.dims.norm_kind == "layernorm" else 1e-5
    worst = 0.0
    for i, node in enumerate(graph.nodes):
        if node.kind in ("neuron", "head", "objective"):
            total = _incoming_sum(graph, i) + node.bias
            assert _close(total, node.value, rel), (model_type, graph.label(i), total, node.value)
            worst = max(worst, abs(total - node.value) / max(1.0, abs(node.value)))
    assert worst < rel


@pytest.mark.parametrize("model_type", ["gemma2", "gpt_neox"])
def test_transcoder_features_on_post_norm_and_parallel_models(model_type: str, root: str) -> None:
    """A transcoder's output is ``resid.delta_mlp`` as written (after Gemma's post-norm): an edge
    from a layer-0 latent into a layer-1 latent is ``z·W_dec[0→0]`` (no post-norm factor) times
    the layer-1 latent's read vector, recomputed here by autograd through the adapter.  On a
    parallel-residual model the layer-1 MLP reads the layer's input, before layer-1 attention."""
    sae = pytest.importorskip("scalarlens_sae")
    model = adapter_for(model_type, root)
    dims = model.dims
    tc = sae.random_transcoder(24, dims.d_model, dims.n_layers, seed=2, cross_layer=True)
    graph = attribution_graph(
        model, PROMPT, target=TARGET, distractor=DISTRACTOR, max_nodes=80, transcoder=tc, qk_heads=0
    )
    for i, node in enumerate(graph.nodes):
        if node.kind in ("feature", "head", "objective"):
            assert _close(_incoming_sum(graph, i) + node.bias, node.value), graph.label(i)
    reading = scalarlens.residual_read_by(dims, "mlp", 1)
    first = scalarlens.residual_read_by(dims, "mlp", 0)
    captures = [
        scalarlens.CaptureRequest(loc, FWD, None if at is None else [at])
        for loc, at in (reading, first)
    ]
    (run,) = model.run([PROMPT], captures, None)
    edges = graph.edges.coalesce()
    pairs = [
        (tgt, src)
        for tgt, src in edges.indices().T.tolist()
        if graph.nodes[src].kind == "feature"
        and graph.nodes[src].layer == 0
        and graph.nodes[tgt].kind == "feature"
        and graph.nodes[tgt].layer == 1
    ]
    assert pairs
    x0 = model.sublayer_input(
        run.captured[(first[0], FWD)][first[1]], 0, "mlp", detach_scale=True
    ).detach()
    for tgt, src in pairs[:4]:
        u, n = graph.nodes[src], graph.nodes[tgt]
        resid = run.captured[(reading[0], FWD)][reading[1]].clone().requires_grad_(True)
        z = tc.encode(1, model.sublayer_input(resid, 1, "mlp", detach_scale=True))
        (read,) = torch.autograd.grad(z[n.position, n.index], resid)
        z_u = tc.encode(0, x0)[u.position, u.index]
        want = float(z_u * tc.decoders[(0, 0)][u.index] @ read[n.position])
        # 1e-6: Hugging Face's LayerNorm rounds through float32 in this autograd path (a
        # post-norm factor applied twice, or the wrong residual read, is off by O(1)).
        assert _close(graph.incoming(tgt)[src], want, 1e-6), (model_type, graph.label(src))


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt_neox"])
def test_edge_dsts_match_brute_force(model_type: str, root: str) -> None:
    """The edge DSTs on grouped-query attention (Llama), sandwich post-norms (Gemma 2) and a
    parallel residual (NeoX): a layer-0 neuron's in-edges into layer-1 neurons and its out-edge
    into one layer-1 neuron equal central differences in the real model, with the layer-1
    attention's write, layer 0's MLP post-norm σ and the reading norm's σ held at their values."""
    model = adapter_for(model_type, root)
    objective = scalarlens.LogitDiffObjective(TARGET, DISTRACTOR)
    # The last token: the tiny models have 2 layers, so a layer-1 MLP elsewhere has no gradient.
    t, n, eta = len(PROMPT) - 1, 3, 1e-5
    layers = list(range(model.dims.n_layers))
    holds_at = [(ALT.RESID_DELTA_ATTN, 1), (ALT.MLP_INPUT_LAYER_NORM_SCALE, 1)]
    if model.dims.post_norms:
        holds_at.append((ALT.MLP_POST_NORM_SCALE, 0))
    caps = [scalarlens.CaptureRequest(loc, FWD, [layer]) for loc, layer in holds_at]
    caps.append(scalarlens.CaptureRequest(ALT.MLP_POST_ACT, PassType.BACKWARD, layers))
    (clean,) = run_like_the_graph(model, caps, objective)
    grads = clean.captured[(ALT.MLP_POST_ACT, PassType.BACKWARD)][1]

    def hold(loc: Any, layer: int) -> scalarlens.Intervention:
        value = clean.captured[(loc, FWD)][layer]
        return scalarlens.Intervention(loc, lambda v, _: value.unsqueeze(0).expand_as(v), [layer])

    def scale(factor: float) -> scalarlens.Intervention:
        def fn(v: torch.Tensor, _: Any) -> torch.Tensor:
            v = v.clone()
            v[:, t, n] = v[:, t, n] * factor
            return v

        return scalarlens.Intervention(ALT.MLP_POST_ACT, fn, [0])

    def post_after(factor: float) -> torch.Tensor:
        capture = [scalarlens.CaptureRequest(ALT.MLP_POST_ACT, FWD, [1])]
        interventions = [*(hold(loc, layer) for loc, layer in holds_at), scale(factor)]
        (run,) = run_like_the_graph(model, capture, None, interventions)
        post: torch.Tensor = run.captured[(ALT.MLP_POST_ACT, FWD)][1]
        return post

    fd = (post_after(1 + eta) - post_after(1 - eta)) / (2 * eta) * grads  # T×F
    upstream = {"kind": "neuron", "layer": 0, "token": t, "index": n}
    config = scalarlens.DstConfig(options={"circuits": {"node": upstream}})
    store = scalarlens.derive(
        model, PROMPT, ["edge.mlp_in_attribution"], config=config, objective=objective
    )
    got = store.get("edge.mlp_in_attribution", 1)
    assert torch.allclose(got[t], fd[t], rtol=1e-5, atol=1e-8), model_type
    assert got[t].abs().max() > 0 and got[:t].abs().max() == 0

    m = int(fd[t].abs().argmax())  # the downstream neuron this upstream one moves most
    downstream = {"kind": "neuron", "layer": 1, "token": t, "index": m}
    config = scalarlens.DstConfig(options={"circuits": {"node": downstream}})
    store = scalarlens.derive(
        model, PROMPT, ["edge.mlp_out_attribution"], config=config, objective=objective
    )
    out_edge = float(store.get("edge.mlp_out_attribution", 0)[t, n])
    assert _close(out_edge, float(fd[t, m]), 1e-5), (model_type, out_edge, float(fd[t, m]))
