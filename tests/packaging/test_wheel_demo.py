"""``pip install scalarlens`` (the wheel, no extras) then ``scalarlens demo``, as a user would.

A fresh virtual environment (no system site packages: the dev venv has matplotlib) gets
``torch==2.13.0`` and the wheel built from a copy of the sources.  About 30 s here: pip runs
from the dev venv (``--python``), so the new venv needs no pip of its own, and nothing is
byte-compiled at install time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCH_SPEC = "torch==2.13.0"  # the Makefile's spec: a CPU build in the local pip cache
HINT = "figure: not drawn (matplotlib is not installed); to get it: pip install 'scalarlens[plot]'"


def _pip(*args: str, python: Path | None = None) -> subprocess.CompletedProcess[str]:
    target = ["--python", str(python)] if python else []
    return subprocess.run(
        [sys.executable, "-m", "pip", *target, *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _wheel(tmp: Path) -> Path:
    """Build from a copy so the working tree's build/ (the editable link tree) is left alone."""
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("core", "builtin_derivers"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    built = _pip("wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp))
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp.glob("scalarlens-*.whl")
    return wheel


def test_demo_from_the_wheel_without_matplotlib(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = _pip("install", "-q", "--no-compile", TORCH_SPEC, str(wheel), python=python)
    if installed.returncode and "No matching distribution found" in installed.stderr:
        pytest.skip(f"{TORCH_SPEC} is not installable here (no local cache or index)")
    assert installed.returncode == 0, installed.stderr

    probe = (
        "import importlib.util as u, scalarlens; print(u.find_spec('matplotlib'), "
        "scalarlens.__file__)"
    )
    where = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    assert where.stdout.split()[0] == "None"  # really without matplotlib
    assert where.stdout.split()[1].startswith(str(venv))  # the wheel, not the editable install

    cwd = tmp_path / "work"
    cwd.mkdir()
    run = subprocess.run(
        [str(venv / "bin" / "scalarlens"), "demo", "--top", "3"],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "Top components by estimated total effect" in run.stdout
    assert "Top components by direct effect" in run.stdout
    assert run.stdout.rstrip().splitlines()[-1] == HINT
    assert run.stderr == ""  # no warning either (torch warns on import without numpy)
    assert list(cwd.iterdir()) == []
