"""The Ray engine (a local Ray with 2 CPUs) writes exactly what the local engine writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from scalarlens import sweep, synthetic_corpus

ray = pytest.importorskip("ray")


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_ray_and_local_runs_give_identical_manifests_and_tensors(tmp_path: Path) -> None:
    corpus = synthetic_corpus(16, seed=2)
    dsts = ["mlp.post_act", "attn.qk_logits", "mlp.act_times_grad"]  # one gradient DST
    common = dict(top_k=5, shard_size=4, batch_size=2, layers=[1])
    local = sweep("tiny-induction", corpus, dsts, out=tmp_path / "local", **common)  # type: ignore[arg-type]
    distributed = sweep(
        "tiny-induction",
        corpus,
        dsts,
        out=tmp_path / "ray",
        engine="ray",
        workers=2,
        **common,  # type: ignore[arg-type]
    )
    assert not ray.is_initialized()  # the engine shut down the Ray it started
    local_files, ray_files = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert sorted(ray_files) == sorted(local_files)
    assert [n for n in local_files if local_files[n] != ray_files[n]] == []
    assert local.run.engine == "local" and distributed.run.engine == "ray"
    workers = distributed.run.workers
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2
    assert [w["model_loads"] for w in workers] == [1, 1]  # once per worker, not per shard
    assert sum(w["shards"] for w in workers) == 4
