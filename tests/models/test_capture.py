"""Captured activations and gradients equal an independent, unhooked recomputation.

The reference below is a plain functional GPT-2 written from the *canonical weights*
(``adapter.weight``), so these tests also pin the weight layouts.  A gradient at location X is
computed by cutting the reference graph at X (re-entering X as a fresh leaf) and calling
``torch.autograd.grad`` -- no hooks involved.  Everything runs in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from scalarlens._model import (
    CallableObjective,
    CaptureRequest,
    DirectionObjective,
    Intervention,
    LogitDiffObjective,
    LogProbObjective,
    NodeObjective,
    PluginLocation,
)
from scalarlens._vocab import ActivationLocationType as ALT
from scalarlens._vocab import (
    Dimension,
    LocationWithinLayer,
    NodeType,
    PassType,
    WeightLocationType,
    resolve_shape,
)
from scalarlens.exceptions import ModelInputError
from scalarlens.models import GPT2Adapter, GPT2Config, GPT2Model

W = WeightLocationType
FWD, BWD = PassType.FORWARD, PassType.BACKWARD
Key = tuple[ALT, int | None]
N_LAYERS = 2


def _random_adapter(seed: int = 0) -> GPT2Adapter:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=23, n_positions=16, n_embd=16, n_layer=N_LAYERS, n_head=4, n_inner=32
    )
    model = GPT2Model(cfg)
    with torch.no_grad():  # non-trivial biases and LN params so every term matters
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        for ln in [model.ln_f] + [m for b in model.h for m in (b.ln_1, b.ln_2)]:
            ln.weight.add_(1.0)
    return GPT2Adapter(model, name="random", dtype=torch.float64)


@pytest.fixture(scope="module")
def adapter() -> GPT2Adapter:
    return _random_adapter()


# GPT-2 has no gated MLP (mlp.up) and no post-norms (their scales are ones: tested elsewhere).
GPT2_LOCATIONS = [
    alt for alt in ALT if alt not in (ALT.MLP_UP, ALT.ATTN_POST_NORM_SCALE, ALT.MLP_POST_NORM_SCALE)
]


def _all_keys() -> list[Key]:
    keys: list[Key] = []
    for alt in GPT2_LOCATIONS:
        keys += [(alt, None)] if alt.has_no_layers else [(alt, layer) for layer in range(N_LAYERS)]
    return keys


def reference(
    a: GPT2Adapter,
    ids: list[int],
    cut: Key | None = None,
    detach_ln_f: bool = False,
    edit: Callable[[Key, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[Key, torch.Tensor], torch.Tensor | None]:
    """All activations of one prompt, plus the leaf re-entered at ``cut`` (if any)."""
    acts: dict[Key, torch.Tensor] = {}
    leaf: list[torch.Tensor] = []
    eps = a.config_dict()["layer_norm_epsilon"]
    dk = a.dims.d_head

    def mark(alt: ALT, layer: int | None, x: torch.Tensor) -> torch.Tensor:
        if edit is not None:
            x = edit((alt, layer), x)
        if cut == (alt, layer):
            x = x.detach().requires_grad_(True)
            leaf.append(x)
        acts[(alt, layer)] = x
        return x

    def ln(
        x: torch.Tensor,
        g: torch.Tensor,
        b: torch.Tensor,
        alt: ALT,
        layer: int | None,
        detach: bool = False,
    ) -> torch.Tensor:
        c = x - x.mean(-1, keepdim=True)
        s = (c.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        s = mark(alt, layer, s.detach() if detach else s)
        return c / s * g + b

    t = len(ids)
    x = mark(
        ALT.RESID_POST_EMBEDDING,
        None,
        a.weight(W.EMBEDDING)[ids] + a.weight(W.POSITION_EMBEDDING)[:t],
    )
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for l in range(a.dims.n_layers):  # noqa: E741

        def w(loc: WeightLocationType, layer: int = l) -> torch.Tensor:
            return a.weight(loc, layer)

        u = ln(
            x,
            w(W.LAYER_NORM_GAIN_PRE_ATTN),
            w(W.LAYER_NORM_BIAS_PRE_ATTN),
            ALT.ATTN_INPUT_LAYER_NORM_SCALE,
            l,
        )
        q = mark(
            ALT.ATTN_QUERY,
            l,
            torch.einsum("td,hdk->thk", u, w(W.ATTN_TO_QUERY)) + w(W.ATTN_BIAS_QUERY),
        )
        k = mark(
            ALT.ATTN_KEY, l, torch.einsum("td,hdk->thk", u, w(W.ATTN_TO_KEY)) + w(W.ATTN_BIAS_KEY)
        )
        v = mark(
            ALT.ATTN_VALUE,
            l,
            torch.einsum("td,hdk->thk", u, w(W.ATTN_TO_VALUE)) + w(W.ATTN_BIAS_VALUE),
        )
        scores = torch.einsum("thk,shk->tsh", q, k) / math.sqrt(dk)
        scores = mark(ALT.ATTN_QK_LOGITS, l, scores.masked_fill(~causal[..., None], -math.inf))
        p = mark(ALT.ATTN_QK_PROBS, l, torch.softmax(scores, dim=1))
        o = mark(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, l, torch.einsum("tsh,shv->thv", p, v))
        delta = mark(
            ALT.RESID_DELTA_ATTN,
            l,
            torch.einsum("thv,hvd->td", o, w(W.ATTN_TO_RESIDUAL)) + w(W.ATTN_BIAS_RESIDUAL),
        )
        x = mark(ALT.RESID_POST_ATTN, l, x + delta)
        m = ln(
            x,
            w(W.LAYER_NORM_GAIN_PRE_MLP),
            w(W.LAYER_NORM_BIAS_PRE_MLP),
            ALT.MLP_INPUT_LAYER_NORM_SCALE,
            l,
        )
        z = mark(ALT.MLP_PRE_ACT, l, m @ w(W.MLP_TO_HIDDEN) + w(W.MLP_BIAS_HIDDEN))
        act = mark(
            ALT.MLP_POST_ACT,
            l,
            0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
        )
        delta = mark(ALT.RESID_DELTA_MLP, l, act @ w(W.MLP_TO_RESIDUAL) + w(W.MLP_BIAS_RESIDUAL))
        x = mark(ALT.RESID_POST_MLP, l, x + delta)
    xf = ln(
        x,
        a.weight(W.LAYER_NORM_GAIN_FINAL),
        a.weight(W.LAYER_NORM_BIAS_FINAL),
        ALT.RESID_FINAL_LAYER_NORM_SCALE,
        None,
        detach=detach_ln_f,
    )
    mark(ALT.LOGITS, None, xf @ a.weight(W.UNEMBEDDING))
    return acts, (leaf[0] if leaf else None)


def reference_grads(
    a: GPT2Adapter,
    ids: list[int],
    objective: Callable[[dict[Key, torch.Tensor]], torch.Tensor],
    detach_ln_f: bool = False,
) -> dict[Key, torch.Tensor]:
    """``d objective / d X`` for every location X, one cut graph per location."""
    grads = {}
    for key in _all_keys():
        acts, leaf = reference(a, ids, cut=key, detach_ln_f=detach_ln_f)
        assert leaf is not None
        obj = objective(acts)
        if not obj.requires_grad:
            grads[key] = torch.zeros_like(leaf)
            continue
        (g,) = torch.autograd.grad(obj, leaf, allow_unused=True)
        grads[key] = torch.zeros_like(leaf) if g is None else g
    return grads


def _every_location(pass_type: PassType) -> list[CaptureRequest]:
    return [CaptureRequest(alt, pass_type) for alt in GPT2_LOCATIONS]


def _captured(result_captured: object, key: Key, pass_type: PassType) -> torch.Tensor:
    alt, layer = key
    return result_captured[(alt, pass_type)][layer]  # type: ignore[index]


PROMPTS = [[1, 5, 7, 2, 9, 11, 3], [4, 4, 8], [0, 22, 13, 6, 1]]


GATED_OR_POST_NORM = (W.MLP_TO_UP, W.MLP_BIAS_UP, W.ATTN_POST_NORM_GAIN, W.MLP_POST_NORM_GAIN)


def test_weights_have_canonical_shapes(adapter: GPT2Adapter) -> None:
    sizes = adapter.dims.sizes()
    for loc in W:
        layer = None if loc.has_no_layers else 1
        if loc in GATED_OR_POST_NORM:  # GPT-2 has neither: a clear error, not a made-up tensor
            with pytest.raises(ModelInputError, match=f"{loc.value!r}.*has no such weight"):
                adapter.weight(loc, layer)
            continue
        expected = resolve_shape(loc.shape, n_tokens=0, model_sizes=sizes)
        assert tuple(adapter.weight(loc, layer).shape) == expected, loc
        assert not adapter.weight(loc, layer).requires_grad


def test_forward_captures_match_reference(adapter: GPT2Adapter) -> None:
    results = adapter.run(PROMPTS, _every_location(FWD))
    for ids, res in zip(PROMPTS, results, strict=True):
        acts, _ = reference(adapter, ids)
        for key in _all_keys():
            got = _captured(res.captured, key, FWD)
            assert got.shape == acts[key].shape, key
            torch.testing.assert_close(got, acts[key], rtol=1e-10, atol=1e-12, msg=str(key))
            assert not got.requires_grad
        torch.testing.assert_close(res.logits, acts[(ALT.LOGITS, None)], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("detach", [False, True])
def test_backward_captures_match_reference(adapter: GPT2Adapter, detach: bool) -> None:
    objective = LogitDiffObjective(target=3, distractor=8, position=-1)
    results = adapter.run(PROMPTS, _every_location(BWD), objective, detach_final_ln_scale=detach)
    for ids, res in zip(PROMPTS, results, strict=True):

        def obj(acts: dict[Key, torch.Tensor]) -> torch.Tensor:
            logits = acts[(ALT.LOGITS, None)]
            return logits[-1, 3] - logits[-1, 8]

        ref = reference_grads(adapter, ids, obj, detach_ln_f=detach)
        for key in _all_keys():
            torch.testing.assert_close(
                _captured(res.captured, key, BWD), ref[key], rtol=1e-9, atol=1e-12, msg=str(key)
            )
        acts, _ = reference(adapter, ids)
        assert res.objective_value == pytest.approx(float(obj(acts)), rel=1e-12)


def test_detach_final_ln_scale_changes_upstream_gradient_only(adapter: GPT2Adapter) -> None:
    obj = LogProbObjective(target=5)
    caps = [
        CaptureRequest(ALT.RESID_POST_MLP, BWD, {1}),
        CaptureRequest(ALT.RESID_FINAL_LAYER_NORM_SCALE, BWD),
    ]
    attached = adapter.run([PROMPTS[0]], caps, obj)[0].captured
    detached = adapter.run([PROMPTS[0]], caps, obj, detach_final_ln_scale=True)[0].captured
    g_att = attached[(ALT.RESID_POST_MLP, BWD)][1]
    g_det = detached[(ALT.RESID_POST_MLP, BWD)][1]
    assert not torch.allclose(g_att, g_det)
    # With σ detached, the residual gradient is the plain linear pull-back γ ⊙ (U g) / σ.
    fwd = adapter.run([PROMPTS[0]], [CaptureRequest(ALT.RESID_FINAL_LAYER_NORM_SCALE, FWD)])
    sigma = fwd[0].captured[(ALT.RESID_FINAL_LAYER_NORM_SCALE, FWD)][None]
    probs = torch.softmax(fwd[0].logits[-1], -1)
    dlogits = -probs
    dlogits[5] += 1.0
    dxf = adapter.weight(W.UNEMBEDDING) @ dlogits * adapter.weight(W.LAYER_NORM_GAIN_FINAL)
    dx = (dxf - dxf.mean()) / sigma[-1]
    torch.testing.assert_close(g_det[-1], dx, rtol=1e-9, atol=1e-12)
    # The gradient *at* the scale itself does not depend on whether upstream is cut.
    torch.testing.assert_close(
        attached[(ALT.RESID_FINAL_LAYER_NORM_SCALE, BWD)][None],
        detached[(ALT.RESID_FINAL_LAYER_NORM_SCALE, BWD)][None],
    )


def test_hooks_do_not_change_logits(adapter: GPT2Adapter) -> None:
    ids = PROMPTS[0]
    with torch.no_grad():
        plain = adapter.model(torch.tensor([ids]))[0]
    fwd = adapter.run([ids], _every_location(FWD))[0].logits
    bwd = adapter.run([ids], _every_location(BWD) + _every_location(FWD), LogProbObjective(1))[
        0
    ].logits
    assert torch.equal(plain, fwd)
    assert torch.equal(plain, bwd)


def test_only_requested_locations_and_layers_are_captured(adapter: GPT2Adapter) -> None:
    caps = [
        CaptureRequest(ALT.MLP_POST_ACT, FWD, {1}),
        CaptureRequest(ALT.ATTN_QK_PROBS, BWD),
        CaptureRequest(ALT.LOGITS, FWD),
        CaptureRequest(ALT.MLP_POST_ACT, FWD, {0}),  # merged with the first request
    ]
    results = adapter.run(PROMPTS, caps, LogitDiffObjective(1, 2))
    for ids, res in zip(PROMPTS, results, strict=True):
        assert set(res.captured) == {
            (ALT.MLP_POST_ACT, FWD),
            (ALT.ATTN_QK_PROBS, BWD),
            (ALT.LOGITS, FWD),
        }
        assert set(res.captured[(ALT.MLP_POST_ACT, FWD)]) == {0, 1}
        assert set(res.captured[(ALT.ATTN_QK_PROBS, BWD)]) == {0, 1}
        assert set(res.captured[(ALT.LOGITS, FWD)]) == {None}
        t = len(ids)
        assert res.captured[(ALT.ATTN_QK_PROBS, BWD)][0].shape == (t, t, 4)
        assert res.captured[(ALT.MLP_POST_ACT, FWD)][1].shape == (t, 32)
        assert res.tokens == tuple(ids)
    only_one = adapter.run(PROMPTS, [CaptureRequest(ALT.ATTN_KEY, FWD, {0})])
    assert {k: set(v) for k, v in only_one[0].captured.items()} == {(ALT.ATTN_KEY, FWD): {0}}
    assert adapter.run(PROMPTS, [])[0].captured == {}


def test_forward_only_run_builds_no_graph(adapter: GPT2Adapter) -> None:
    seen: list[bool] = []

    def spy(x: torch.Tensor, layer: int | None) -> torch.Tensor:
        seen.append(x.requires_grad)
        return x

    adapter.run(
        PROMPTS,
        [CaptureRequest(ALT.MLP_POST_ACT, FWD)],
        LogProbObjective(1),
        interventions=[Intervention(ALT.MLP_POST_ACT, spy)],
    )
    assert seen == [False, False]


def test_batched_prompts_equal_single_runs(adapter: GPT2Adapter) -> None:
    caps = _every_location(FWD) + _every_location(BWD)
    objective = LogProbObjective(target=4, position=-2)
    batched = adapter.run(PROMPTS, caps, objective)
    for ids, res in zip(PROMPTS, batched, strict=True):
        alone = adapter.run([ids], caps, objective)[0]
        assert res.objective_value == pytest.approx(alone.objective_value, rel=1e-12)
        torch.testing.assert_close(res.logits, alone.logits, rtol=1e-10, atol=1e-12)
        assert set(res.captured) == set(alone.captured)
        for key, per_layer in res.captured.items():
            for layer, tensor in per_layer.items():
                torch.testing.assert_close(
                    tensor, alone.captured[key][layer], rtol=1e-9, atol=1e-12, msg=str((key, layer))
                )


@pytest.mark.parametrize(
    ("location", "layer", "index"),
    [
        (ALT.MLP_POST_ACT, 0, (2, 5)),
        (ALT.ATTN_QK_PROBS, 0, (3, 1, 2)),
        (ALT.ATTN_QK_LOGITS, 1, (-1, 0, 0)),
    ],
)
def test_node_objective(
    adapter: GPT2Adapter, location: ALT, layer: int, index: tuple[int, ...]
) -> None:
    ids = PROMPTS[0]
    res = adapter.run([ids], _every_location(BWD), NodeObjective(location, layer, index))[0]
    t = len(ids)
    n_token_axes = sum(d.is_token_axis for d in location.shape)
    resolved = tuple(i % t if n < n_token_axes else i for n, i in enumerate(index))

    def obj(acts: dict[Key, torch.Tensor]) -> torch.Tensor:
        return acts[(location, layer)][resolved]

    ref = reference_grads(adapter, ids, obj)
    for key in _all_keys():
        got = _captured(res.captured, key, BWD)
        torch.testing.assert_close(got, ref[key], rtol=1e-9, atol=1e-12, msg=str(key))
        alt, key_layer = key
        downstream = (key_layer is None and alt is not ALT.RESID_POST_EMBEDDING) or (
            key_layer is not None
            and (
                key_layer > layer
                or (
                    key_layer == layer
                    and alt.location_within_layer > location.location_within_layer
                )
            )
        )
        if downstream:
            assert torch.count_nonzero(got) == 0, key
    # The node's own gradient is one-hot; the embedding upstream of it gets signal.
    own = _captured(res.captured, (location, layer), BWD)
    assert own[resolved] == 1.0 and torch.count_nonzero(own) == 1
    assert torch.count_nonzero(_captured(res.captured, (ALT.RESID_POST_EMBEDDING, None), BWD)) > 0
    acts, _ = reference(adapter, ids)
    assert res.objective_value == pytest.approx(float(obj(acts)), rel=1e-12)


def test_direction_and_callable_objectives(adapter: GPT2Adapter) -> None:
    ids = PROMPTS[1]
    direction = torch.linspace(-1, 1, adapter.dims.d_model, dtype=torch.float64)
    d_obj = DirectionObjective(ALT.RESID_POST_ATTN, 1, -1, direction)
    res = adapter.run([ids], [CaptureRequest(ALT.RESID_POST_ATTN, BWD)], d_obj)[0]
    expected = torch.zeros(len(ids), adapter.dims.d_model, dtype=torch.float64)
    expected[-1] = direction
    torch.testing.assert_close(res.captured[(ALT.RESID_POST_ATTN, BWD)][1], expected)
    assert torch.count_nonzero(res.captured[(ALT.RESID_POST_ATTN, BWD)][0]) > 0
    acts, _ = reference(adapter, ids)
    assert res.objective_value == pytest.approx(
        float(acts[(ALT.RESID_POST_ATTN, 1)][-1] @ direction)
    )

    c_obj = CallableObjective(lambda logits: logits[:, 3].sum(), name="sum3")
    res = adapter.run([ids], [CaptureRequest(ALT.LOGITS, BWD)], c_obj)[0]
    expected = torch.zeros(len(ids), adapter.dims.n_vocab, dtype=torch.float64)
    expected[:, 3] = 1.0
    torch.testing.assert_close(res.captured[(ALT.LOGITS, BWD)][None], expected)


def test_interventions_apply_before_capture(adapter: GPT2Adapter) -> None:
    ids = PROMPTS[0]

    def zero_head0(x: torch.Tensor, layer: int | None) -> torch.Tensor:
        x = x.clone()
        x[:, :, 0] = 0.0
        return x

    iv = Intervention(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, zero_head0, layers={0}, name="ablate")
    caps = [
        CaptureRequest(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, FWD),
        CaptureRequest(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, BWD),
    ]
    objective = LogitDiffObjective(2, 6)
    res = adapter.run([ids], caps, objective, interventions=[iv])[0]
    v_out = res.captured[(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, FWD)]
    assert torch.count_nonzero(v_out[0][:, 0]) == 0  # captured after the intervention
    assert torch.count_nonzero(v_out[1][:, 0]) > 0  # layer 1 untouched

    def edit(key: Key, x: torch.Tensor) -> torch.Tensor:
        return zero_head0(x[None], key[1])[0] if key == (ALT.ATTN_WEIGHTED_SUM_OF_VALUES, 0) else x

    acts, _ = reference(adapter, ids, edit=edit)
    torch.testing.assert_close(res.logits, acts[(ALT.LOGITS, None)], rtol=1e-10, atol=1e-12)
    clean = adapter.run([ids], [])[0].logits
    assert not torch.allclose(res.logits, clean)
    # Gradients are those of the intervened model: ``x.clone()`` keeps the graph, and the
    # gradient at the replaced value is taken downstream of the intervention.
    for key in [(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, 0), (ALT.ATTN_WEIGHTED_SUM_OF_VALUES, 1)]:
        acts, leaf = reference(adapter, ids, cut=key, edit=edit)
        logits = acts[(ALT.LOGITS, None)]
        (g,) = torch.autograd.grad(logits[-1, 2] - logits[-1, 6], leaf)
        torch.testing.assert_close(
            res.captured[(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, BWD)][key[1]], g, rtol=1e-9, atol=1e-12
        )


def test_constant_intervention_still_reports_gradient(adapter: GPT2Adapter) -> None:
    """A value replaced by a constant has no upstream graph; its own gradient is still exact."""
    ids = PROMPTS[2]
    iv = Intervention(ALT.RESID_POST_ATTN, lambda x, _l: torch.zeros_like(x).detach(), layers={1})
    res = adapter.run(
        [ids],
        [CaptureRequest(ALT.RESID_POST_ATTN, BWD), CaptureRequest(ALT.RESID_POST_EMBEDDING, BWD)],
        LogProbObjective(3),
        interventions=[iv],
    )[0]
    assert torch.count_nonzero(res.captured[(ALT.RESID_POST_ATTN, BWD)][1]) > 0
    # Everything upstream of the constant is cut off from the objective.
    assert torch.count_nonzero(res.captured[(ALT.RESID_POST_ATTN, BWD)][0]) == 0
    assert torch.count_nonzero(res.captured[(ALT.RESID_POST_EMBEDDING, BWD)][None]) == 0


def test_float32_default_and_dtype_switch() -> None:
    a = _random_adapter(seed=1)
    a.to(torch.float32)
    res = a.run([[1, 2, 3]], [CaptureRequest(ALT.MLP_PRE_ACT, FWD, {0})])[0]
    assert res.captured[(ALT.MLP_PRE_ACT, FWD)][0].dtype == torch.float32
    assert a.dtype == torch.float32
    assert a.config_dict()["dtype"] == "float32"


def _sae_location() -> PluginLocation:
    return PluginLocation(
        name="test_sae.latents",
        provider="test_sae",
        host=ALT.MLP_POST_ACT,
        shape=(Dimension.TOKENS, Dimension.AUTOENCODER_LATENTS),
        node_type=NodeType.AUTOENCODER_LATENT,
        location_within_layer=LocationWithinLayer.MLP,
    )


def test_plugin_location_emitted_by_intervention(adapter: GPT2Adapter) -> None:
    """An SAE-style splice: latents are captured forward and backward like a built-in."""
    loc = _sae_location()
    gen = torch.Generator().manual_seed(3)
    enc = torch.randn(32, 10, generator=gen, dtype=torch.float64)
    dec = torch.randn(10, 32, generator=gen, dtype=torch.float64)

    def splice(
        x: torch.Tensor, layer: int | None, emit: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        latents = emit(loc, torch.relu(x @ enc))
        recon = latents @ dec
        return recon + (x - recon).detach()  # value unchanged, gradient through the latents

    iv = Intervention(ALT.MLP_POST_ACT, splice, layers={1}, name="sae", emits=(loc,))
    caps = [CaptureRequest(loc, FWD), CaptureRequest(loc, BWD)]
    results = adapter.run(PROMPTS, caps, LogProbObjective(2), interventions=[iv])
    for ids, res in zip(PROMPTS, results, strict=True):
        assert set(res.captured) == {(loc, FWD), (loc, BWD)}
        assert set(res.captured[(loc, FWD)]) == {1}
        acts, _ = reference(adapter, ids)
        latents = torch.relu(acts[(ALT.MLP_POST_ACT, 1)] @ enc)
        torch.testing.assert_close(res.captured[(loc, FWD)][1], latents)

        # Gradient at the latents = (gradient at post_act, which the splice leaves unchanged
        # in value) pulled back through the decoder.
        def obj(a: dict[Key, torch.Tensor]) -> torch.Tensor:
            return torch.log_softmax(a[(ALT.LOGITS, None)][-1], -1)[2]

        g_post = reference_grads(adapter, ids, obj)[(ALT.MLP_POST_ACT, 1)]
        torch.testing.assert_close(
            res.captured[(loc, BWD)][1], g_post @ dec.T, rtol=1e-9, atol=1e-12
        )

    with pytest.raises(ModelInputError, match="none of the given interventions"):
        adapter.run(PROMPTS, [CaptureRequest(loc, FWD)])
    with pytest.raises(ModelInputError, match="no intervention emits it there"):
        adapter.run(PROMPTS, [CaptureRequest(loc, FWD, {0})], interventions=[iv])
