from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

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
