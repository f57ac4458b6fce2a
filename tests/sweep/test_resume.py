"""Kill a sweep with SIGKILL at a random point, rerun it: the output is byte-identical."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scalarlens import load_sweep, sweep, synthetic_corpus

ARGS = dict(top_k=6, shard_size=3, batch_size=3, layers=[1])
SCRIPT = """
import sys
from scalarlens import sweep, synthetic_corpus
sweep("tiny-induction", synthetic_corpus(24, seed=1), ["mlp.post_act", "attn.qk_logits"],
      out=sys.argv[1], top_k=6, shard_size=3, batch_size=3, layers=[1])
"""


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _run(out: Path) -> None:
    sweep(
        "tiny-induction",
        synthetic_corpus(24, seed=1),
        ["mlp.post_act", "attn.qk_logits"],
        out=out,
        **ARGS,  # type: ignore[arg-type]
    )


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_then_rerun_gives_byte_identical_output(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    _run(reference)
    out = tmp_path / "killed"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    child = subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)])
    # Kill once the first shard is on disk, after a random extra delay (mid-shard or mid-write).
    deadline = time.monotonic() + 120
    while not list((out / "shards").glob("shard-*")) and child.poll() is None:
        assert time.monotonic() < deadline, "the sweep never wrote a shard"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.5))
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    finished = sorted(p.name for p in (out / "shards").glob("shard-*.safetensors"))
    assert 1 <= len(finished) <= 8, f"seed {seed}"
    assert not (out / "results.safetensors").exists() or len(finished) == 8
    result = sweep(
        "tiny-induction",
        synthetic_corpus(24, seed=1),
        ["mlp.post_act", "attn.qk_logits"],
        out=out,
        **ARGS,  # type: ignore[arg-type]
    )
    assert result.run.shards_run == 8 - len(finished), f"seed {seed}"
    leftovers = [p.name for p in out.rglob(".*")]  # temporary files of the killed write
    assert _files(out) == _files(reference), f"seed {seed}, leftovers {leftovers}"
    # No token lost or counted twice: every neuron saw each corpus token exactly once.
    n_tokens = result.manifest["corpus"]["n_tokens"]
    assert set(load_sweep(out).stats("mlp.post_act", 1)["count"].tolist()) == {n_tokens}
