"""Mergeable statistics: any shard split, any merge order, the same result (hypothesis)."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scalarlens._sweep._stats import (
    KEY_SENTINEL,
    N_BINS,
    ComponentStats,
    Rows,
    SweepSettings,
    bin_of,
    first_per_group,
    make_key,
    priority_of,
)

SETTINGS = SweepSettings(top_k=5, samples=7, bin_samples=3, window_before=0, window_after=0)
EXACT = [
    "count", "nonfinite", "nonzero", "min", "max", "hist", "top_value", "top_key",
    "top_context", "sample_key", "sample_priority", "sample_value", "bin_key",
    "bin_priority", "bin_value",
]  # fmt: skip


def _rows(values: torch.Tensor, keys: torch.Tensor) -> Rows:
    n = values.shape[0]
    return Rows(values, keys, torch.arange(n)[:, None])


def _stats(values: torch.Tensor, keys: torch.Tensor) -> ComponentStats:
    return ComponentStats.of_rows(_rows(values, keys), SETTINGS)


def _merge_randomly(parts: list[ComponentStats], rng: random.Random) -> ComponentStats:
    """Merge in a random binary tree with random operand order."""
    parts = list(parts)
    while len(parts) > 1:
        i, j = rng.sample(range(len(parts)), 2)
        a, b = parts[i], parts[j]
        merged = a.merge(b) if rng.random() < 0.5 else b.merge(a)
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [merged]
    return parts[0]


# Values drawn from a small pool, so ties (in value and in histogram bin) are common.
values_strategy = st.integers(2, 60).flatmap(
    lambda n: st.tuples(
        st.lists(
            st.lists(
                st.sampled_from([0.0, 1.0, -1.0, 2.5, 1e-6, -3e5, 0.125, 7.0, math.nan]),
                min_size=3,
                max_size=3,
            ),
            min_size=n,
            max_size=n,
        ),
        st.lists(st.integers(0, n), min_size=1, max_size=6),
        st.integers(0, 2**32),
    )
)


@settings(max_examples=60, deadline=None)
@given(values_strategy)
def test_any_split_and_merge_order_gives_the_same_statistics(case: tuple) -> None:
    table, cuts, seed = case
    values = torch.tensor(table, dtype=torch.float32)
    n = values.shape[0]
    rng = random.Random(seed)
    # Examples spread over prompts and tokens; shards are arbitrary subsets (shuffled).
    keys = make_key(torch.arange(n) // 7, torch.arange(n) % 7, torch.zeros(n, dtype=torch.long))
    order = list(range(n))
    rng.shuffle(order)
    bounds = sorted({0, n, *cuts})
    parts = [
        _stats(values[idx], keys[idx])
        for a, b in itertools.pairwise(bounds)
        if (idx := torch.tensor(sorted(order[a:b]), dtype=torch.long)).numel()
    ]
    whole = _stats(values, keys)
    merged = _merge_randomly(parts, rng)
    assert merged.identical(whole, EXACT)
    # Moments agree to rounding, on their natural scale (n·σᵏ; a zero M3 may come out 1e-16).
    n_seen = whole.t["count"].to(torch.float64)
    sigma = (whole.t["m2"] / n_seen.clamp_min(1)).sqrt()
    for field, power in (("mean", 1), ("m2", 2), ("m3", 3), ("m4", 4)):
        scale = sigma**power * (1 if field == "mean" else n_seen) + whole.t[field].abs()
        assert ((merged.t[field] - whole.t[field]).abs() <= 1e-9 * scale + 1e-300).all(), field
    for name, tensor in whole.finalize().items():
        if name.startswith("quantile"):
            other = merged.finalize()[name]
            assert tensor.numpy().tobytes() == other.numpy().tobytes(), name


@settings(max_examples=40, deadline=None)
@given(values_strategy)
def test_batch_by_batch_updates_equal_one_merge(case: tuple) -> None:
    """``update`` (what a shard does per batch) gives exactly what merging whole batches does."""
    table, cuts, _ = case
    values = torch.tensor(table, dtype=torch.float32)
    n = values.shape[0]
    keys = make_key(torch.arange(n) // 7, torch.arange(n) % 7, torch.zeros(n, dtype=torch.long))
    bounds = sorted({0, n, *cuts})
    batches = [(values[a:b], keys[a:b]) for a, b in itertools.pairwise(bounds) if b > a]
    running = _stats(*batches[0])
    merged = running
    for batch in batches[1:]:
        running = running.update(_rows(*batch))
        merged = merged.merge(_stats(*batch))
    assert running.identical(merged)  # every field, moments included: same formulas, same order
    assert running.identical(_stats(values, keys), EXACT)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=2, max_size=200),
    st.lists(st.integers(1, 199), max_size=8),
)
def test_moments_match_a_float64_two_pass_computation(xs: list[float], cuts: list[int]) -> None:
    values = torch.tensor(xs, dtype=torch.float32)[:, None]
    n = len(xs)
    keys = make_key(
        torch.zeros(n, dtype=torch.long), torch.arange(n), torch.zeros(n, dtype=torch.long)
    )
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    parts = [_stats(values[a:b], keys[a:b]) for a, b in itertools.pairwise(bounds)]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    x = np.asarray(values[:, 0].tolist(), dtype=np.float64)
    mean = x.mean()
    d = x - mean
    two_pass = {"m2": (d**2).sum(), "m3": (d**3).sum(), "m4": (d**4).sum()}
    spread = math.sqrt(two_pass["m2"] / n)
    scale = {"m2": n * spread**2, "m3": n * spread**3, "m4": n * spread**4}
    assert abs(float(merged.t["mean"][0]) - mean) <= 1e-9 * max(abs(mean), spread, 1e-300)
    for field, expected in two_pass.items():
        got = float(merged.t[field][0])
        assert abs(got - expected) <= 1e-9 * max(abs(expected), scale[field], 1e-300), field
    assert int(merged.t["count"][0]) == n
    assert float(merged.t["min"][0]) == x.min() and float(merged.t["max"][0]) == x.max()


def test_top_k_breaks_ties_by_example_key() -> None:
    values = torch.tensor([[1.0], [3.0], [3.0], [2.0], [3.0], [3.0], [3.0], [3.0]])
    keys = make_key(
        torch.arange(8), torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)
    )
    stats = _stats(values, keys)
    assert stats.t["top_value"][0].tolist() == [3.0] * 5
    assert (stats.t["top_key"][0] >> 32).tolist() == [1, 2, 4, 5, 6]


def test_priorities_are_a_fixed_hash_of_the_key() -> None:
    keys = torch.tensor([0, 1, 2**40 + 5])
    first, again = priority_of(keys), priority_of(keys.clone())
    assert torch.equal(first, again) and (first >= 0).all()
    assert len(set(first.tolist())) == 3


def test_bins_are_ordered_like_values() -> None:
    xs = torch.tensor([-1e9, -50.0, -1.0, -1e-3, 0.0, 1e-5, 1e-3, 1.0, 50.0, 1e9])
    bins = bin_of(xs).tolist()
    assert bins == sorted(bins) and bins[0] == 0 and bins[-1] == N_BINS - 1
    assert bin_of(torch.tensor([0.0, 1e-5, -1e-5])).unique().numel() == 1  # the zero bin


def test_first_per_group_keeps_the_first_m_in_order() -> None:
    group = torch.tensor([1, 0, 1, 1, 0, 1])
    priority = torch.tensor([5, 9, 1, 3, 2, 4])
    kept, rank = first_per_group(group, [priority], 2)
    found = zip(group[kept].tolist(), priority[kept].tolist(), rank.tolist(), strict=True)
    assert sorted(found) == [
        (0, 2, 0), (0, 9, 1), (1, 1, 0), (1, 3, 1),
    ]  # fmt: skip


def test_empty_components_finalize_without_values() -> None:
    stats = _stats(
        torch.full((4, 2), math.nan),
        make_key(
            torch.arange(4), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
        ),
    )
    final = stats.finalize()
    assert stats.t["count"].tolist() == [0, 0] and stats.t["nonfinite"].tolist() == [4, 4]
    assert torch.isnan(final["variance"]).all() and torch.isnan(final["quantile_boundaries"]).all()
    assert (final["quantile_key"] == KEY_SENTINEL).all()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
