"""Clean vs corrupted DSTs: exactness against hand-written computations (float64).

* activation patching of one head / neuron / residual position equals a hand-written patched
  forward pass of the raw model;
* attribution patching is ``(a − b)·∇a`` from separately captured activations and gradients,
  and equals activation patching exactly where the effect is linear;
* integrated gradients at a full cut (the residual stream at one layer) is complete:
  summed over positions it equals ``objective(main) − objective(baseline)``.
"""

from __future__ import annotations

from typing import Any

import pytest
import scalarlens
import torch
from scalarlens import DirectionObjective, DstConfig, LogitDiffObjective

from ._tiny import (
    ALT,
    BWD,
    D_MODEL,
    FWD,
    N_HEADS,
    N_LAYERS,
    REGISTRY,
    TOKENS,
    corrupted,
    derive,
    logit_diff,
    tiny_adapter,
)

BASELINE = corrupted(TOKENS)
FAMILIES = {
    "attn": ALT.ATTN_WEIGHTED_SUM_OF_VALUES,
    "mlp": ALT.MLP_POST_ACT,
    "resid.post_emb": ALT.RESID_POST_EMBEDDING,
    "resid.post_attn": ALT.RESID_POST_ATTN,
    "resid.post_mlp": ALT.RESID_POST_MLP,
}
ALL = [
    "attn.attribution_patching",
    "attn.integrated_gradients",
    "attn.activation_patching",
    "mlp.attribution_patching",
    "mlp.integrated_gradients",
    "mlp.activation_patching",
    "resid.post_emb.attribution_patching",
    "resid.post_emb.integrated_gradients",
    "resid.post_emb.activation_patching",
    "resid.post_attn.attribution_patching",
    "resid.post_attn.integrated_gradients",
    "resid.post_attn.activation_patching",
    "resid.post_mlp.attribution_patching",
    "resid.post_mlp.integrated_gradients",
    "resid.post_mlp.activation_patching",
]


@pytest.fixture(scope="module")
def adapter() -> Any:
    return tiny_adapter()


def _objective(adapter: Any, tokens: list[int], hook: Any = None) -> float:
    """The logit difference of a raw forward pass of the underlying model (no engine)."""
    ids = torch.tensor([tokens])
    logits = adapter.model(ids, hook=hook)
    return float(logits[0, -1, logit_diff().target] - logits[0, -1, logit_diff().distractor])


def _capture(adapter: Any, tokens: list[int], location: ALT) -> dict[Any, torch.Tensor]:
    seen: dict[Any, torch.Tensor] = {}

    def hook(name: str, layer: Any, tensor: torch.Tensor) -> torch.Tensor:
        if name == location.value:
            seen[layer] = tensor[0].detach().clone()
        return tensor

    _objective(adapter, tokens, hook)
    return seen


def _patched(adapter: Any, location: ALT, layer: Any, index: tuple[Any, ...]) -> float:
    """``objective(main) − objective(main with value[index] from the baseline)``, by hand."""
    base = _capture(adapter, BASELINE, location)[layer]

    def hook(name: str, at: Any, tensor: torch.Tensor) -> torch.Tensor:
        if name == location.value and at == layer:
            tensor = tensor.clone()
            tensor[(0, *index)] = base[index]
        return tensor

    return _objective(adapter, TOKENS) - _objective(adapter, TOKENS, hook)


@pytest.mark.parametrize("name", ALL)
def test_declared_shape_and_objective_values(adapter: Any, name: str) -> None:
    assert len(ALL) == len(FAMILIES) * 3
    store = derive(adapter, name)
    dst = REGISTRY.dst(name)
    assert dst.needs_objective and REGISTRY.get(name, DstConfig()).reads_baseline()
    entry = store.activations(name, FWD)
    layers = [None] if dst.has_no_layers else list(range(N_LAYERS))
    assert list(entry.layer_indices) == layers
    (main,), (base,) = (
        store.metadata["objective_values"],
        store.metadata["baseline_objective_values"],
    )
    assert main == pytest.approx(_objective(adapter, TOKENS), abs=1e-9)
    assert base == pytest.approx(_objective(adapter, BASELINE), abs=1e-9)
    assert store.metadata["baseline_tokens"] == [BASELINE]


@pytest.mark.parametrize(
    ("name", "location", "layer", "index"),
    [
        ("attn.activation_patching", ALT.ATTN_WEIGHTED_SUM_OF_VALUES, 1, (3, 2)),
        ("attn.activation_patching", ALT.ATTN_WEIGHTED_SUM_OF_VALUES, 0, (2, 0)),
        ("mlp.activation_patching", ALT.MLP_POST_ACT, 2, (5, 7)),
        ("resid.post_attn.activation_patching", ALT.RESID_POST_ATTN, 0, (2,)),
        ("resid.post_mlp.activation_patching", ALT.RESID_POST_MLP, 1, (4,)),
        ("resid.post_emb.activation_patching", ALT.RESID_POST_EMBEDDING, None, (2,)),
    ],
)
def test_activation_patching_equals_a_hand_patched_forward(
    adapter: Any, name: str, location: ALT, layer: Any, index: tuple[int, ...]
) -> None:
    store = derive(adapter, name, config=DstConfig(batch_rows=7))  # several passes per layer
    got = store.activations(name, FWD)[layer]
    want = _patched(adapter, location, layer, index)
    assert abs(want) > 1e-4, "the chosen component should matter"
    assert float(got[index].reshape(-1)[0]) == pytest.approx(want, abs=1e-6)


def test_patching_before_the_corrupted_token_changes_nothing(adapter: Any) -> None:
    """Positions before the corruption carry identical values: their patch effect is 0."""
    store = derive(adapter, "attn.activation_patching")
    for layer in range(N_LAYERS):
        assert torch.all(store.activations("attn.activation_patching", FWD)[layer][:2] == 0)


def test_patch_groups_give_each_member_the_group_effect(adapter: Any) -> None:
    store = derive(adapter, "attn.activation_patching", config=DstConfig(patch_group=N_HEADS))
    got = store.activations("attn.activation_patching", FWD)[1]
    assert torch.equal(got, got[:, :1].expand_as(got))
    whole = _patched(adapter, ALT.ATTN_WEIGHTED_SUM_OF_VALUES, 1, (4, slice(None)))
    assert float(got[4, 0]) == pytest.approx(whole, abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_patching_is_difference_times_gradient(adapter: Any, family: str) -> None:
    location = FAMILIES[family]
    name = f"{family}.attribution_patching"
    got = derive(adapter, name).activations(name, FWD)
    raw = location.value
    config = DstConfig(derive_gradients=True)
    main = derive(adapter, raw, config=config)
    base = derive(adapter, raw, tokens=BASELINE)
    for layer in got.layer_indices:
        a = main.activations(raw, FWD)[layer]
        b = base.activations(raw, FWD)[layer]
        grad = main.activations(raw, BWD)[layer]
        want = (a - b) * grad
        if family == "attn":
            want = want.sum(-1)
        elif family.startswith("resid"):
            want = want.sum(-1, keepdim=True)
        torch.testing.assert_close(got[layer], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("family", "read_at"),
    [("attn", ALT.RESID_POST_ATTN), ("resid.post_mlp", ALT.RESID_POST_MLP)],
)
def test_attribution_equals_patching_where_the_effect_is_linear(
    adapter: Any, family: str, read_at: ALT
) -> None:
    """Read the objective as a direction of the residual right after the component: the last
    layer's heads reach it through ``W_O`` only (linear), the residual is read directly, so
    the first-order estimate is exact."""
    generator = torch.Generator().manual_seed(3)
    direction = torch.randn(D_MODEL, generator=generator, dtype=torch.float64)
    objective = DirectionObjective(read_at, N_LAYERS - 1, -1, direction)
    names = [f"{family}.attribution_patching", f"{family}.activation_patching"]
    store = scalarlens.derive(
        adapter,
        [TOKENS],
        names,
        baseline=[BASELINE],
        objective=objective,
        layers=[N_LAYERS - 1],
        registry=REGISTRY,
    )
    estimate = store.activations(names[0], FWD)[N_LAYERS - 1]
    exact = store.activations(names[1], FWD)[N_LAYERS - 1]
    assert exact.abs().max() > 1e-3
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["resid.post_emb", "resid.post_attn", "resid.post_mlp"])
def test_integrated_gradients_is_complete_at_a_residual_cut(adapter: Any, family: str) -> None:
    name = f"{family}.integrated_gradients"
    store = derive(adapter, name)  # the documented default: DstConfig().steps == 8
    total = store.metadata["objective_values"][0] - store.metadata["baseline_objective_values"][0]
    assert abs(total) > 0.1
    for layer, value in store.activations(name, FWD).activations_by_layer_index.items():
        assert float(value.sum()) == pytest.approx(total, rel=1e-3), (family, layer)


def test_more_integration_steps_converge(adapter: Any) -> None:
    """The Gauss–Legendre rule converges fast: 16 points agree with 32 to 1e-6."""
    name = "mlp.integrated_gradients"
    values = [
        derive(adapter, name, config=DstConfig(steps=n)).activations(name, FWD)[1] for n in (16, 32)
    ]
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=1e-6)


def test_one_step_is_the_midpoint_gradient(adapter: Any) -> None:
    """``steps=1`` evaluates the gradient once, at the midpoint of the path."""
    got = derive(adapter, "resid.post_mlp.integrated_gradients", config=DstConfig(steps=1))
    assert got.activations("resid.post_mlp.integrated_gradients", FWD)[0].abs().sum() > 0


def test_gauss_legendre_rule() -> None:
    from scalarlens._contrast import gauss_legendre

    nodes, weights = gauss_legendre(5)
    assert sum(weights) == pytest.approx(1.0, abs=1e-14)
    for degree in range(10):  # exact up to degree 2·5 − 1
        integral = sum(w * x**degree for x, w in zip(nodes, weights, strict=True))
        assert integral == pytest.approx(1 / (degree + 1), abs=1e-13)


def test_the_baseline_run_is_forward_only_for_attribution(adapter: Any) -> None:
    plan = scalarlens.make_plan(
        [(REGISTRY.get("mlp.attribution_patching", DstConfig()), FWD)], N_LAYERS
    )
    assert plan.needs_backward and not plan.run_needs_backward(scalarlens.PromptCombo.BASELINE)
    assert [c.pass_type for c in plan.captures_for(scalarlens.PromptCombo.BASELINE)] == [FWD]


def test_objective_other_than_logit_difference(adapter: Any) -> None:
    store = scalarlens.derive(
        adapter,
        [TOKENS],
        "attn.activation_patching",
        baseline=[BASELINE],
        objective=LogitDiffObjective(7, 2, position=3),
        registry=REGISTRY,
    )
    later = store.activations("attn.activation_patching", FWD)[0][4:]
    assert torch.all(later == 0), "positions after the objective's cannot affect it"


class _FullForwardsOnly:
    """The adapter without ``resume_objectives``: patching falls back to full forwards."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    name = property(lambda self: self._inner.name)
    dims = property(lambda self: self._inner.dims)
    capturable_locations = property(lambda self: self._inner.capturable_locations)
    tokenizer = None

    def weight(self, *args: Any) -> Any:
        return self._inner.weight(*args)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.run(*args, **kwargs)

    def config_dict(self) -> Any:
        return self._inner.config_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_resumed_passes_equal_full_forwards(adapter: Any, family: str) -> None:
    """Running only the layers and tokens a patch can change gives the full-forward answer."""
    from scalarlens._patching import ResumableModel

    full = _FullForwardsOnly(adapter)
    assert isinstance(adapter, ResumableModel) and not isinstance(full, ResumableModel)
    name = f"{family}.activation_patching"
    config = DstConfig(batch_rows=5)
    resumed = derive(adapter, name, config=config).activations(name, FWD)
    forwards = derive(full, name, config=config).activations(name, FWD)
    for layer in resumed.layer_indices:
        torch.testing.assert_close(resumed[layer], forwards[layer], rtol=0, atol=1e-10)


def test_progress_reports_every_pass_and_skips_what_cannot_change(adapter: Any) -> None:
    calls: list[tuple[str, int, int]] = []
    scalarlens.derive(
        adapter,
        [TOKENS],
        ["attn.activation_patching", "mlp.integrated_gradients"],
        baseline=[BASELINE],
        objective=logit_diff(),
        config=DstConfig(batch_rows=6),
        registry=REGISTRY,
        progress=lambda *call: calls.append(call),
    )
    for what, rows in (("integrated gradients", N_LAYERS * 8), ("activation patching", None)):
        seen = [(done, total) for w, done, total in calls if w == what]
        assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1]
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        if rows is not None:
            assert seen[-1][1] == rows
    # heads at tokens before the corrupted one (2) hold identical values: never run
    (patched_total,) = {t for w, _, t in calls if w == "activation patching"}
    assert patched_total == N_LAYERS * N_HEADS * (len(TOKENS) - 2)


def test_compare_reads_only_what_was_patched(adapter: Any) -> None:
    """With patch_positions and patch_group, compare pairs each group's summed estimate with
    the group's exact effect at the patched positions only."""
    from scalarlens import compare

    names = ["attn.attribution_patching", "attn.activation_patching"]
    config = DstConfig(patch_positions=[-1, 3], patch_group=2)
    store = derive(adapter, names, config=config)
    c = compare(store, "attn.attribution_patching")
    assert c.n == N_LAYERS * 2 * (N_HEADS // 2)
    estimate = store.get("attn.attribution_patching", 1)
    exact = store.get("attn.activation_patching", 1)
    summed = float(estimate[3, 2:4].sum())
    assert any(e == pytest.approx(summed) for e in c.estimates)
    assert float(exact[3, 2]) in c.exacts and float(exact[3, 3]) == float(exact[3, 2])


def test_passes_stay_at_one_layer_and_nearby_tokens() -> None:
    """A resumed pass runs from its earliest layer and token for every row: passes never mix
    layers, never hold tokens more than a quarter of the remaining prompt apart, never exceed
    their size."""
    from scalarlens._patching import _passes, _Patch

    site = ALT.ATTN_WEIGHTED_SUM_OF_VALUES
    jobs = [
        _Patch(site, layer, (t,), h)
        for layer in (0, 1)
        for t in (10, 11, 30, 100)
        for h in range(4)
    ]
    passes = list(_passes(jobs, 6, 128))
    assert [j for p in passes for j in p] == jobs
    for p in passes:
        assert len(p) <= 6 and len({j.layer for j in p}) == 1
        assert (p[-1].token - p[0].token) * 4 <= 128 - p[0].token
    assert any({j.token for j in p} == {10, 11} for p in passes)  # neighbours share a pass


def test_spearman_ranks_average_ties() -> None:
    """Tied values share their mean rank (vectorised; checked against a direct count)."""
    from scalarlens._compare import _ranks

    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0, 5.0, 3.0], dtype=torch.float64)
    below = (x[None, :] < x[:, None]).sum(1).to(torch.float64)
    tied = (x[None, :] == x[:, None]).sum(1).to(torch.float64)
    assert torch.equal(_ranks(x), below + (tied - 1) / 2)
