"""The generated docs pages cover what the registry and CLI actually hold."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from scalarlens import Registry

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _gen():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_pages", DOCS / "gen_pages.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_catalogue_page_lists_every_dst_with_provider_and_formula() -> None:
    reg = Registry()
    page = _gen().catalogue(reg)
    for dst in reg.dsts():
        row = next(line for line in page.splitlines() if line.startswith(f"| `{dst.name}` |"))
        assert reg.provider(dst.name).name in row
        assert dst.description in row
        assert f"**`{dst.name}`**" in page
    assert "| `mlp.act_times_grad` |" in page and "| yes |" in page  # needs-backward column


def test_cli_page_documents_every_subcommand() -> None:
    page = _gen().cli_reference()
    for command in ("dsts", "plugins", "demo", "derive", "vocab"):
        assert f"## `scalarlens {command}`" in page
    assert "--prompts-file" in page


def test_every_hook_is_documented_with_its_signature() -> None:
    import inspect

    from scalarlens import hookspecs

    page = (DOCS / "plugins" / "hooks.md").read_text()
    hooks = [name for name, obj in vars(hookspecs).items()
             if name.startswith("scalarlens_") and inspect.isfunction(obj)]
    assert len(hooks) >= 4
    for name in hooks:
        assert f"## {name}\n" in page, f"hook {name} has no section in docs/plugins/hooks.md"
        section = page.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        assert f"def {name}(" in section, f"{name}: signature missing"
        assert "@hookimpl" in section, f"{name}: example missing"
