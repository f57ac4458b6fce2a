"""Per-component corpus statistics that merge associatively and commutatively.

A sweep cuts the corpus into shards that may run anywhere, in any order, and be re-run after a
crash; each produces a ``ComponentStats`` per (DST, pass, layer), and the shards are merged at
the end.  So every field is a *mergeable summary* whose merge gives the same answer whatever the
split and the order:

* top-k records: the ``k`` largest values, ties broken by the example key (prompt, token,
  attended token) ascending — a total order, so the merged set is unique;
* moments: count, mean and central sums ``M2..M4`` in float64, merged with Pébay's exact
  pairwise formulas (the two-pass moments up to float64 rounding);
* min, max, the non-zero count and a fixed-bin histogram: sums and extremes;
* samples: every example gets a priority by *hashing its key* (``priority_of``), not from a
  random stream, so "the ``s`` examples of lowest priority" is one well-defined set whatever the
  split.  The uniform sample keeps the ``s`` lowest priorities overall (the same positions for
  every component); the per-bin samples keep the ``m`` lowest per component and histogram bin,
  from which the per-quantile samples are drawn at the end (``finalize``).

Rows of a batch are examples (a token, or a causal (query, key) pair), columns components.

Every table is kept *sorted* in its order (top-k: value descending, then key; per-bin samples:
priority), empty slots last, so two tables merge by a merge path (each entry's place in the
union is its own index plus how many of the other table's entries precede it: a few dense
comparisons, no sort).  A batch is summarised the cheap way: one pass computes the moments,
the histogram bin of every value and the few *candidates* that could enter a table (a value at
or above its component's current k-th; a priority below its (component, bin)'s current m-th),
and only those are sorted — see ``_absorb_top`` and ``_absorb_bins``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np
import torch

KEY_SENTINEL = torch.iinfo(torch.int64).max
"""Key (and priority) of an empty slot: sorts after every real example."""

LOW_OCTAVE, HIGH_OCTAVE = -14, 14
MAGNITUDE_BINS = HIGH_OCTAVE - LOW_OCTAVE
N_BINS = 2 * MAGNITUDE_BINS + 1
ZERO_BIN = MAGNITUDE_BINS
QUANTILES = (0.5, 0.9, 0.99, 0.999)


def make_key(prompt: torch.Tensor, token: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """``prompt << 32 | token << 16 | attended``: example keys that sort like the tuples."""
    return (prompt.to(torch.int64) << 32) | (token.to(torch.int64) << 16) | attended.to(torch.int64)


def split_key(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return key >> 32, (key >> 16) & 0xFFFF, key & 0xFFFF


_MIX1, _MIX2, _GOLDEN = (
    np.uint64(0xBF58476D1CE4E5B9),
    np.uint64(0x94D049BB133111EB),
    np.uint64(0x9E3779B97F4A7C15),
)


def priority_of(key: torch.Tensor) -> torch.Tensor:
    """A pseudo-random priority per example key (splitmix64, 62 bits, non-negative).

    Hashing rather than drawing keeps samples independent of how the corpus was split.
    """
    with np.errstate(over="ignore"):
        z = key.numpy().astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(2)).astype(np.int64))


def _bin_table() -> torch.Tensor:
    """The bin of every float32 sign-and-exponent pattern (``bits >> 23``, plus 256)."""
    codes = torch.arange(-256, 256, dtype=torch.int32)
    exponent = codes & 0xFF  # |x| in [2^(e-127), 2^(e-126))
    j = (exponent - (127 + LOW_OCTAVE)).clamp(0, MAGNITUDE_BINS - 1)
    signed = torch.where(codes < 0, ZERO_BIN - 1 - j, ZERO_BIN + 1 + j)
    return torch.where(exponent < 127 + LOW_OCTAVE, ZERO_BIN, signed).to(torch.int32)


_BIN_TABLE = _bin_table()


def bin_codes(values: torch.Tensor) -> torch.Tensor:
    """``bin_of`` as int32, by one table look-up of the float32 sign and exponent bits."""
    bits = values.to(torch.float32).contiguous().view(torch.int32)
    code = torch.bitwise_right_shift(bits, 23).add_(256)  # arithmetic shift: sign and exponent
    return _BIN_TABLE.index_select(0, code.view(-1)).view(code.shape)


def bin_of(values: torch.Tensor) -> torch.Tensor:
    """Fixed symmetric log bins, one per octave: ``|x| < 2⁻¹⁴`` is the zero bin, then
    ``[2ʲ, 2ʲ⁺¹)`` for ``j`` from -14 to 13 on each side (larger magnitudes in the outermost
    bins); bin order is value order.  Read from the float32 exponent bits: no logarithm."""
    return bin_codes(values).to(torch.int64)


def bin_edges() -> list[float]:
    """The ``N_BINS + 1`` edges (the outermost are ±inf: those bins also hold overflows)."""
    mags = [2.0 ** (LOW_OCTAVE + i) for i in range(1, MAGNITUDE_BINS)]
    low = 2.0**LOW_OCTAVE
    return [-math.inf, *(-m for m in reversed(mags)), -low, low, *mags, math.inf]


def first_per_group(
    group: torch.Tensor, order: Sequence[torch.Tensor], m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the first ``m`` entries of each group under the lexicographic ``order``
    (most significant first), and each kept entry's rank within its group."""
    perm = torch.arange(group.numel())
    for key in (*reversed(order), group):
        perm = perm[torch.argsort(key[perm], stable=True)]
    grouped = group[perm]
    rank = torch.arange(grouped.numel()) - torch.searchsorted(grouped, grouped)
    keep = rank < m
    return perm[keep], rank[keep]


def merge_sorted(
    mine: Sequence[torch.Tensor],
    theirs: Sequence[torch.Tensor],
    before: Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor],
) -> list[torch.Tensor]:
    """Per row, the first ``m`` of the union of two sorted slot tables (a merge path).

    Fields are ``rows × m (× extra)`` tensors, each row sorted under a total order with empty
    slots last; ``before(mine, theirs)[r, i, j]`` says that ``theirs[r, j]`` strictly precedes
    ``mine[r, i]`` (empty slots precede nothing).  ``mine[i]`` lands at ``i`` plus the number
    of ``theirs`` before it, ``theirs[j]`` at ``j`` plus the number of ``mine`` not after it:
    the places are a permutation of the union's positions, the same whichever table is
    ``mine`` (equal entries are identical empty slots).
    """
    rows, m = mine[0].shape[:2]
    earlier = before(mine, theirs)  # rows × m (mine) × m (theirs)
    mine_at = torch.arange(m) + earlier.sum(2)
    theirs_at = torch.arange(m) + (~earlier).sum(1)
    out = []
    for a, b in zip(mine, theirs, strict=True):
        merged = torch.empty((rows, 2 * m, *a.shape[2:]), dtype=a.dtype)
        for source, at in ((a, mine_at), (b, theirs_at)):
            index = at.view(rows, m, *([1] * (a.ndim - 2))).expand_as(source)
            merged.scatter_(1, index, source)
        out.append(merged[:, :m].contiguous())
    return out


def _top_before(mine: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Top-k order (fields ``value, key, ...``): larger value first, then smaller key."""
    a_value, b_value = mine[0][:, :, None], theirs[0][:, None, :]
    a_key, b_key = mine[1][:, :, None], theirs[1][:, None, :]
    return (b_value > a_value) | ((b_value == a_value) & (b_key < a_key))


def _priority_before(mine: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sample order (fields ``key, priority, ...``): lower priority first (real priorities are
    distinct hashes; empty slots hold ``KEY_SENTINEL``)."""
    return theirs[1][:, None, :] < mine[1][:, :, None]


def _descending_bits(values: torch.Tensor) -> torch.Tensor:
    """int64 in ``[0, 2³²)`` ordered like ``-values`` (float32, no NaN; ``-0.0`` is ``0.0``)."""
    bits = (values.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
    ascending = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (2**31 - 1) - ascending


def _slots(group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Each entry's place within its group, for entries sorted by group."""
    counts = torch.bincount(group, minlength=n_groups)
    start = torch.cumsum(counts, 0) - counts
    return torch.arange(group.numel()) - start[group]


@attrs.frozen
class SweepSettings:
    """What a ``ComponentStats`` keeps: sizes only (no tensors), stored in the manifest."""

    top_k: int = 20
    samples: int = 32
    bin_samples: int = 4
    window_before: int = 8
    window_after: int = 4

    @property
    def window(self) -> int:
        return self.window_before + 1 + self.window_after


@attrs.frozen
class Rows:
    """One batch of one (DST, pass, layer): ``values`` is examples × components (float32),
    ``keys`` the example keys (ascending), ``window`` the row index of each example's
    neighbouring tokens (examples × window, ``-1`` outside the prompt or for token pairs)."""

    values: torch.Tensor
    keys: torch.Tensor
    window: torch.Tensor


class _Batch:
    """What one pass over a batch yields: its scalar statistics (count, moments, extremes,
    histogram), each value's (component, bin) group (``n·N_BINS`` for non-finite values), and
    the rows' priorities and their order."""

    def __init__(self, rows: Rows) -> None:
        values = rows.values.to(torch.float32).contiguous()
        self.values = values
        n_rows, n = values.shape
        total = values.sum(0, dtype=torch.float64)
        self.all_finite = bool(torch.isfinite(total).all())  # the usual case: no masking
        self.finite: torch.Tensor | None = None
        self.scalars = self._moments(total) if self.all_finite else self._masked_moments()
        codes = bin_codes(values)
        codes += (torch.arange(n, dtype=torch.int32) * N_BINS)[None, :]
        if self.finite is not None:
            codes.masked_fill_(~self.finite, n * N_BINS)
        self.group = codes
        counts = torch.bincount(codes.view(-1), minlength=n * N_BINS + 1)
        self.scalars["hist"] = counts[: n * N_BINS].view(n, N_BINS)
        self.priority = priority_of(rows.keys)
        self.order = torch.argsort(self.priority)  # real priorities are distinct
        self.rank = torch.empty_like(self.order)
        self.rank[self.order] = torch.arange(n_rows)

    def _moments(self, total: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every value finite: two passes in float64, the second by blocks of rows that stay
        in cache."""
        values = self.values
        n_rows, n = values.shape
        count = torch.full((n,), n_rows, dtype=torch.int64)
        mean = total / count.clamp_min(1).to(torch.float64)
        m2, m3, m4 = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
        block = max(1, 2**17 // max(n, 1))
        for start in range(0, n_rows, block):
            d = values[start : start + block].to(torch.float64)
            d -= mean
            d2 = d * d
            m2 += d2.sum(0)
            d *= d2
            m3 += d.sum(0)
            d2 *= d2
            m4 += d2.sum(0)
        return {
            "count": count,
            "nonfinite": torch.zeros(n, dtype=torch.int64),
            "nonzero": torch.count_nonzero(values, 0),
            "mean": mean,
            "m2": m2,
            "m3": m3,
            "m4": m4,
            "min": values.amin(0).to(torch.float64),
            "max": values.amax(0).to(torch.float64),
        }

    def _masked_moments(self) -> dict[str, torch.Tensor]:
        """Some values NaN or infinite: those are counted in ``nonfinite`` and skipped."""
        values = self.values
        n_rows = values.shape[0]
        finite = torch.isfinite(values)
        self.finite = finite
        x = torch.where(finite, values, 0.0).to(torch.float64)
        count = finite.sum(0)
        mean = x.sum(0) / count.clamp_min(1).to(torch.float64)
        d = torch.where(finite, x - mean, 0.0)
        d2 = d * d
        return {
            "count": count,
            "nonfinite": n_rows - count,
            "nonzero": (finite & (values != 0)).sum(0),
            "mean": torch.where(count > 0, mean, 0.0),
            "m2": d2.sum(0),
            "m3": (d2 * d).sum(0),
            "m4": (d2 * d2).sum(0),
            "min": torch.where(finite, x, math.inf).amin(0),
            "max": torch.where(finite, x, -math.inf).amax(0),
        }

    def scored(self) -> torch.Tensor:
        """Values with non-finite ones as ``-inf`` (never above a top-k threshold)."""
        if self.finite is None:
            return self.values
        return torch.where(self.finite, self.values, -math.inf)


FIELDS = (
    "count",
    "nonfinite",
    "nonzero",
    "mean",
    "m2",
    "m3",
    "m4",
    "min",
    "max",
    "hist",
    "top_value",
    "top_key",
    "top_context",
    "sample_key",
    "sample_priority",
    "sample_value",
    "bin_key",
    "bin_priority",
    "bin_value",
)
SHARD_FIELDS = tuple(f for f in FIELDS if f != "bin_priority")
"""What a shard file holds: ``bin_priority`` is a hash of ``bin_key``, recomputed on load."""
RESULT_FIELDS = tuple(f for f in FIELDS if not f.startswith("bin_"))
"""What the results file holds of the merged state: the per-bin tables only serve merging and
``finalize`` (whose per-quantile samples the results file holds)."""
_TOP = ("top_value", "top_key", "top_context")
_TOP_EMPTY = (-math.inf, KEY_SENTINEL, math.nan)
_BINS = ("bin_key", "bin_priority", "bin_value")
_BINS_EMPTY = (KEY_SENTINEL, KEY_SENTINEL, math.nan)


class ComponentStats:
    """Mergeable statistics of ``n`` components (see the module docstring)."""

    def __init__(self, tensors: dict[str, torch.Tensor], settings: SweepSettings) -> None:
        self.t = tensors
        self.settings = settings

    @classmethod
    def empty(cls, n: int, settings: SweepSettings) -> ComponentStats:
        s = settings
        f64 = torch.float64
        return cls(
            {
                "count": torch.zeros(n, dtype=torch.int64),
                "nonfinite": torch.zeros(n, dtype=torch.int64),
                "nonzero": torch.zeros(n, dtype=torch.int64),
                "mean": torch.zeros(n, dtype=f64),
                "m2": torch.zeros(n, dtype=f64),
                "m3": torch.zeros(n, dtype=f64),
                "m4": torch.zeros(n, dtype=f64),
                "min": torch.full((n,), math.inf, dtype=f64),
                "max": torch.full((n,), -math.inf, dtype=f64),
                "hist": torch.zeros(n, N_BINS, dtype=torch.int64),
                "top_value": torch.full((n, s.top_k), -math.inf),
                "top_key": torch.full((n, s.top_k), KEY_SENTINEL),
                "top_context": torch.full((n, s.top_k, s.window), math.nan),
                "sample_key": torch.full((s.samples,), KEY_SENTINEL),
                "sample_priority": torch.full((s.samples,), KEY_SENTINEL),
                "sample_value": torch.full((s.samples, n), math.nan),
                "bin_key": torch.full((n, N_BINS, s.bin_samples), KEY_SENTINEL),
                "bin_priority": torch.full((n, N_BINS, s.bin_samples), KEY_SENTINEL),
                "bin_value": torch.full((n, N_BINS, s.bin_samples), math.nan),
            },
            settings,
        )

    @property
    def n(self) -> int:
        return int(self.t["count"].numel())

    # --- one batch ------------------------------------------------------------------------

    @classmethod
    def of_rows(cls, rows: Rows, settings: SweepSettings) -> ComponentStats:
        """The statistics of one batch alone (merged into a running state by ``merge``)."""
        batch = _Batch(rows)
        out = cls.empty(rows.values.shape[1], settings)
        out.t.update(batch.scalars)
        out.t.update(out._batch_sample(rows, batch))
        out._absorb_top(rows, batch)
        out._absorb_bins(rows, batch)
        return out

    def update(self, rows: Rows) -> ComponentStats:
        """``self.merge(ComponentStats.of_rows(rows))``, computed the cheap way.

        The batch's own top-k and per-bin tables are never built: an entry can enter a table
        only if it beats the table's current last slot (the k-th value of its component, the
        m-th priority of its component and bin), so one comparison per entry finds the few
        candidates, and only those are sorted and merged in.  Same result as ``merge``: each
        table is the first slots of the union under a total order.  Nothing is modified in
        place: the result shares this state's unchanged tensors.
        """
        batch = _Batch(rows)
        own = ComponentStats({**batch.scalars, **self._batch_sample(rows, batch)}, self.settings)
        out = ComponentStats(dict(self.t), self.settings)
        out.t.update(self._merge_scalars(own))
        out.t.update(self._merge_samples(own))
        out._absorb_top(rows, batch)
        out._absorb_bins(rows, batch)
        return out

    def _batch_sample(self, rows: Rows, batch: _Batch) -> dict[str, torch.Tensor]:
        """The uniform sample of the batch alone: its rows of lowest priority, in order."""
        size = self.settings.samples
        take = batch.order[:size]
        key = torch.full((size,), KEY_SENTINEL)
        priority = torch.full((size,), KEY_SENTINEL)
        value = torch.full((size, batch.values.shape[1]), math.nan)
        key[: take.numel()] = rows.keys[take]
        priority[: take.numel()] = batch.priority[take]
        value[: take.numel()] = batch.values[take]
        return {"sample_key": key, "sample_priority": priority, "sample_value": value}

    def _absorb_top(self, rows: Rows, batch: _Batch) -> None:
        """Top-k tables with the batch's entries at or above each component's k-th value.

        Until a component's table is full its threshold is a lower bound of the batch's own
        k-th value: the k-th largest maximum of row groups (k groups reach it)."""
        values, k = batch.values, self.settings.top_k
        n_rows, n = values.shape
        threshold = self.t["top_value"][:, -1]  # -inf until full
        if n_rows > k and bool(torch.isinf(threshold).any()):
            threshold = torch.maximum(threshold, self._batch_bound(batch, k))
        flat = (values >= threshold).view(-1).nonzero().squeeze(1)  # rows ascending
        if batch.finite is not None:
            flat = flat[batch.finite.view(-1)[flat]]
        if not bool((rows.keys[1:] > rows.keys[:-1]).all()):
            flat = flat[torch.argsort(rows.keys[flat // n], stable=True)]
        value = values.view(-1).index_select(0, flat)
        column = flat % n
        # Stable sort by (component, value descending): ties keep key order.
        order = torch.argsort((column << 32) | _descending_bits(value), stable=True)
        flat, column, value = flat[order], column[order], value[order]
        slot = _slots(column, n)
        keep = slot < k
        flat, column, value, place = flat[keep], column[keep], value[keep], column[keep] * k
        place += slot[keep]
        row = torch.div(flat, n, rounding_mode="floor")
        theirs = [
            torch.full(self.t[f].shape, fill, dtype=self.t[f].dtype)
            for f, fill in zip(_TOP, _TOP_EMPTY, strict=True)
        ]
        theirs[0].view(-1).index_copy_(0, place, value)
        theirs[1].view(-1).index_copy_(0, place, rows.keys.index_select(0, row))
        neighbours = rows.window.index_select(0, row)
        spots = (neighbours.clamp_min(0) * n + column[:, None]).view(-1)
        context = values.view(-1).index_select(0, spots).view(neighbours.shape)
        context.masked_fill_(neighbours < 0, math.nan)
        theirs[2].view(-1, theirs[2].shape[2]).index_copy_(0, place, context)
        if bool(torch.isinf(self.t["top_value"][:, 0]).all()):  # nothing to merge with
            self.t.update(zip(_TOP, theirs, strict=True))
            return
        merged = merge_sorted([self.t[f] for f in _TOP], theirs, _top_before)
        self.t.update(zip(_TOP, merged, strict=True))

    @staticmethod
    def _batch_bound(batch: _Batch, k: int) -> torch.Tensor:
        """Per component, a value at or below the batch's k-th largest."""
        scored = batch.scored()
        n_rows = scored.shape[0]
        groups = 4 * k
        size = n_rows // groups
        if size < 2:
            return torch.topk(scored, k, dim=0).values[-1]
        maxima = scored[: groups * size].view(groups, size, -1).amax(1)
        return torch.topk(maxima, k, dim=0).values[-1]

    def _absorb_bins(self, rows: Rows, batch: _Batch) -> None:
        """Per-bin tables with the batch's entries whose priority beats their (component,
        bin)'s m-th.

        Rows are taken in priority order, in stages while many entries could still enter (a
        shard's first batch: the lowest-priority rows fill the dense bins, after which later
        rows offer only their rare values).  A stage's candidates are found by one comparison
        per entry; their first ``m`` per group (by priority, i.e. by rank in the batch) come
        from ``m`` rounds of a scatter-minimum, not a sort, and are merged into the tables.
        """
        n_rows, n = batch.values.shape
        n_groups = n * N_BINS
        m = self.settings.bin_samples
        tables = [self.t[f].reshape(n_groups, m).clone() for f in _BINS]  # updated in place
        hist = batch.scalars["hist"].reshape(-1).to(torch.float64)
        start, stage = 0, 64
        while start < n_rows:
            last = tables[1][:, -1]
            # expected candidates if every remaining row went in one stage (uniform hashes)
            share = (last.to(torch.float64) / 2.0**62).clamp(max=1.0)
            expected = float((hist * share).sum()) * (n_rows - start) / n_rows
            end = n_rows
            if expected > n_rows * n / 8 and n_rows - start > 2 * stage:
                end, stage = start + stage, 4 * stage
            group, rank = self._bin_candidates(batch, last, start, end)
            if group.numel():
                self._enter_bins(tables, rows, batch, group, rank)
            start = end
        self.t.update(
            (f, table.reshape(self.t[f].shape)) for f, table in zip(_BINS, tables, strict=True)
        )

    @staticmethod
    def _bin_candidates(
        batch: _Batch, last: torch.Tensor, start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(group, rank) of the entries of the rows ranked ``start..end-1`` that may beat
        their group's m-th priority ``last``: compared on the top 29 bits (a superset; the
        merge is exact)."""
        n_rows, n = batch.values.shape
        coarse = torch.cat([last >> 33, torch.tensor([-1])]).to(torch.int32)  # + a never-group
        if start == 0 and end == n_rows:
            group, priority = batch.group, batch.priority
        else:
            picked = batch.order[start:end]
            group, priority = batch.group.index_select(0, picked), batch.priority[picked]
        beats = (priority >> 33).to(torch.int32)[:, None] <= coarse.index_select(
            0, group.view(-1)
        ).view(group.shape)
        flat = beats.view(-1).nonzero().squeeze(1)
        at = torch.div(flat, n, rounding_mode="floor")
        rank = batch.rank[at] if start == 0 and end == n_rows else at + start
        return group.view(-1)[flat].to(torch.int64), rank

    def _enter_bins(
        self,
        tables: list[torch.Tensor],
        rows: Rows,
        batch: _Batch,
        group: torch.Tensor,
        rank: torch.Tensor,
    ) -> None:
        """Merge the candidates into ``tables`` (in place): per group, the first ``m`` by
        rank."""
        n_rows = batch.values.shape[0]
        n_groups, m = tables[0].shape
        first = torch.empty((n_groups, m), dtype=torch.int64)
        previous = torch.full((n_groups,), -1, dtype=torch.int64)
        for j in range(m):  # the j-th lowest rank per group: the lowest above the (j-1)-th
            later = rank > previous.index_select(0, group)
            low = torch.full((n_groups,), n_rows, dtype=torch.int64)
            low.scatter_reduce_(0, group, torch.where(later, rank, n_rows), "amin")
            first[:, j] = low
            previous = low
        touched = (first[:, 0] < n_rows).nonzero().squeeze(1)
        first = first.index_select(0, touched)
        real = first < n_rows
        row = batch.order.index_select(0, first.clamp(max=n_rows - 1).view(-1))
        column = torch.div(touched, N_BINS, rounding_mode="floor")
        spots = (row.view(first.shape) * batch.values.shape[1] + column[:, None]).view(-1)
        theirs = [
            torch.where(real, rows.keys.index_select(0, row).view(first.shape), KEY_SENTINEL),
            torch.where(real, batch.priority.index_select(0, row).view(first.shape), KEY_SENTINEL),
            torch.where(
                real, batch.values.view(-1).index_select(0, spots).view(first.shape), math.nan
            ),
        ]
        mine = [t.index_select(0, touched) for t in tables]
        if not bool((mine[1][:, 0] == KEY_SENTINEL).all()):
            theirs = merge_sorted(mine, theirs, _priority_before)
        for table, new in zip(tables, theirs, strict=True):
            table.index_copy_(0, touched, new)

    # --- merging --------------------------------------------------------------------------

    def merge(self, other: ComponentStats) -> ComponentStats:
        """The statistics of both inputs together (neither is modified)."""
        out = self._merge_scalars(other)
        out.update(self._merge_samples(other))
        top = merge_sorted([self.t[f] for f in _TOP], [other.t[f] for f in _TOP], _top_before)
        out.update(zip(_TOP, top, strict=True))
        m = self.settings.bin_samples
        bins = merge_sorted(
            [self.t[f].reshape(-1, m) for f in _BINS],
            [other.t[f].reshape(-1, m) for f in _BINS],
            _priority_before,
        )
        out.update((f, b.reshape(self.t[f].shape)) for f, b in zip(_BINS, bins, strict=True))
        return ComponentStats(out, self.settings)

    def _merge_scalars(self, other: ComponentStats) -> dict[str, torch.Tensor]:
        a, b = self.t, other.t
        out: dict[str, torch.Tensor] = {}
        na, nb = a["count"].to(torch.float64), b["count"].to(torch.float64)
        n = na + nb
        safe = n.clamp_min(1)
        delta = b["mean"] - a["mean"]
        out["count"] = a["count"] + b["count"]
        out["nonfinite"] = a["nonfinite"] + b["nonfinite"]
        out["nonzero"] = a["nonzero"] + b["nonzero"]
        out["mean"] = torch.where(n > 0, a["mean"] + delta * nb / safe, 0.0)
        out["m2"] = a["m2"] + b["m2"] + delta**2 * na * nb / safe
        out["m3"] = (
            a["m3"]
            + b["m3"]
            + delta**3 * na * nb * (na - nb) / safe**2
            + 3 * delta * (na * b["m2"] - nb * a["m2"]) / safe
        )
        out["m4"] = (
            a["m4"]
            + b["m4"]
            + delta**4 * na * nb * (na * na - na * nb + nb * nb) / safe**3
            + 6 * delta**2 * (na * na * b["m2"] + nb * nb * a["m2"]) / safe**2
            + 4 * delta * (na * b["m3"] - nb * a["m3"]) / safe
        )
        out["min"] = torch.minimum(a["min"], b["min"])
        out["max"] = torch.maximum(a["max"], b["max"])
        out["hist"] = a["hist"] + b["hist"]
        return out

    def _merge_samples(self, other: ComponentStats) -> dict[str, torch.Tensor]:
        size = self.settings.samples
        key = torch.cat([self.t["sample_key"], other.t["sample_key"]])
        priority = torch.cat([self.t["sample_priority"], other.t["sample_priority"]])
        value = torch.cat([self.t["sample_value"], other.t["sample_value"]])
        order = first_per_group(torch.zeros_like(key), [priority, key], size)[0]
        return {
            "sample_key": key[order],
            "sample_priority": priority[order],
            "sample_value": value[order],
        }

    # --- results --------------------------------------------------------------------------

    def finalize(self) -> dict[str, torch.Tensor]:
        """Derived results: variance, skewness, excess kurtosis (population moments), quantile
        boundaries at the histogram's resolution, and ``bin_samples`` examples per quantile bin
        (the lowest priorities among the examples whose histogram bin lies in it)."""
        t = self.t
        n = t["count"].to(torch.float64)
        safe = n.clamp_min(1)
        variance = t["m2"] / safe
        spread = t["m2"] > 0
        m2 = t["m2"].where(spread, 1.0)
        out = {
            "variance": torch.where(n > 0, variance, math.nan),
            "skewness": torch.where(spread, safe.sqrt() * t["m3"] / m2**1.5, math.nan),
            "kurtosis": torch.where(spread, safe * t["m4"] / m2**2 - 3.0, math.nan),
            "fraction_nonzero": torch.where(n > 0, t["nonzero"] / safe, math.nan),
        }
        below = torch.cumsum(t["hist"], 1) - t["hist"]  # examples in lower bins
        levels = torch.tensor(QUANTILES, dtype=torch.float64)
        # quantile bin of each histogram bin: how many levels its lower count has reached
        qbin = (below[:, :, None].to(torch.float64) >= levels * n[:, None, None]).sum(2)
        edges = torch.tensor(bin_edges(), dtype=torch.float64)
        first_bin = torch.stack(
            [(qbin >= j).to(torch.int64).argmax(1) for j in range(1, len(QUANTILES) + 1)], 1
        )
        has = torch.stack([(qbin >= j).any(1) for j in range(1, len(QUANTILES) + 1)], 1)
        has = has & (n > 0)[:, None]
        out["quantile_boundaries"] = torch.where(has, edges[first_bin], math.nan)
        out["quantile_key"], out["quantile_value"] = self._quantile_samples(qbin)
        return out

    def _quantile_samples(self, qbin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per quantile bin, the m lowest priorities among the slots of its histogram bins
        (real priorities are distinct, so ``topk`` has no ties to break among them)."""
        t, m = self.t, self.settings.bin_samples
        priority = t["bin_priority"].reshape(self.n, -1)
        key, value = t["bin_key"].reshape(self.n, -1), t["bin_value"].reshape(self.n, -1)
        slot_bin = qbin.repeat_interleave(m, dim=1)
        keys, values = [], []
        for q in range(len(QUANTILES) + 1):
            masked = torch.where(slot_bin == q, priority, KEY_SENTINEL)
            low, index = torch.topk(masked, m, dim=1, largest=False)
            empty = low == KEY_SENTINEL
            keys.append(torch.where(empty, KEY_SENTINEL, key.gather(1, index)))
            values.append(torch.where(empty, math.nan, value.gather(1, index)))
        return torch.stack(keys, 1), torch.stack(values, 1)

    def to_tensors(self, prefix: str, fields: Sequence[str] = SHARD_FIELDS) -> dict[str, Any]:
        return {f"{prefix}/{name}": self.t[name].contiguous() for name in fields}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], prefix: str, settings: SweepSettings
    ) -> ComponentStats:
        """A state from a shard file (``to_tensors``): ``bin_priority`` is recomputed."""
        t = {name: tensors[f"{prefix}/{name}"] for name in SHARD_FIELDS}
        key = t["bin_key"]
        t["bin_priority"] = torch.where(
            key == KEY_SENTINEL, KEY_SENTINEL, priority_of(key.reshape(-1)).view(key.shape)
        )
        return cls(t, settings)

    def identical(self, other: ComponentStats, fields: Sequence[str] = FIELDS) -> bool:
        """Bit-for-bit equality of ``fields`` (NaN slots included, unlike ``==``)."""
        return all(
            self.t[f].dtype == other.t[f].dtype
            and self.t[f].shape == other.t[f].shape
            and self.t[f].numpy().tobytes() == other.t[f].numpy().tobytes()
            for f in fields
        )
