"""The editable install resolves ``scalarlens`` from any working directory.

setuptools' default editable mode finds the packages with an import hook that runs after the
normal path search, so a folder named ``scalarlens`` in the current directory (a clone of this
repository, say) would win as an empty namespace package.  The Makefile installs in the
path-based "strict" mode instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import scalarlens

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "scalarlens": ROOT / "core" / "scalarlens",
    "scalarlens_builtins": ROOT / "builtin_derivers" / "scalarlens_builtins",
}

if not Path(scalarlens.__file__).resolve().is_relative_to(ROOT):
    pytest.skip("scalarlens is not installed from this checkout", allow_module_level=True)


def test_a_folder_named_like_the_package_does_not_shadow_it(tmp_path: Path) -> None:
    for name in PACKAGES:
        (tmp_path / name).mkdir()
    code = (
        "import os, scalarlens, scalarlens_builtins as b; "
        "print(os.path.realpath(scalarlens.__file__)); print(os.path.realpath(b.__file__))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert run.returncode == 0, run.stderr
    found = [Path(line) for line in run.stdout.split()]
    assert found == [folder / "__init__.py" for folder in PACKAGES.values()], (
        "an empty folder in the working directory shadows the editable install; reinstall "
        "with `make venv` (editable_mode=strict)"
    )


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_source_module_is_installed(package: str) -> None:
    """A link tree misses modules added after the install: say how to refresh it."""
    installed = Path(__import__(package).__file__).parent
    source = PACKAGES[package]
    if installed.resolve() == source:
        return  # the source folder itself is on the path: nothing to go stale
    want = {p.relative_to(source) for p in source.rglob("*.py") if "__pycache__" not in p.parts}
    have = {p.relative_to(installed) for p in installed.rglob("*.py")}
    missing = sorted(map(str, want - have))
    assert not missing, f"not linked into {installed}: {missing}; run `make venv` to relink"
