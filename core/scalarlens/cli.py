"""The ``scalarlens`` command line.

Every failure exits non-zero with one clear line; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ._registry import Registry
from .exceptions import DstConflictError, ScalarLensError


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row).rstrip() for row in rows]
    return "\n".join(lines)


def _dst_records(reg: Registry) -> list[dict[str, Any]]:
    records = []
    for dst in reg.dsts():
        try:
            provider: str = reg.provider(dst.name).name
        except DstConflictError:
            provider = "CONFLICT"
        records.append(
            {
                "name": dst.name,
                "shape": [d.value for d in dst.shape],
                "node_type": dst.node_type.value,
                "location": None if dst.location is None else dst.location.name.lower(),
                "pass_types": sorted(p.value for p in dst.pass_types),
                "has_no_layers": dst.has_no_layers,
                "plugin": provider,
                "description": dst.description,
            }
        )
    return records


def cmd_dsts(args: argparse.Namespace, reg: Registry) -> int:
    records = _dst_records(reg)
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    rows = [
        [
            r["name"],
            "×".join(r["shape"]),
            r["node_type"],
            ",".join(r["pass_types"]),
            r["plugin"],
            r["description"],
        ]
        for r in records
    ]
    print(_table(["DST", "shape", "node type", "passes", "plugin", "description"], rows))
    print(f"\n{len(records)} DSTs. Details: scalarlens dsts --json")
    return 0


def cmd_plugins(args: argparse.Namespace, reg: Registry) -> int:
    infos = reg.plugins()
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return 0
    rows = [
        [i.name, i.distribution or "-", i.version or "-", i.status, str(len(i.dsts)), i.error or ""]
        for i in infos
    ]
    print(_table(["plugin", "distribution", "version", "status", "DSTs", "error"], rows))
    failed = [i for i in infos if i.status == "failed"]
    if failed:
        print(f"\n{len(failed)} plugin(s) failed to load; their DSTs are unavailable.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalarlens",
        description="Derived scalars from transformer activations, through plugins.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dsts", help="list every registered derived scalar type")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_dsts)
    p = sub.add_parser("plugins", help="list plugins, their versions, DSTs and load errors")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None, registry: Registry | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if registry is None:
        from ._registry import registry as default_registry

        registry = default_registry
    try:
        result: int = args.func(args, registry)
        return result
    except ScalarLensError as exc:
        if args.debug:
            raise
        print(f"scalarlens: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
