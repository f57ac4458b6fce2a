"""Generate the docs pages that must never drift from the code.

* ``catalogue.md`` — every DST the registry holds (name, shape, passes, whether its value needs
  a backward pass, providing plugin, description and the formula from its factory's docstring).
* ``cli.md`` — the ``--help`` of every ``scalarlens`` subcommand.

Run by ``make docs`` before ``mkdocs build --strict``.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from scalarlens import DstConfig, Registry, ScalarLensError
from scalarlens.cli import build_parser

HERE = Path(__file__).resolve().parent


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
        "installed plugins provide. Shapes are per prompt and per layer (`tokens` = T, "
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


def cli_reference() -> str:
    parser = build_parser()
    parser.prog = "scalarlens"
    lines = ["# CLI reference", "", "Generated from the argument parser.", "", "```text",
             parser.format_help().rstrip(), "```", ""]
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():  # type: ignore[attr-defined]
        lines += [f"## `scalarlens {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


def main() -> None:
    reg = Registry()
    (HERE / "catalogue.md").write_text(catalogue(reg))
    (HERE / "cli.md").write_text(cli_reference())
    print(f"wrote catalogue.md ({len(reg.dsts())} DSTs) and cli.md", file=sys.stderr)


if __name__ == "__main__":
    main()
