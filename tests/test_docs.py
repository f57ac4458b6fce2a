"""The docs cover what the code holds: generated pages are current, every hook, weight location
and context member is documented, and every plugin on the recipes page is one the tests run."""

from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path

from scalarlens import Registry, WeightLocationType

from tests.examples.test_example_plugins import EXAMPLES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


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
    hooks = [
        name
        for name, obj in vars(hookspecs).items()
        if name.startswith("scalarlens_") and inspect.isfunction(obj)
    ]
    assert len(hooks) >= 4
    for name in hooks:
        assert f"## {name}\n" in page, f"hook {name} has no section in docs/plugins/hooks.md"
        section = page.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        assert f"def {name}(" in section, f"{name}: signature missing"
        assert "@hookimpl" in section, f"{name}: example missing"


def test_committed_generated_pages_are_current() -> None:
    stale, diffs = [], []
    for path, text in _gen().pages().items():
        committed = path.read_text() if path.exists() else ""
        if committed != text:
            name = str(path.relative_to(ROOT))
            stale.append(name)
            lines = difflib.unified_diff(
                committed.splitlines(), text.splitlines(), name, "generated", lineterm="", n=1
            )
            diffs.append("\n".join(list(lines)[:12]))
    assert not stale, (
        f"stale generated docs: {', '.join(stale)}. Run `.venv/bin/python docs/gen_pages.py` "
        "and commit the result\n" + "\n".join(diffs)
    )


def test_toolbox_page_lists_every_weight_location_and_context_member() -> None:
    page = (DOCS / "plugins" / "toolbox.md").read_text()
    for member in WeightLocationType:
        layout = " × ".join(d.value for d in member.shape)
        assert f"| `{member.name}` | `{member.value}` | {layout} |" in page, member
    for member in ("weight(", "dims", "objective", "final_norm(", "unembed(", "pass_type",
                   "config", "dst"):  # fmt: skip
        assert f"| `ctx.{member}" in page, f"DeriveContext.{member} is not on the toolbox page"
    for field in ("norm_eps", "norm_kind", "needs_objective=True", "allows_non_finite",
                  "KernelMutationWarning"):  # fmt: skip
        assert field in page


def _shown_files() -> list[str]:
    page = (DOCS / "plugins" / "recipes.md").read_text()
    return [
        key.removeprefix("file ") for key in _gen().region_keys(page) if key.startswith("file ")
    ]


def test_every_recipe_page_plugin_is_installed_and_run_by_the_tests() -> None:
    shown = _shown_files()
    plugins = {Path(path).parts[2] for path in shown if path.startswith("tests/example_plugins/")}
    assert len(plugins) == len(shown) // 2, "each plugin shows its pyproject.toml and plugin.py"
    on_disk = {p.name for p in (ROOT / "tests" / "example_plugins").iterdir() if p.is_dir()}
    assert plugins == on_disk == set(EXAMPLES), (
        "the recipes page, tests/example_plugins and EXAMPLES in "
        "tests/examples/test_example_plugins.py must list the same plugins"
    )
    for distribution in plugins:
        package = distribution.replace("-", "_")
        source = f"tests/example_plugins/{distribution}/{package}/plugin.py"
        assert source in shown and f"tests/example_plugins/{distribution}/pyproject.toml" in shown
        declared = re.findall(r'DerivedScalarType\(\s*"([a-z_.]+)"', (ROOT / source).read_text())
        assert tuple(declared) == EXAMPLES[distribution][1], f"{source} declares {declared}"


def test_docs_state_facts_instead_of_citing_the_reference() -> None:
    for page in DOCS.rglob("*.md"):
        text = page.read_text()
        for citation in ("shared/reference", "reference §", "reference identity"):
            assert citation not in text, f"{page.relative_to(ROOT)} cites {citation!r}"


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.rglob("*.md"):
        assert f" {page.relative_to(DOCS).as_posix()}\n" in nav, f"{page.name} is not in the nav"
