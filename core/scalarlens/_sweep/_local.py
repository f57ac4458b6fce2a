"""The local engine (shards one after another in this process) and the final merge.

The merge folds every shard in shard order, whichever engine made them and in whatever order
they finished, so a local run, a Ray run and a resumed run write the same bytes.  The local
engine folds each shard it runs as it goes (the state it just wrote, not the file read back:
the same tensors), and reads only the shards an earlier, interrupted run left.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .._progress import Progress
from ._shard import ShardRunner
from ._stats import QUANTILES, RESULT_FIELDS, ComponentStats, SweepSettings, bin_edges
from ._storage import RESULTS, load_tensors, save_tensors, shard_path, stats_of

ShardInput = tuple[int, Sequence[tuple[int, Sequence[int]]]]


class ShardFold:
    """Shards ``0, 1, 2, ...`` merged in order; memory: one running state per prefix."""

    def __init__(self, directory: Path, settings: SweepSettings) -> None:
        self.directory = directory
        self.settings = settings
        self.state: dict[str, ComponentStats] = {}
        self.components: dict[str, Any] = {}
        self.prompts: list[list[int]] = []

    @property
    def next(self) -> int:
        return len(self.prompts)

    def add(self, stats: dict[str, ComponentStats], meta: dict[str, Any]) -> None:
        """Fold the next shard (``meta["shard"]`` must be ``self.next``)."""
        assert meta["shard"] == self.next, (meta["shard"], self.next)
        self.prompts.append([meta["first_prompt"], meta["n_prompts"]])
        for prefix, part in stats.items():
            self.components.setdefault(prefix, meta["components"][prefix])
            previous = self.state.get(prefix)
            self.state[prefix] = part if previous is None else previous.merge(part)

    def read_until(self, end: int) -> None:
        """Fold the shard files ``self.next .. end - 1`` from the directory."""
        while self.next < end:
            meta, tensors = load_tensors(shard_path(self.directory, self.next))
            self.add(stats_of(tensors, meta, self.settings), meta)

    def write(self) -> None:
        """``results.safetensors``: the merged state (less the per-bin tables) + derived
        fields."""
        tensors = {}
        for prefix in sorted(self.state):
            tensors.update(self.state[prefix].to_tensors(prefix, RESULT_FIELDS))
            for name, value in self.state[prefix].finalize().items():
                tensors[f"{prefix}/{name}"] = value.contiguous()
        meta = {
            "components": {p: self.components[p] for p in sorted(self.components)},
            "shards": self.prompts,
            "quantiles": list(QUANTILES),
            "bin_edges": [str(e) for e in bin_edges()],
        }
        save_tensors(self.directory / RESULTS, tensors, meta)


def run_local(
    runner: ShardRunner,
    todo: Iterable[ShardInput],
    directory: Path,
    progress: Progress,
    fold: ShardFold | None = None,
) -> int:
    """Run each shard and write its file (folding it into ``fold``, if given, after the
    finished shards before it); returns how many shards ran."""
    ran = 0
    for index, prompts in todo:
        state, tensors, meta = runner.shard_state(index, prompts, progress.advance)
        save_tensors(shard_path(directory, index), tensors, meta)
        if fold is not None:
            fold.read_until(index)
            fold.add(state, meta)
        ran += 1
    return ran


def merge_shards(
    directory: Path, n_shards: int, settings: SweepSettings, fold: ShardFold | None = None
) -> None:
    """Fold shards ``0..n-1`` in order into ``results.safetensors`` (state + derived fields);
    ``fold`` holds the shards already folded in this process."""
    fold = fold or ShardFold(directory, settings)
    fold.read_until(n_shards)
    fold.write()
