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
_CHUNK = 64


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


def bin_of(values: torch.Tensor) -> torch.Tensor:
    """Fixed symmetric log bins, one per octave: ``|x| < 2⁻¹⁴`` is the zero bin, then
    ``[2ʲ, 2ʲ⁺¹)`` for ``j`` from -14 to 13 on each side (larger magnitudes in the outermost
    bins); bin order is value order.  Read from the float32 exponent bits: no logarithm."""
    bits = values.to(torch.float32).view(torch.int32)
    exponent = ((bits & 0x7FFFFFFF) >> 23).to(torch.int64)  # |x| in [2^(e-127), 2^(e-126))
    j = (exponent - (127 + LOW_OCTAVE)).clamp(0, MAGNITUDE_BINS - 1)
    signed = torch.where(bits < 0, ZERO_BIN - 1 - j, ZERO_BIN + 1 + j)
    return torch.where(exponent < 127 + LOW_OCTAVE, ZERO_BIN, signed)


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


def merge_slots(
    mine: Sequence[torch.Tensor],
    theirs: Sequence[torch.Tensor],
    entering: torch.Tensor,
    order: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]],
) -> list[torch.Tensor]:
    """Per group (row), the first ``m`` slots of the union of two slot tables under ``order``.

    Fields are ``groups × m (× extra)`` tensors, the first holding keys (``KEY_SENTINEL``:
    empty slot, which ``order`` must put last).  Only groups where some entry of ``theirs``
    could enter (``entering``: it beats the last slot of ``mine``) are recomputed, by a stable
    sort of each touched row of ``2m`` slots; the rest are ``mine`` unchanged.  The result is
    the first ``m`` of the union under a total order, whatever the order of the operands.
    """
    m = mine[0].shape[1]
    if bool((mine[0] == KEY_SENTINEL).all()):
        return [f.clone() for f in theirs]
    touched = entering.any(1).nonzero(as_tuple=True)[0]
    out = [f.clone() for f in mine]
    if touched.numel() == 0:
        return out
    both = [torch.cat([a[touched], b[touched]], 1) for a, b in zip(mine, theirs, strict=True)]
    rows = torch.arange(touched.numel())[:, None]
    perm = torch.arange(2 * m).expand(touched.numel(), 2 * m)
    for key in reversed(order(both)):  # least significant first: a stable lexicographic sort
        perm = perm.gather(1, torch.argsort(key.gather(1, perm), dim=1, stable=True))
    first = perm[:, :m]
    for target, source in zip(out, both, strict=True):
        target[touched] = source[rows, first]
    return out


def absorb(
    tables: Sequence[torch.Tensor],
    group: torch.Tensor,
    fields: Sequence[torch.Tensor],
    order: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]],
    empty: Sequence[float],
) -> list[torch.Tensor]:
    """Slot tables (``groups × m (× extra)``, keys first) with candidate entries added: each
    touched group keeps its first ``m`` of old and new entries under ``order``."""
    m = tables[0].shape[1]
    out = [t.clone() for t in tables]
    if group.numel() == 0:
        return out
    touched, local = torch.unique(group, return_inverse=True)
    old = [t[touched] for t in tables]
    g, s = (old[0] != KEY_SENTINEL).nonzero(as_tuple=True)
    every = torch.cat([g, local])
    merged = [torch.cat([o[g, s], f]) for o, f in zip(old, fields, strict=True)]
    kept, rank = first_per_group(every, order(merged), m)
    for target, source, fill in zip(out, merged, empty, strict=True):
        block = torch.full((touched.numel(), *target.shape[1:]), fill, dtype=target.dtype)
        block[every[kept], rank] = source[kept]
        target[touched] = block
    return out


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
    def of_rows(cls, rows: Rows, settings: SweepSettings, *, tables: bool = True) -> ComponentStats:
        """The statistics of one batch alone (merged into a running state by ``merge``);
        ``tables=False`` leaves the top-k and per-bin tables empty (``update`` fills them)."""
        values = rows.values
        n_rows, n = values.shape
        finite = torch.isfinite(values)
        all_finite = bool(finite.all())  # the usual case: skip the masking passes
        x = (values if all_finite else torch.where(finite, values, 0.0)).to(torch.float64)
        count = finite.sum(0)
        safe = count.clamp_min(1).to(torch.float64)
        mean = x.sum(0) / safe
        d = x - mean if all_finite else torch.where(finite, x - mean, 0.0)
        d2 = d * d
        out = cls.empty(n, settings)
        t = out.t
        t["count"] = count
        t["nonfinite"] = n_rows - count
        t["nonzero"] = ((values != 0) if all_finite else finite & (values != 0)).sum(0)
        t["mean"] = torch.where(count > 0, mean, 0.0)
        t["m2"], t["m3"], t["m4"] = d2.sum(0), (d2 * d).sum(0), (d2 * d2).sum(0)
        if all_finite:
            t["min"], t["max"] = x.amin(0), x.amax(0)
        else:
            t["min"] = torch.where(finite, x, math.inf).amin(0)
            t["max"] = torch.where(finite, x, -math.inf).amax(0)
        bins = bin_of(values)
        flat = bins + torch.arange(n) * N_BINS
        flat = flat.reshape(-1) if all_finite else flat[finite]
        t["hist"] = torch.bincount(flat, minlength=n * N_BINS).reshape(n, N_BINS)
        out._uniform_sample(rows)
        if tables:
            out._top_of_batch(rows, finite)
            out._samples_of_batch(rows, finite, bins)
        return out

    def _uniform_sample(self, rows: Rows) -> None:
        priority = priority_of(rows.keys)
        take = torch.argsort(priority, stable=True)[: self.settings.samples]
        self.t["sample_key"][: take.numel()] = rows.keys[take]
        self.t["sample_priority"][: take.numel()] = priority[take]
        self.t["sample_value"][: take.numel()] = rows.values[take]

    def _top_of_batch(self, rows: Rows, finite: torch.Tensor) -> None:
        s, (n_rows, n) = self.settings, rows.values.shape
        scored = rows.values if bool(finite.all()) else torch.where(finite, rows.values, -math.inf)
        k = min(s.top_k, n_rows)
        top = torch.topk(scored.T.contiguous(), k, dim=1)  # components × k
        threshold = top.values[:, -1]
        # ``topk`` picks arbitrarily among values tied at the threshold; where more than ``k``
        # reach it, take every entry that does and let the key decide.
        tied = ((scored >= threshold).sum(0) > k).nonzero(as_tuple=True)[0]
        row = top.indices.reshape(-1)
        column = torch.arange(n).repeat_interleave(k)
        if tied.numel():
            clear = ~torch.isin(column, tied)
            extra_row, extra_column = (scored[:, tied] >= threshold[tied]).nonzero(as_tuple=True)
            row = torch.cat([row[clear], extra_row])
            column = torch.cat([column[clear], tied[extra_column]])
        real = finite[row, column]
        row, column = row[real], column[real]
        value = rows.values[row, column]
        kept, rank = first_per_group(column, [-value.to(torch.float64), rows.keys[row]], k)
        row, column = row[kept], column[kept]
        self.t["top_value"][column, rank] = rows.values[row, column]
        self.t["top_key"][column, rank] = rows.keys[row]
        neighbours = rows.window[row]  # kept × window
        context = rows.values[neighbours.clamp_min(0), column[:, None]]
        self.t["top_context"][column, rank] = torch.where(neighbours >= 0, context, math.nan)

    def _samples_of_batch(self, rows: Rows, finite: torch.Tensor, bins: torch.Tensor) -> None:
        s, (n_rows, n) = self.settings, rows.values.shape
        priority = priority_of(rows.keys)
        order = torch.argsort(priority, stable=True)
        # Per (component, bin): the lowest priorities.  Rows are visited in priority order, in
        # chunks of growing size; an entry is kept while its (component, bin) has fewer than
        # ``m`` entries from earlier rows, its slot being that count.  After the first chunks
        # the dense bins are full and only rare values are looked at again.  No sort of the
        # batch: within a chunk, candidates sorted by group (stable) keep priority order.
        m = s.bin_samples
        width = N_BINS + 1  # an extra bin per component for non-finite values
        grouped = torch.where(finite, bins, N_BINS) + torch.arange(n) * width
        seen = torch.zeros(n * width, dtype=torch.int64)
        start, size = 0, 8
        while start < n_rows:
            chunk = order[start : start + size]
            groups = grouped[chunk]
            open_ = seen[groups] < m
            at, column = open_.nonzero(as_tuple=True)  # row-major: ascending priority
            group = groups[at, column]
            by_group = torch.argsort(group, stable=True)
            at, column, group = at[by_group], column[by_group], group[by_group]
            slot = seen[group] + torch.arange(group.numel()) - torch.searchsorted(group, group)
            keep = (slot < m) & finite[chunk[at], column]
            row, column, slot = chunk[at[keep]], column[keep], slot[keep]
            bin_ = bins[row, column]
            self.t["bin_key"][column, bin_, slot] = rows.keys[row]
            self.t["bin_priority"][column, bin_, slot] = priority[row]
            self.t["bin_value"][column, bin_, slot] = rows.values[row, column]
            seen += torch.bincount(groups.reshape(-1), minlength=seen.numel())
            start, size = start + size, min(2 * size, 128)

    # --- merging --------------------------------------------------------------------------

    def merge(self, other: ComponentStats) -> ComponentStats:
        """The statistics of both inputs together (neither is modified)."""
        out = self._merge_scalars(other)
        out.update(self._merge_top(other))
        out.update(self._merge_samples(other))
        out.update(self._merge_bins(other))
        return ComponentStats(out, self.settings)

    def update(self, rows: Rows) -> ComponentStats:
        """``self.merge(ComponentStats.of_rows(rows))``, computed the cheap way.

        The batch's own top-k and per-bin tables are never built: an entry can enter a table
        only if it beats the table's current last slot (the k-th value of its component, the
        m-th priority of its component and bin), so one comparison per entry finds the few
        candidates, and only the groups they touch are re-sorted.  Same result as ``merge``:
        each table is the first slots of the union under a total order.
        """
        if bool((self.t["top_key"] == KEY_SENTINEL).all()):
            return self.merge(ComponentStats.of_rows(rows, self.settings))
        batch = ComponentStats.of_rows(rows, self.settings, tables=False)
        out = self._merge_scalars(batch)
        out.update(self._merge_samples(batch))
        finite = torch.isfinite(rows.values)
        out.update(self._absorb_top(rows, finite))
        out.update(self._absorb_bins(rows, finite))
        return ComponentStats(out, self.settings)

    def _absorb_top(self, rows: Rows, finite: torch.Tensor) -> dict[str, torch.Tensor]:
        """Top-k tables with the batch's entries at or above each component's k-th value."""
        values = rows.values
        threshold = self.t["top_value"][:, -1]
        row, column = (values >= threshold).nonzero(as_tuple=True)
        if not bool(finite.all()):
            real = finite[row, column]
            row, column = row[real], column[real]
        value = values[row, column]
        neighbours = rows.window[row]
        context = torch.where(
            neighbours >= 0, values[neighbours.clamp_min(0), column[:, None]], math.nan
        )
        names = ("top_key", "top_value", "top_context")
        merged = absorb(
            [self.t[n] for n in names],
            column,
            [rows.keys[row], value, context],
            lambda f: [-f[1].to(torch.float64), f[0]],
            [KEY_SENTINEL, -math.inf, math.nan],
        )
        return dict(zip(names, merged, strict=True))

    def _absorb_bins(self, rows: Rows, finite: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-bin tables with the batch's entries whose priority beats their (component,
        bin)'s m-th."""
        values = rows.values
        m = self.settings.bin_samples
        n = self.n
        bins = bin_of(values)
        group = bins + torch.arange(n) * N_BINS
        priority = priority_of(rows.keys)
        last = self.t["bin_priority"].reshape(-1, m)[:, -1]
        beats = priority[:, None] <= last[group]
        if not bool(finite.all()):
            beats &= finite
        row, column = beats.nonzero(as_tuple=True)
        flat_group = group[row, column]
        names = ("bin_key", "bin_priority", "bin_value")
        tables = [self.t[n_].reshape(-1, m) for n_ in names]
        merged = absorb(
            tables,
            flat_group,
            [rows.keys[row], priority[row], values[row, column]],
            lambda f: [f[1]],  # real priorities are distinct
            [KEY_SENTINEL, KEY_SENTINEL, math.nan],
        )
        return {n_: f.reshape(self.t[n_].shape) for n_, f in zip(names, merged, strict=True)}

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

    def _merge_top(self, other: ComponentStats) -> dict[str, torch.Tensor]:
        names = ("top_key", "top_value", "top_context")
        threshold = self.t["top_value"][:, -1]  # -inf until full
        theirs = other.t
        entering = (theirs["top_key"] != KEY_SENTINEL) & (theirs["top_value"] >= threshold[:, None])
        merged = merge_slots(
            [self.t[n] for n in names],
            [theirs[n] for n in names],
            entering,
            lambda f: [-f[1].to(torch.float64), f[0]],
        )
        return dict(zip(names, merged, strict=True))

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

    def _merge_bins(self, other: ComponentStats) -> dict[str, torch.Tensor]:
        names = ("bin_key", "bin_priority", "bin_value")
        m = self.settings.bin_samples
        mine = [self.t[n].reshape(-1, m) for n in names]
        theirs = [other.t[n].reshape(-1, m) for n in names]
        threshold = mine[1][:, -1]  # KEY_SENTINEL until full
        entering = (theirs[0] != KEY_SENTINEL) & (theirs[1] <= threshold[:, None])
        # Priorities of real examples are distinct (a hash of distinct keys): one sort key.
        merged = merge_slots(mine, theirs, entering, lambda f: [f[1]])
        return {n: f.reshape(self.t[n].shape) for n, f in zip(names, merged, strict=True)}

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
        m = self.settings.bin_samples
        # Per quantile bin, the m lowest priorities among the slots of its histogram bins
        # (real priorities are distinct, so ``topk`` has no ties to break among them).
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
        out["quantile_key"] = torch.stack(keys, 1)
        out["quantile_value"] = torch.stack(values, 1)
        return out

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}/{name}": self.t[name].contiguous() for name in FIELDS}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], prefix: str, settings: SweepSettings
    ) -> ComponentStats:
        return cls({name: tensors[f"{prefix}/{name}"] for name in FIELDS}, settings)

    def identical(self, other: ComponentStats, fields: Sequence[str] = FIELDS) -> bool:
        """Bit-for-bit equality of ``fields`` (NaN slots included, unlike ``==``)."""
        return all(
            self.t[f].dtype == other.t[f].dtype
            and self.t[f].shape == other.t[f].shape
            and self.t[f].numpy().tobytes() == other.t[f].numpy().tobytes()
            for f in fields
        )


def settings_dict(settings: SweepSettings) -> dict[str, Any]:
    return attrs.asdict(settings)
