from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from scalarlens.cli import main

from .test_registry_plugins import CHAINING


def test_dsts_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dsts"]) == 0
    table = capsys.readouterr().out
    assert "mlp.post_act" in table and "builtins" in table
    assert main(["dsts", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in records}
    assert by_name["mlp.post_act"]["shape"] == ["tokens", "mlp_acts"]
    assert by_name["logits"]["has_no_layers"] is True
    assert all(r["description"] for r in records)


def test_plugins_lists_failures(
    make_plugin_dist: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    make_plugin_dist("raise ImportError('nope')\n", dist="scalarlens-broken", version="0.2")
    make_plugin_dist(CHAINING, dist="scalarlens-example", version="1.2.3")
    from scalarlens import Registry

    assert main(["plugins", "--json"], registry=Registry()) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["broken"]["status"] == "failed" and "nope" in records["broken"]["error"]
    assert records["example"]["version"] == "1.2.3"
    assert records["example"]["dsts"] == ["example.double_post_act"]
    assert main(["plugins"], registry=Registry()) == 0
    out = capsys.readouterr().out
    assert "1 plugin(s) failed to load" in out


def test_console_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scalarlens.cli", "dsts"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "resid.post_mlp" in result.stdout


def _cli_with_site(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh process that also sees the throwaway distributions in ``site``."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    for name in ("SCALARLENS_PLUGINS", "SCALARLENS_BLOCK_PLUGINS", "SCALARLENS_PREFER"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "scalarlens.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_plugins_shows_load_times_and_names_slow_plugins(
    make_plugin_dist: Callable[..., str], tmp_path: Path
) -> None:
    make_plugin_dist("import time\ntime.sleep(0.3)\n", dist="scalarlens-sluggish")
    run = _cli_with_site(tmp_path / "site", "plugins")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "load ms" in lines[0]
    row = next(line for line in lines if line.startswith("sluggish "))
    assert int(row.split()[5]) >= 300
    slow = [line for line in lines if line.startswith("slow to load:")]
    assert len(slow) == 1 and re.fullmatch(r"slow to load: sluggish \(\d+ ms\)", slow[0])
    records = json.loads(_cli_with_site(tmp_path / "site", "plugins", "--json").stdout)
    assert {r["name"]: r["load_seconds"] for r in records}["sluggish"] >= 0.3


def test_plugins_check_passes_for_the_installed_plugins(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from scalarlens import Registry

    reg = Registry()
    code = main(["plugins", "--check"], registry=reg)
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.strip() == f"all {len(reg.plugins())} plugins OK"
    assert main(["plugins", "--check", "--json"], registry=reg) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []


DANGLING = """
from scalarlens import (DerivedScalarType, Dimension, DstReference, NodeType, ScalarDeriver,
                        hookimpl)
X = DerivedScalarType("dangling.x", (Dimension.TOKENS,), NodeType.LAYER, "x")
Y = DerivedScalarType("dangling.y", (Dimension.TOKENS,), NodeType.LAYER, "y")

def _factory(dst, reference):
    return lambda c: ScalarDeriver(dst, c, (DstReference(reference),), lambda i, l, ctx: i[0])

@hookimpl
def scalarlens_derivers():
    return {X: _factory(X, "mlp.post_akt"), Y: _factory(Y, "no.such_dst")}
"""


def test_plugins_check_reports_every_problem_grouped_by_plugin(
    make_plugin_dist: Callable[..., str], tmp_path: Path
) -> None:
    make_plugin_dist("raise ImportError('nope')\n", dist="scalarlens-broken")
    make_plugin_dist(DANGLING, dist="scalarlens-dangling")
    run = _cli_with_site(tmp_path / "site", "plugins", "--check")
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    broken, dangling = lines.index("broken:"), lines.index("dangling:")
    assert lines[broken + 1].startswith("  load: ") and "nope" in lines[broken + 1]
    assert (
        lines[dangling + 1].startswith("  dangling.x: ") and "mlp.post_akt" in lines[dangling + 1]
    )
    assert lines[dangling + 2].startswith("  dangling.y: ") and "no.such_dst" in lines[dangling + 2]
    assert lines[-1] == "3 problem(s) in 2 plugin(s)"
    assert "Traceback" not in run.stderr

    run = _cli_with_site(tmp_path / "site", "plugins", "--check", "--json")
    assert run.returncode == 1
    payload = json.loads(run.stdout)
    assert payload["ok"] is False
    problems = [(p["plugin"], p["subject"]) for p in payload["problems"]]
    assert sorted(problems) == [
        ("broken", "load"),
        ("dangling", "dangling.x"),
        ("dangling", "dangling.y"),
    ]


def test_vocab_lists_ids_with_words(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import scalarlens

    vocab = scalarlens.load_model().tokenizer.vocab  # type: ignore[attr-defined]
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["vocab"]) == 0
    table, footer = capsys.readouterr().out.split("\n\n")
    assert dict((int(i), w) for i, w in re.findall(r"(\d+) (\S+)", table)) == dict(enumerate(vocab))
    lines = table.splitlines()
    assert len(lines) < len(vocab) / 3 and max(map(len, lines)) <= 100  # columns, not a list
    assert footer.startswith(f"{len(vocab)} words")
    assert main(["vocab", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records == [{"id": i, "word": w} for i, w in enumerate(vocab)]


CLEAN = "the old king saw a red fox the old king saw a red"
CORRUPTED = "the old king saw a red cat the old king saw a red"


def test_derive_compare_prints_writes_json_and_draws(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    args = ["derive", "--prompt", CLEAN, "--baseline", CORRUPTED, "--target", "fox"]
    args += ["--distractor", "cat", "--dst", "attn.attribution_patching", "--compare"]
    assert main([*args, "--top", "3", "--plot", str(tmp_path / "c.png")]) == 0
    text = capsys.readouterr().out
    assert "baseline: the old king saw a red cat" in text
    assert "attn.activation_patching: top 3" in text  # --compare added the exact DST
    found = re.search(r"Pearson r = ([0-9.]+)", text)
    assert found and float(found.group(1)) > 0.9
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert main([*args, "--top", "2", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    (comparison,) = result["comparisons"]
    assert comparison["exact"] == "attn.activation_patching" and comparison["n"] == 104
    assert len(comparison["disagreements"]) == 2
    worst = comparison["disagreements"][0]
    assert abs(worst["estimate"] - worst["value"]) >= abs(
        comparison["disagreements"][1]["estimate"] - comparison["disagreements"][1]["value"]
    )
