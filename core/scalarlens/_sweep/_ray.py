"""The Ray engine: shards as tasks on actors that each load the model once.

What travels to a worker is plain data: the ``SweepSpec`` (model spec string, DST names, the
``DstConfig`` as a dict, sizes) once per actor, then per shard its prompts as token ids.  What
comes back is the shard file's bytes, which the driver writes atomically into the output
directory — workers need no shared file system, and a shard is "done" exactly when its file is
in place on the driver, so a killed run resumes the same way as a local one.

At most two shards per worker are in flight, so the driver holds the token ids of a few shards,
not the corpus.  ``ray`` is imported only here (the optional extra ``scalarlens[ray]``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .._progress import Progress
from ..exceptions import ConfigError
from ._local import ShardInput
from ._shard import ShardRunner, SweepSpec
from ._storage import shard_bytes, shard_path, write_bytes


class ShardWorker:
    """One per Ray worker process: the model is loaded in ``__init__`` and reused."""

    def __init__(self, spec: SweepSpec, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.runner = ShardRunner(spec)
        self.shards = 0

    def run(self, index: int, prompts: list[tuple[int, list[int]]]) -> tuple[int, bytes, int]:
        tensors, meta = self.runner.shard(index, prompts)
        self.shards += 1
        return index, shard_bytes(tensors, meta), sum(len(t) for _, t in prompts)

    def info(self) -> dict[str, int]:
        return {"pid": os.getpid(), "model_loads": self.runner.model_loads, "shards": self.shards}


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "engine='ray' needs Ray: pip install 'scalarlens[ray]' (or use engine='local')"
        ) from None
    return ray


def run_ray(
    spec: SweepSpec,
    todo: Iterable[ShardInput],
    directory: Path,
    progress: Progress,
    *,
    address: str | None = None,
    workers: int = 2,
    threads: int | None = None,
) -> list[dict[str, int]]:
    """Run the shards on ``workers`` actors; returns each worker's ``info()``.

    ``address`` joins an existing cluster (``"auto"``, ``"ray://host:10001"``); without it a
    local Ray with ``workers`` CPUs is started and shut down again.  Workers use ``threads``
    torch threads (default: as many as this process), because a float reduction split over a
    different number of threads may round differently, and the output should not depend on
    the engine.
    """
    import torch

    ray = _ray()
    threads = threads or torch.get_num_threads()
    started = not ray.is_initialized()
    if started:
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            options["num_cpus"] = workers
        ray.init(address=address, **options)
    try:
        actor = ray.remote(num_cpus=1)(ShardWorker)
        pool = [actor.remote(spec, threads) for _ in range(workers)]
        _drive(ray, pool, todo, directory, progress)
        infos: list[dict[str, int]] = ray.get([w.info.remote() for w in pool])
        return infos
    finally:
        if started:
            ray.shutdown()


def _drive(
    ray: Any, pool: list[Any], todo: Iterable[ShardInput], directory: Path, progress: Progress
) -> None:
    shards: Iterator[ShardInput] = iter(todo)
    pending: dict[Any, Any] = {}

    def submit(worker: Any) -> bool:
        item = next(shards, None)
        if item is None:
            return False
        index, prompts = item
        payload = [(i, list(t)) for i, t in prompts]
        pending[worker.run.remote(index, payload)] = worker
        return True

    for worker in pool:
        for _ in range(2):
            submit(worker)
    while pending:
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        worker = pending.pop(ready)
        index, data, tokens = ray.get(ready)
        write_bytes(shard_path(directory, index), data)
        progress.advance(tokens)
        submit(worker)
