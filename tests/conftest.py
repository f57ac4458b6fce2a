"""Shared fixtures: throwaway installed plugin distributions and synthetic raw stores."""

from __future__ import annotations

import itertools
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

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
