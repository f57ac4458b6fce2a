"""Edge DSTs against brute force in the real model (float64, tiny random GPT-2).

The oracle never uses reconstitution: it perturbs one upstream write inside an ordinary run
(an intervention scaling one neuron by 1+η), holds fixed everything the edge's linearisation
holds fixed (the other sublayers between the two nodes, the reading norm's σ, the attention
inputs off the traced path — each by an intervention returning its clean value), and takes a
central difference of the downstream node's attribution ``act·∇act``.
"""

from __future__ import annotations

from typing import Any

import pytest
import scalarlens
import torch
from conftest import DISTRACTOR, TARGET, TOKENS, random_gpt2
from scalarlens import ActivationLocationType as ALT
from scalarlens import CaptureRequest, DstConfig, Intervention, PassType

FWD, BWD = PassType.FORWARD, PassType.BACKWARD
T = len(TOKENS)
OBJECTIVE = scalarlens.LogitDiffObjective(TARGET, DISTRACTOR)
ETA = 1e-5


def _config(node: dict[str, Any], detach: bool = True) -> DstConfig:
    return DstConfig(options={"circuits": {"node": node, "detach_norm_scale": detach}})


def _derive(model: Any, dsts: list[str], node: dict[str, Any], detach: bool = True) -> Any:
    return scalarlens.derive(
        model, TOKENS, dsts, config=_config(node, detach), target=TARGET, distractor=DISTRACTOR
    )


def _clean(model: Any, requests: list[tuple[ALT, int]]) -> dict[tuple[ALT, int], torch.Tensor]:
    caps = [CaptureRequest(loc, FWD, [layer]) for loc, layer in requests]
    (run,) = model.run([TOKENS], caps, OBJECTIVE)
    return {(loc, layer): run.captured[(loc, FWD)][layer] for loc, layer in requests}


def _hold(location: ALT, layer: int, value: torch.Tensor) -> Intervention:
    return Intervention(
        location, lambda v, _: value.unsqueeze(0).expand_as(v), [layer], name="hold"
    )


def _scale_neuron(layer: int, t: int, n: int, factor: float) -> Intervention:
    def fn(v: torch.Tensor, _: Any) -> torch.Tensor:
        v = v.clone()
        v[:, t, n] = v[:, t, n] * factor
        return v

    return Intervention(ALT.MLP_POST_ACT, fn, [layer], name="scale")


def _attribution_after(
    model: Any,
    interventions: list[Intervention],
    location: ALT,
    layer: int,
    index: tuple[int, ...],
    grad: float,
) -> float:
    (run,) = model.run(
        [TOKENS], [CaptureRequest(location, FWD, [layer])], None, interventions=interventions
    )
    return float(run.captured[(location, FWD)][layer][index]) * grad


def _grad_at(model: Any, location: ALT, layer: int) -> torch.Tensor:
    (run,) = model.run([TOKENS], [CaptureRequest(location, BWD, [layer])], OBJECTIVE)
    grad: torch.Tensor = run.captured[(location, BWD)][layer]
    return grad


@pytest.mark.parametrize("kind", ["attribution", "activation"])
def test_out_edges_into_a_neuron_match_brute_force(kind: str) -> None:
    """Many → one: the edge from each layer-0/1 neuron at the token into neuron N at layer 2
    (its attribution act·∇act, or its activation alone for the *_activation twin)."""
    model = random_gpt2()
    t, n = T - 1, 7
    node = {"kind": "neuron", "layer": 2, "token": t, "index": n}
    name = f"edge.mlp_out_{kind}"
    store = _derive(model, [name], node)
    grad = float(_grad_at(model, ALT.MLP_POST_ACT, 2)[t, n]) if kind == "attribution" else 1.0
    clean = _clean(
        model,
        [
            (ALT.RESID_DELTA_ATTN, 1),
            (ALT.RESID_DELTA_ATTN, 2),
            (ALT.RESID_DELTA_MLP, 1),
            (ALT.MLP_INPUT_LAYER_NORM_SCALE, 2),
        ],
    )
    checked = 0
    for upstream, held in ((0, [(ALT.RESID_DELTA_ATTN, 1), (ALT.RESID_DELTA_MLP, 1)]), (1, [])):
        held = [*held, (ALT.RESID_DELTA_ATTN, 2), (ALT.MLP_INPUT_LAYER_NORM_SCALE, 2)]
        holds = [_hold(loc, layer, clean[(loc, layer)]) for loc, layer in held]
        edges = store.get(name, upstream)
        for m in (0, 3, 11):
            up = _attribution_after(
                model,
                [*holds, _scale_neuron(upstream, t, m, 1 + ETA)],
                ALT.MLP_POST_ACT,
                2,
                (t, n),
                grad,
            )
            down = _attribution_after(
                model,
                [*holds, _scale_neuron(upstream, t, m, 1 - ETA)],
                ALT.MLP_POST_ACT,
                2,
                (t, n),
                grad,
            )
            fd = (up - down) / (2 * ETA)
            assert float(edges[t, m]) == pytest.approx(fd, rel=1e-6, abs=1e-9), (upstream, m)
            checked += 1
    assert checked == 6
    # Causal zeroing: layer 2's own MLP and every other token contribute nothing.
    assert store.get(name, 2).abs().max() == 0
    assert store.get(name, 0)[:t].abs().max() == 0


def test_in_edges_from_a_neuron_match_brute_force() -> None:
    """One → many: neuron U at layer 0 into each layer-1 neuron and each layer-1 head's key path."""
    model = random_gpt2()
    t, n = 3, 5
    node = {"kind": "neuron", "layer": 0, "token": t, "index": n}
    store = _derive(model, ["edge.mlp_in_attribution", "edge.attn_key_in_attribution"], node)
    clean = _clean(
        model,
        [
            (ALT.RESID_DELTA_ATTN, 1),
            (ALT.MLP_INPUT_LAYER_NORM_SCALE, 1),
            (ALT.ATTN_INPUT_LAYER_NORM_SCALE, 1),
            (ALT.ATTN_QUERY, 1),
            (ALT.ATTN_VALUE, 1),
        ],
    )

    def fd(holds: list[Intervention], location: ALT, index: tuple[int, ...], grad: float) -> float:
        up = _attribution_after(
            model, [*holds, _scale_neuron(0, t, n, 1 + ETA)], location, 1, index, grad
        )
        down = _attribution_after(
            model, [*holds, _scale_neuron(0, t, n, 1 - ETA)], location, 1, index, grad
        )
        return (up - down) / (2 * ETA)

    mlp_holds = [
        _hold(ALT.RESID_DELTA_ATTN, 1, clean[(ALT.RESID_DELTA_ATTN, 1)]),
        _hold(ALT.MLP_INPUT_LAYER_NORM_SCALE, 1, clean[(ALT.MLP_INPUT_LAYER_NORM_SCALE, 1)]),
    ]
    grads = _grad_at(model, ALT.MLP_POST_ACT, 1)
    edges = store.get("edge.mlp_in_attribution", 1)
    for m in (1, 8, 20):
        want = fd(mlp_holds, ALT.MLP_POST_ACT, (t, m), float(grads[t, m]))
        assert float(edges[t, m]) == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert edges[:t].abs().max() == 0 and edges[t + 1 :].abs().max() == 0  # only U's token

    key_holds = [
        _hold(loc, 1, clean[(loc, 1)])
        for loc in (ALT.ATTN_INPUT_LAYER_NORM_SCALE, ALT.ATTN_QUERY, ALT.ATTN_VALUE)
    ]
    pgrads = _grad_at(model, ALT.ATTN_QK_PROBS, 1)
    key_edges = store.get("edge.attn_key_in_attribution", 1)
    # (q, s, h): the key at t changes every probability in the rows that can see it (softmax
    # couples a row), so columns other than t move too.
    for q, s, h in ((t, t, 0), (T - 1, t, 2), (5, t, 3), (T - 1, 1, 2)):
        want = fd(key_holds, ALT.ATTN_QK_PROBS, (q, s, h), float(pgrads[q, s, h]))
        assert float(key_edges[q, s, h]) == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert key_edges[:t].abs().max() == 0  # queries before t never see U's token
    assert key_edges[t:].abs().max() > 0
    # Nothing at layer 0: U does not precede its own layer's attention or MLP.
    assert store.get("edge.mlp_in_attribution", 0).abs().max() == 0


def test_query_and_value_in_edges_match_brute_force() -> None:
    """One → many through the other two attention paths (the key path is tested above)."""
    model = random_gpt2()
    t, n = 3, 5
    node = {"kind": "neuron", "layer": 0, "token": t, "index": n}
    names = ["edge.attn_query_in_attribution", "edge.attn_value_in_attribution"]
    store = _derive(model, names, node)
    clean = _clean(
        model,
        [
            (ALT.ATTN_INPUT_LAYER_NORM_SCALE, 1),
            (ALT.ATTN_QUERY, 1),
            (ALT.ATTN_KEY, 1),
            (ALT.ATTN_VALUE, 1),
        ],
    )
    sigma = _hold(ALT.ATTN_INPUT_LAYER_NORM_SCALE, 1, clean[(ALT.ATTN_INPUT_LAYER_NORM_SCALE, 1)])

    def perturbed(holds: list[Intervention], location: ALT, sign: float) -> torch.Tensor:
        caps = [CaptureRequest(location, FWD, [1])]
        (run,) = model.run(
            [TOKENS], caps, None, interventions=[*holds, _scale_neuron(0, t, n, 1 + sign * ETA)]
        )
        out: torch.Tensor = run.captured[(location, FWD)][1]
        return out

    # Query path: keys and values held; only row t's probabilities move.
    holds = [sigma, *(_hold(loc, 1, clean[(loc, 1)]) for loc in (ALT.ATTN_KEY, ALT.ATTN_VALUE))]
    pgrads = _grad_at(model, ALT.ATTN_QK_PROBS, 1)
    up = perturbed(holds, ALT.ATTN_QK_PROBS, 1.0)
    down = perturbed(holds, ALT.ATTN_QK_PROBS, -1.0)
    want = (up - down) / (2 * ETA) * pgrads
    got = store.get("edge.attn_query_in_attribution", 1)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)
    assert got[t].abs().max() > 0 and got[:t].abs().max() == 0 and got[t + 1 :].abs().max() == 0

    # Value path: queries and keys held, so the pattern is fixed and only v at token t moves;
    # f[q,s,h] = p[q,s,h]·(v[s,h]·∇o[q,h]).
    holds = [sigma, *(_hold(loc, 1, clean[(loc, 1)]) for loc in (ALT.ATTN_QUERY, ALT.ATTN_KEY))]
    probs = _clean(model, [(ALT.ATTN_QK_PROBS, 1)])[(ALT.ATTN_QK_PROBS, 1)]
    go = _grad_at(model, ALT.ATTN_WEIGHTED_SUM_OF_VALUES, 1)
    dv = (perturbed(holds, ALT.ATTN_VALUE, 1.0) - perturbed(holds, ALT.ATTN_VALUE, -1.0)) / (
        2 * ETA
    )
    want = probs * torch.einsum("shd,qhd->qsh", dv, go)
    got = store.get("edge.attn_value_in_attribution", 1)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)
    columns = torch.ones(T, dtype=torch.bool)
    columns[t] = False
    assert got[:, t].abs().max() > 0 and got[:, columns].abs().max() == 0


def test_reconstituted_read_vector_equals_the_real_backward() -> None:
    """edge.node_activation_residual_grad == ∂act/∂residual from a real backward pass (σ held)."""
    model = random_gpt2()
    t, n = T - 1, 4
    for detach in (True, False):
        store = _derive(
            model,
            ["edge.node_activation_residual_grad"],
            {"kind": "neuron", "layer": 1, "token": t, "index": n},
            detach,
        )
        objective = scalarlens.NodeObjective(ALT.MLP_POST_ACT, 1, (t, n))
        holds = (
            [Intervention(ALT.MLP_INPUT_LAYER_NORM_SCALE, lambda v, _: v.detach(), [1])]
            if detach
            else []
        )
        (run,) = model.run(
            [TOKENS],
            [CaptureRequest(ALT.RESID_POST_ATTN, BWD, [1])],
            objective,
            interventions=holds,
        )
        want = run.captured[(ALT.RESID_POST_ATTN, BWD)][1]
        got = store.get("edge.node_activation_residual_grad")
        assert torch.allclose(got, want, atol=1e-12), detach


def test_node_write_is_a_slice_of_the_builtin_writes() -> None:
    model = random_gpt2()
    t = 4
    neuron = _derive(
        model, ["edge.node_write"], {"kind": "neuron", "layer": 1, "token": t, "index": 9}
    )
    head = _derive(
        model,
        ["edge.node_write"],
        {"kind": "head", "layer": 2, "token": t, "index": 1, "key_token": 2},
    )
    builtin = scalarlens.derive(model, TOKENS, ["mlp.write", "attn.write"])
    w = neuron.get("edge.node_write")
    assert torch.allclose(w[t], builtin.get("mlp.write", 1)[t, 9], atol=1e-13)
    assert w[:t].abs().max() == 0 and w[t + 1 :].abs().max() == 0
    assert torch.allclose(
        head.get("edge.node_write")[t], builtin.get("attn.write", 2)[t, 2, 1], atol=1e-13
    )


def test_token_write_is_the_logit_change_along_the_write() -> None:
    model = random_gpt2()
    t = T - 1
    store = _derive(
        model,
        ["node.token_write", "edge.node_write"],
        {"kind": "neuron", "layer": 2, "token": t, "index": 2},
    )
    write = store.get("edge.node_write")[t]
    (run,) = model.run([TOKENS], [CaptureRequest(ALT.RESID_POST_MLP, FWD, [2])], None)
    resid = run.captured[(ALT.RESID_POST_MLP, FWD)][2][t]
    _, change = torch.func.jvp(
        lambda r: model.logits_from_final_residual(r, detach_ln_scale=True), (resid,), (write,)
    )
    got = store.get("node.token_write")
    assert torch.allclose(got[t], change - change.mean(), atol=1e-12)
    assert got[:t].abs().max() == 0


def test_a_bad_node_names_the_valid_range() -> None:
    model = random_gpt2()
    with pytest.raises(scalarlens.ModelInputError, match=r"index = 99 .*32 neurons: valid 0\.\.31"):
        _derive(model, ["edge.node_write"], {"kind": "neuron", "layer": 1, "token": 0, "index": 99})
    with pytest.raises(
        scalarlens.ConfigError,
        match=r"edge.node_write: .*StaticLayerIndexer\(5\) points outside the model's 3 layers",
    ):
        _derive(model, ["edge.node_write"], {"kind": "neuron", "layer": 5, "token": 0, "index": 1})
    with pytest.raises(scalarlens.ConfigError, match="needs a path"):
        _derive(
            model,
            ["edge.mlp_out_attribution"],
            {"kind": "head", "layer": 1, "token": 0, "index": 1},
        )
    with pytest.raises(scalarlens.ConfigError, match="needs a node"):
        scalarlens.derive(model, TOKENS, ["edge.node_write"])


def test_a_head_activation_needs_one_probability() -> None:
    """Σ_s p = 1 has no read vector, and the value path has no scalar activation: refused."""
    model = random_gpt2()
    for node in (
        {"kind": "head", "layer": 1, "token": -1, "index": 0, "path": "k"},
        {"kind": "head", "layer": 1, "token": -1, "index": 0, "path": "v", "key_token": 1},
    ):
        with pytest.raises(scalarlens.ConfigError, match="one attention probability"):
            _derive(model, ["node.token_read"], node)
    ok = {"kind": "head", "layer": 1, "token": -1, "index": 0, "path": "k", "key_token": 2}
    read = _derive(model, ["edge.node_activation_residual_grad"], ok)
    grad = read.get("edge.node_activation_residual_grad")
    assert grad[2].abs().max() > 0  # the key token's residual moves that probability


def test_head_pair_and_embedding_out_edges_match_brute_force() -> None:
    """Many → one from a head at a token pair and from an embedding, into a layer-1 neuron."""
    model = random_gpt2()
    t, n = T - 1, 3
    node = {"kind": "neuron", "layer": 1, "token": t, "index": n}
    store = _derive(model, ["edge.attn_out_attribution", "edge.token_out_attribution"], node)
    grad = float(_grad_at(model, ALT.MLP_POST_ACT, 1)[t, n])
    clean = _clean(
        model,
        [(ALT.RESID_DELTA_MLP, 0), (ALT.RESID_DELTA_ATTN, 1), (ALT.MLP_INPUT_LAYER_NORM_SCALE, 1)],
    )
    holds = [_hold(loc, layer, clean[(loc, layer)]) for loc, layer in clean]

    def scale_value(s: int, h: int, factor: float) -> Intervention:
        def fn(v: torch.Tensor, _: Any) -> torch.Tensor:
            v = v.clone()
            v[:, s, h] = v[:, s, h] * factor
            return v

        return Intervention(ALT.ATTN_VALUE, fn, [0], name="scale v")

    edges = store.get("edge.attn_out_attribution", 0)
    for s, h in ((t, 0), (2, 1), (0, 3)):
        up = _attribution_after(
            model, [*holds, scale_value(s, h, 1 + ETA)], ALT.MLP_POST_ACT, 1, (t, n), grad
        )
        down = _attribution_after(
            model, [*holds, scale_value(s, h, 1 - ETA)], ALT.MLP_POST_ACT, 1, (t, n), grad
        )
        assert float(edges[t, s, h]) == pytest.approx((up - down) / (2 * ETA), rel=1e-6, abs=1e-9)
    assert edges[:t].abs().max() == 0  # other query tokens do not write into token t

    emb_holds = [
        *holds,
        _hold(
            ALT.RESID_DELTA_ATTN,
            0,
            _clean(model, [(ALT.RESID_DELTA_ATTN, 0)])[(ALT.RESID_DELTA_ATTN, 0)],
        ),
    ]

    def scale_embedding(factor: float) -> Intervention:
        def fn(x: torch.Tensor, _: Any) -> torch.Tensor:
            x = x.clone()
            x[:, t] = x[:, t] * factor
            return x

        return Intervention(ALT.RESID_POST_EMBEDDING, fn, None, name="scale embedding")

    up = _attribution_after(
        model, [*emb_holds, scale_embedding(1 + ETA)], ALT.MLP_POST_ACT, 1, (t, n), grad
    )
    down = _attribution_after(
        model, [*emb_holds, scale_embedding(1 - ETA)], ALT.MLP_POST_ACT, 1, (t, n), grad
    )
    tokens = store.get("edge.token_out_attribution")
    assert float(tokens[t, 0]) == pytest.approx((up - down) / (2 * ETA), rel=1e-6, abs=1e-9)


def test_activation_twins_are_the_attributions_without_the_gradient() -> None:
    """For a neuron N, f_N = act_N·∇act_N with ∇ held: every attribution edge is its
    activation twin times that one gradient; in-edges likewise, element by element."""
    model = random_gpt2()
    t, n = T - 1, 6
    into = {"kind": "neuron", "layer": 2, "token": t, "index": n}
    names = [
        "edge.node_attribution_grad",
        "edge.node_activation_residual_grad",
        "edge.mlp_out_attribution",
        "edge.mlp_out_activation",
        "edge.attn_out_attribution",
        "edge.attn_out_activation",
        "edge.token_out_attribution",
        "edge.token_out_activation",
    ]
    store = _derive(model, names, into)
    g = float(_grad_at(model, ALT.MLP_POST_ACT, 2)[t, n])
    pairs = [("node_attribution_grad", "node_activation_residual_grad", None)]
    pairs += [(f"{k}_out_attribution", f"{k}_out_activation", 0) for k in ("mlp", "attn")]
    pairs += [("token_out_attribution", "token_out_activation", None)]
    for attribution, activation, layer in pairs:
        a = store.get(f"edge.{attribution}", layer)
        b = store.get(f"edge.{activation}", layer)
        assert torch.allclose(a, g * b, atol=1e-13) and b.abs().max() > 0, attribution

    from_ = {"kind": "neuron", "layer": 0, "token": 2, "index": 4}
    names = [
        "edge.mlp_in_attribution",
        "edge.mlp_in_activation",
        "edge.attn_query_in_attribution",
        "edge.attn_query_in_activation",
        "edge.attn_key_in_attribution",
        "edge.attn_key_in_activation",
    ]
    store = _derive(model, names, from_)
    grads = {
        "mlp": _grad_at(model, ALT.MLP_POST_ACT, 1),
        "attn": _grad_at(model, ALT.ATTN_QK_PROBS, 1),
    }
    for kind in ("mlp", "attn_query", "attn_key"):
        a = store.get(f"edge.{kind}_in_attribution", 1)
        b = store.get(f"edge.{kind}_in_activation", 1)
        grad = grads["mlp" if kind == "mlp" else "attn"]
        assert torch.allclose(a, b * grad, atol=1e-13) and b.abs().max() > 0, kind


def test_direct_edge_to_the_objective_is_the_builtin_direct_effect() -> None:
    model = random_gpt2()
    t, n = 4, 13
    store = _derive(
        model,
        ["edge.node_write_to_final_residual_grad"],
        {"kind": "neuron", "layer": 1, "token": t, "index": n},
    )
    builtin = scalarlens.derive(
        model, TOKENS, ["mlp.write_to_final_residual_grad"], target=TARGET, distractor=DISTRACTOR
    )
    got = store.get("edge.node_write_to_final_residual_grad")
    want = float(builtin.get("mlp.write_to_final_residual_grad", 1)[t, n])
    assert float(got[t, 0]) == pytest.approx(want, abs=1e-12)
    assert got[:t].abs().max() == 0 and got[t + 1 :].abs().max() == 0


def test_token_read_is_the_read_vector_against_the_embeddings() -> None:
    """node.token_read[t] = E · ∂act_N/∂r[t], the gradient taken by a real backward pass."""
    model = random_gpt2()
    t, n = T - 1, 9
    store = _derive(
        model, ["node.token_read"], {"kind": "neuron", "layer": 1, "token": t, "index": n}
    )
    objective = scalarlens.NodeObjective(ALT.MLP_POST_ACT, 1, (t, n))
    detach = [Intervention(ALT.MLP_INPUT_LAYER_NORM_SCALE, lambda v, _: v.detach(), [1])]
    (run,) = model.run(
        [TOKENS], [CaptureRequest(ALT.RESID_POST_ATTN, BWD, [1])], objective, interventions=detach
    )
    read = run.captured[(ALT.RESID_POST_ATTN, BWD)][1][t]
    embedding = model.weight(scalarlens.WeightLocationType.EMBEDDING)
    got = store.get("node.token_read")
    assert torch.allclose(got[t], embedding @ read, atol=1e-12)
    assert got[:t].abs().max() == 0
