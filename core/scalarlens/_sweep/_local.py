"""The local engine (shards one after another in this process) and the final merge.

The merge folds every shard in shard order, whichever engine made them and in whatever order
they finished, so a local run, a Ray run and a resumed run write the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .._progress import Progress
from ._shard import ShardRunner
from ._stats import QUANTILES, ComponentStats, SweepSettings, bin_edges
from ._storage import RESULTS, load_tensors, save_tensors, shard_path, stats_of

ShardInput = tuple[int, Sequence[tuple[int, Sequence[int]]]]


def run_local(
    runner: ShardRunner, todo: Iterable[ShardInput], directory: Path, progress: Progress
) -> int:
    """Run each shard and write its file; returns how many shards ran."""
    ran = 0
    for index, prompts in todo:
        tensors, meta = runner.shard(index, prompts, progress.advance)
        save_tensors(shard_path(directory, index), tensors, meta)
        ran += 1
    return ran


def merge_shards(directory: Path, n_shards: int, settings: SweepSettings) -> None:
    """Fold shards ``0..n-1`` in order into ``results.safetensors`` (state + derived fields)."""
    state: dict[str, ComponentStats] = {}
    components: dict[str, Any] = {}
    prompts: list[list[int]] = []
    for index in range(n_shards):
        meta, tensors = load_tensors(shard_path(directory, index))
        prompts.append([meta["first_prompt"], meta["n_prompts"]])
        for prefix, stats in stats_of(tensors, meta, settings).items():
            components.setdefault(prefix, meta["components"][prefix])
            previous = state.get(prefix)
            state[prefix] = stats if previous is None else previous.merge(stats)
    tensors = {}
    for prefix in sorted(state):
        tensors.update(state[prefix].to_tensors(prefix))
        for name, value in state[prefix].finalize().items():
            tensors[f"{prefix}/{name}"] = value.contiguous()
    meta = {
        "components": {p: components[p] for p in sorted(components)},
        "shards": prompts,
        "quantiles": list(QUANTILES),
        "bin_edges": [str(e) for e in bin_edges()],
    }
    save_tensors(directory / RESULTS, tensors, meta)
