"""``scalarlens new-plugin``: the generated plugin installs, passes its tests, shows up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from scalarlens.cli import main
from scalarlens.exceptions import ConfigError


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_generated_plugin_installs_passes_its_tests_and_registers(tmp_path: Path) -> None:
    assert main(["new-plugin", "probe_demo", "--dir", str(tmp_path)]) == 0
    root = tmp_path / "scalarlens-probe_demo"
    assert (root / "pyproject.toml").is_file()
    install = _run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-e",
        str(root),
    )
    assert install.returncode == 0, install.stderr
    try:
        tests = _run(
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(root / "tests"),
            cwd=root,
        )
        assert tests.returncode == 0, tests.stdout + tests.stderr
        assert "passed" in tests.stdout
        listing = _run(sys.executable, "-m", "scalarlens.cli", "dsts")
        assert "probe_demo.post_act_squared" in listing.stdout
        plugins = _run(sys.executable, "-m", "scalarlens.cli", "plugins")
        assert "scalarlens-probe_demo" in plugins.stdout
    finally:
        _run(sys.executable, "-m", "pip", "uninstall", "-q", "-y", "scalarlens-probe_demo")
    after = _run(sys.executable, "-m", "scalarlens.cli", "dsts")
    assert "probe_demo.post_act_squared" not in after.stdout
    assert "mlp.post_act" in after.stdout  # uninstalling removed its DSTs and nothing else


def test_bad_names_and_existing_directories_are_refused(tmp_path: Path) -> None:
    from scalarlens._scaffold import write_plugin

    with pytest.raises(ConfigError, match="lowercase identifier"):
        write_plugin("My-Plugin", tmp_path)
    write_plugin("twice", tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        write_plugin("twice", tmp_path)
