"""Shared fixtures: throwaway installed plugin distributions and synthetic raw stores."""

from __future__ import annotations

import itertools
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_counter = itertools.count()


@pytest.fixture
def make_plugin_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Install a real (throwaway) distribution: a module plus a ``*.dist-info`` on ``sys.path``.

    Returns the module name.  Nothing about ``importlib.metadata`` is mocked: discovery reads the
    ``entry_points.txt`` we write, exactly as it would for a pip-installed plugin.
    """
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    monkeypatch.syspath_prepend(str(site))
    created: list[str] = []

    def make(
        source: str,
        *,
        dist: str = "scalarlens-example",
        version: str = "1.2.3",
        entry_name: str | None = None,
    ) -> str:
        module = f"sl_test_plugin_{next(_counter)}"
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        entry = entry_name or dist.removeprefix("scalarlens-")
        with (info / "entry_points.txt").open("a") as fh:
            fh.write(f"[scalarlens]\n{entry} = {module}\n")
        created.append(module)
        return module

    yield make
    for module in created:
        sys.modules.pop(module, None)


EXAMPLE_PLUGINS = Path(__file__).resolve().parent / "example_plugins"


def _pyproject(root: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with (root / "pyproject.toml").open("rb") as fh:
        data: dict[str, Any] = tomllib.load(fh)
    return data


@pytest.fixture
def install_example_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], list[str]]]:
    """Install a package from ``tests/example_plugins`` the way pip's editable install does.

    ``install("scalarlens-lens")`` writes a ``*.dist-info`` (METADATA, and ``entry_points.txt``
    with every entry point the package's own ``pyproject.toml`` declares) on a temporary
    ``sys.path`` entry and puts the package's directory on ``sys.path``; it returns both paths,
    for a subprocess's ``PYTHONPATH``.  Nothing about ``importlib.metadata`` is mocked.
    """
    site = tmp_path / "example-site"
    site.mkdir(exist_ok=True)
    packages: list[str] = []

    def install(distribution: str) -> list[str]:
        root = EXAMPLE_PLUGINS / distribution
        project = _pyproject(root)["project"]
        info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
        )
        groups = project.get("entry-points", {})
        (info / "entry_points.txt").write_text(
            "".join(
                f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items())
                for group, points in groups.items()
            )
        )
        monkeypatch.syspath_prepend(str(root))
        monkeypatch.syspath_prepend(str(site))
        packages.extend(p.name for p in root.iterdir() if (p / "__init__.py").is_file())
        return [str(site), str(root)]

    yield install
    for name in list(sys.modules):
        if name.split(".")[0] in packages:
            del sys.modules[name]
