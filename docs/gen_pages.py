"""Generate the docs that must never drift from the code; the output is committed.

* ``catalogue.md`` — every DST of the plugins in this repository (name, shape, passes, whether
  its value needs a backward pass, providing plugin, description and the formula from its
  factory's docstring).
* ``cli.md`` — the ``--help`` of every ``scalarlens`` subcommand.
* Regions of hand-written pages between ``<!-- generated: KEY -->`` and ``<!-- /generated -->``:
  ``weight-locations`` (the ``WeightLocationType`` table) and ``file PATH`` (a repository file,
  verbatim, as a code block — how the recipes page shows the example plugins).

Run ``.venv/bin/python docs/gen_pages.py`` after changing a DST, a CLI flag, a weight location
or an example plugin; ``tests/test_docs.py`` fails while a committed page is stale.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scalarlens import DstConfig, Registry, ScalarLensError, WeightLocationType
from scalarlens.cli import add_plugin_commands, build_parser

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROJECT_PLUGINS = ("builtins", "sae", "circuits")
"""The catalogue documents this repository's plugins only, whatever else is installed."""
REGION_PAGES = ("plugins/toolbox.md", "plugins/recipes.md")
HELP_WIDTH = "100"
"""argparse wraps help to the terminal width; fixed here so the page does not depend on it."""

_REGION = re.compile(
    r"(?P<open><!-- generated: (?P<key>[^>]+?) -->\n)(?P<body>.*?)(?P<close><!-- /generated -->)",
    re.S,
)
_LANGUAGES = {".py": "python", ".toml": "toml", ".md": "markdown"}


def project_registry() -> Registry:
    """A fresh registry holding only the plugins this repository ships."""
    reg = Registry()
    for info in reg.plugins():
        if info.name not in PROJECT_PLUGINS:
            reg.unregister(info.name)
    return reg


def _needs_backward(reg: Registry, name: str) -> str:
    try:
        return "yes" if reg.get(name, DstConfig()).needs_backward() else "no"
    except ScalarLensError:
        return "depends on options"


def _formula(reg: Registry, name: str) -> str:
    factory = reg._provision(name).factory
    doc = inspect.getdoc(factory) or ""
    first = doc.split("\n\n")[0]
    return " ".join(first.split()).replace("`", "'")


def catalogue(reg: Registry) -> str:
    lines = [
        "# DST catalogue",
        "",
        "Generated from the registry by `docs/gen_pages.py`: every derived scalar type the "
        "plugins in this repository provide (`builtins` and `sae`; run `scalarlens dsts` for "
        "what your installation holds). Shapes are per prompt and per layer (`tokens` = T, "
        "`token_pairs` = T(T+1)/2). *Backward* says whether the value itself needs a backward "
        "pass (pass `target`/`distractor` or an objective).",
        "",
        "| DST | shape | passes | backward | plugin | description |",
        "|---|---|---|---|---|---|",
    ]
    for dst in reg.dsts():
        shape = " × ".join(d.value for d in dst.shape)
        passes = ", ".join(sorted(p.value for p in dst.pass_types))
        lines.append(
            f"| `{dst.name}` | {shape} | {passes} | {_needs_backward(reg, dst.name)} | "
            f"{reg.provider(dst.name).name} | {dst.description} |"
        )
    lines += ["", "## Formulas", ""]
    for dst in reg.dsts():
        formula = _formula(reg, dst.name)
        shown = f"`{formula}`" if formula else dst.description
        lines.append(f"- **`{dst.name}`** — {shown}")
    return "\n".join(lines) + "\n"


@contextmanager
def _help_width() -> Iterator[None]:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def cli_reference() -> str:
    with _help_width():
        parser = build_parser()
        add_plugin_commands(parser, project_registry())  # e.g. `scalarlens graph`
        parser.prog = "scalarlens"
        lines = [
            "# CLI reference",
            "",
            "Generated from the argument parser by `docs/gen_pages.py`.",
            "",
            "```text",
            parser.format_help().rstrip(),
            "```",
            "",
        ]
        subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        for name, sub in subparsers.choices.items():  # type: ignore[attr-defined]
            lines += [
                f"## `scalarlens {name}`",
                "",
                "```text",
                sub.format_help().rstrip(),
                "```",
                "",
            ]
    return "\n".join(lines)


def weight_table() -> str:
    """Every ``WeightLocationType`` member with its canonical layout."""
    lines = [
        "| member | value | layout | per layer |",
        "|---|---|---|---|",
    ]
    for member in WeightLocationType:
        layout = " × ".join(d.value for d in member.shape)
        per_layer = "no (pass `layer=None`)" if member.has_no_layers else "yes"
        lines.append(f"| `{member.name}` | `{member.value}` | {layout} | {per_layer} |")
    return "\n".join(lines) + "\n"


def _file_block(path: str) -> str:
    text = (ROOT / path).read_text()
    fence = "````" if "```" in text else "```"
    return f"{fence}{_LANGUAGES.get(Path(path).suffix, 'text')}\n{text}{fence}\n"


def _region(key: str) -> str:
    kind, _, argument = key.partition(" ")
    if kind == "weight-locations":
        return weight_table()
    if kind == "file":
        return _file_block(argument)
    raise ValueError(f"unknown generated region {key!r}: use 'weight-locations' or 'file PATH'")


def fill_regions(page: str) -> str:
    """``page`` with every generated region's body regenerated."""
    return _REGION.sub(lambda m: m["open"] + _region(m["key"]) + m["close"], page)


def region_keys(page: str) -> list[str]:
    return [m["key"] for m in _REGION.finditer(page)]


def pages() -> dict[Path, str]:
    """Every generated page's path and its content as the code says it should be now."""
    out = {
        HERE / "catalogue.md": catalogue(project_registry()),
        HERE / "cli.md": cli_reference(),
    }
    for page in REGION_PAGES:
        out[HERE / page] = fill_regions((HERE / page).read_text())
    return out


def main() -> None:
    for path, text in pages().items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
