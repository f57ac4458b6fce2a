"""The instant CLI: listing, checking, vocab and scaffolding never import torch or transformers.

DST declarations and plugin metadata load without torch (kernels import it when they run), so
``scalarlens dsts`` starts in a fraction of ``import torch``.  Each command runs in a fresh
process with every installed plugin, which reports the heavy modules it imported at exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers")

PROBE = """
import atexit, json, os, sys

def _report():
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
    with open(os.environ["STARTUP_PROBE_OUT"], "w") as fh:
        json.dump(heavy, fh)

atexit.register(_report)
{body}
"""

CLI = """
import runpy
sys.argv = ["scalarlens", *sys.argv[1:]]
runpy.run_module("scalarlens.cli", run_name="__main__")
"""


def _probe(
    tmp_path: Path, body: str, *args: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ``body`` in a fresh interpreter; return the run and the heavy modules it imported."""
    out = tmp_path / "heavy.json"
    env = {**os.environ, "STARTUP_PROBE_OUT": str(out)}
    for name in ("SCALARLENS_PLUGINS", "SCALARLENS_BLOCK_PLUGINS", "SCALARLENS_PREFER"):
        env.pop(name, None)
    code = PROBE.format(heavy=HEAVY, body=body)
    run = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    heavy: list[str] = json.loads(out.read_text())
    return run, heavy


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("dsts",),
        ("dsts", "--json"),
        ("plugins",),
        ("plugins", "--json"),
        ("plugins", "--check"),
        ("vocab",),
        ("vocab", "--json"),
        ("new-plugin", "startup_probe", "--dir", "scaffold"),
    ],
    ids=" ".join,
)
def test_cli_command_does_not_import_torch(tmp_path: Path, args: tuple[str, ...]) -> None:
    run, heavy = _probe(tmp_path, CLI, *args)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip()
    assert heavy == [], f"scalarlens {' '.join(args)} imported {heavy[:5]}"


def test_every_installed_plugin_loads_without_torch(tmp_path: Path) -> None:
    """Not vacuous: the plugins above were all loaded (none failed on a missing torch)."""
    run, heavy = _probe(tmp_path, CLI, "plugins", "--json")
    records = json.loads(run.stdout)
    assert {r["name"] for r in records} >= {"builtins"}
    assert all(r["status"] == "loaded" for r in records), records
    assert heavy == []


def test_vocab_without_a_model_lists_the_models_words(tmp_path: Path) -> None:
    import scalarlens

    run, heavy = _probe(tmp_path, CLI, "vocab", "--json")
    words = [r["word"] for r in json.loads(run.stdout)]
    assert words == list(scalarlens.load_model("tiny-induction").tokenizer.vocab)
    assert heavy == []


REGISTRY = """
import scalarlens

registry = scalarlens.registry
examples = registry.dst_examples()
derivers = [registry.get(name, examples.get(name)) for name in registry.names()]
registry.dst("mlp.write_norm")
assert "torch" not in sys.modules, "building derivers imported torch"
store = scalarlens.derive("tiny-induction", "the old king saw a red fox", "mlp.write_norm")
assert store.get("mlp.write_norm", 0).shape[0] == 7
"""


def test_registry_builds_every_deriver_without_torch_until_a_kernel_runs(tmp_path: Path) -> None:
    run, heavy = _probe(tmp_path, REGISTRY)
    assert run.returncode == 0, run.stderr
    assert "torch" in heavy  # the derive at the end ran kernels, so it is loaded by then
