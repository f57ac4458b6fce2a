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
from ._report import format_table
from .exceptions import DstConflictError, ModelInputError, ScalarLensError


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
    print(format_table(["DST", "shape", "node type", "passes", "plugin", "description"], rows))
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
    print(format_table(["plugin", "distribution", "version", "status", "DSTs", "error"], rows))
    failed = [i for i in infos if i.status == "failed"]
    if failed:
        print(f"\n{len(failed)} plugin(s) failed to load; their DSTs are unavailable.")
    return 0


def _progress(done: int, total: int) -> None:
    """A one-line progress bar on stderr (only for several prompts)."""
    if total < 2:
        return
    width = 30
    filled = width * done // total
    end = "\n" if done == total else ""
    print(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} prompts",
        end=end,
        file=sys.stderr,
        flush=True,
    )


def _read_prompts(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each job: {"prompt": str} or {"tokens": [...]}, optionally with target/distractor."""
    base = {"target": args.target, "distractor": args.distractor}
    if args.prompt is not None:
        return [{**base, "prompt": args.prompt}]
    if args.tokens is not None:
        return [{**base, "tokens": [int(t) for t in args.tokens.replace(",", " ").split()]}]
    jobs = []
    with open(args.prompts_file, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ModelInputError(
                        f"{args.prompts_file}:{number}: bad JSON: {exc}"
                    ) from None
                jobs.append({**base, **record})
            else:
                jobs.append({**base, "prompt": line})
    if not jobs:
        raise ModelInputError(f"{args.prompts_file} holds no prompts")
    return jobs


def _json_arg(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelInputError(f"{flag} must be JSON, e.g. '{{\"sae\": {{...}}}}': {exc}") from None


def _coerce(value: Any) -> Any:
    """Targets given on the command line as digits are token ids; anything else is a word."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


def cmd_derive(args: argparse.Namespace, reg: Registry) -> int:
    from ._config import DstConfig
    from ._derive import derive, load_model
    from ._store import DerivedScalarStore

    config = DstConfig(
        layer_indices=args.layers,
        derive_gradients=args.derive_gradients,
        detach_final_ln_scale=args.detach_ln_f,
        direction=_json_arg(args.direction, "--direction") if args.direction else None,
        options=_json_arg(args.options, "--options") if args.options else None,
    )
    jobs = _read_prompts(args)
    derivers = [reg.get(name, config) for name in args.dst]  # unknown names fail here, early
    from ._vocab import PassType

    needing = [
        d.dst.name
        for d in derivers
        if d.needs_backward()
        or (config.derive_gradients and PassType.BACKWARD in d.derivable_pass_types)
    ]
    if needing and any(job.get("target") is None for job in jobs):
        raise ModelInputError(
            f"{', '.join(needing)} need(s) a backward pass, so give the logit difference to "
            "explain: e.g. scalarlens derive --prompt 'the cat sat on the mat the cat sat on "
            f"the' --dst {needing[0]} --target mat --distractor cat"
        )
    model = load_model(args.model, reg)
    stores = []
    for done, job in enumerate(jobs, 1):
        stores.append(
            derive(
                model,
                job.get("tokens") or job["prompt"],
                args.dst,
                target=_coerce(job.get("target")),
                distractor=_coerce(job.get("distractor")),
                config=config,
                registry=reg,
            )
        )
        _progress(done, len(jobs))
    store = DerivedScalarStore.concat(stores)
    tokenizer = getattr(model, "tokenizer", None)

    def words(p: int) -> list[str] | None:
        return tokenizer.decode_tokens(store.tokens[p]) if tokenizer else None

    if args.out:
        store.save(args.out)
    if args.plot:
        from ._report import plot_dst

        plot_dst(store, args.dst[0], args.plot, words=words(0))
    results = [
        {
            "prompt": p,
            "tokens": list(store.tokens[p]),
            "words": words(p),
            "objective_value": store.metadata["objective_values"][p],
            "top": store.topk(args.top, prompt=p, absolute=True),
        }
        for p in range(store.n_prompts)
    ]
    if args.json:
        for r in results:
            r["top"] = [record.to_dict() for record in r["top"]]
        print(json.dumps({"model": model.name, "dsts": args.dst, "results": results}, indent=2))
        return 0
    from ._report import records_table

    for r in results:
        shown = " ".join(r["words"]) if r["words"] else " ".join(map(str, r["tokens"]))
        print(f"prompt {r['prompt']}: {shown}")
        if r["objective_value"] is not None:
            print(f"objective: {r['objective_value']:+.4f}")
        print(records_table(r["top"], r["words"]))
        print()
    if args.out:
        print(f"store written to {args.out}")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def cmd_demo(args: argparse.Namespace, reg: Registry) -> int:
    from ._demo import format_demo, run_demo
    from ._derive import load_model

    result = run_demo(load_model(args.model, reg), top=args.top, figure=args.plot)
    print(format_demo(result, args.top))
    return 0


def cmd_vocab(args: argparse.Namespace, reg: Registry) -> int:
    from ._derive import load_model

    tokenizer = getattr(load_model(args.model, reg), "tokenizer", None)
    if tokenizer is None:
        raise ModelInputError(f"model {args.model!r} has no word tokenizer; pass token ids")
    print(" ".join(tokenizer.vocab))
    return 0


def cmd_new_plugin(args: argparse.Namespace, reg: Registry) -> int:
    from ._scaffold import write_plugin

    root = write_plugin(args.name, args.dir)
    print(f"wrote {root}")
    print(f"next: pip install -e '{root}[test]' && pytest {root}/tests")
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

    p = sub.add_parser("demo", help="explain the bundled model's prediction on a repeated sequence")
    p.add_argument("--model", default="tiny-induction", help="model spec (default: bundled)")
    p.add_argument("--top", type=int, default=8, help="rows per table")
    p.add_argument("--plot", default="scalarlens-demo.png", help="PNG to write")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("derive", help="derive DSTs for prompts and rank components")
    p.add_argument(
        "--model",
        default="tiny-induction",
        help="bundled name, checkpoint directory or plugin spec",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text (tokenized with the model's tokenizer)")
    src.add_argument("--tokens", help="token ids, comma or space separated")
    src.add_argument(
        "--prompts-file",
        help="one prompt per line, or JSONL records with "
        "prompt/tokens and optional target/distractor",
    )
    p.add_argument("--target", help="token whose logit difference to explain (word or id)")
    p.add_argument("--distractor", help="the competing token (word or id)")
    p.add_argument("--dst", action="append", required=True, help="DST name (repeatable)")
    p.add_argument("--layers", type=int, nargs="+", help="layers to derive (default: all)")
    p.add_argument("--top", type=int, default=10, help="number of top records per prompt")
    p.add_argument("--out", help="write the store to this .safetensors file")
    p.add_argument("--plot", help="write a PNG of the first DST")
    p.add_argument("--json", action="store_true", help="print records as JSON")
    p.add_argument(
        "--derive-gradients",
        action="store_true",
        help="also derive the backward pass of DSTs that support it",
    )
    p.add_argument(
        "--detach-ln-f",
        action="store_true",
        help="treat the final LayerNorm scale as a constant in the backward pass",
    )
    p.add_argument(
        "--options",
        help='plugin options as JSON, e.g. \'{"sae": {"path": "...", "location": "mlp.post_act", '
        '"layer": 1}}\'',
    )
    p.add_argument(
        "--direction",
        help='where direct effects are measured, as JSON: \'{"location": "resid.post_attn", '
        '"layer": 1}\' (default: before the final LayerNorm)',
    )
    p.set_defaults(func=cmd_derive)

    p = sub.add_parser("new-plugin", help="write a new plugin distribution (scalarlens-NAME)")
    p.add_argument("name", help="plugin name: a lowercase identifier, e.g. 'probe'")
    p.add_argument("--dir", default=".", help="parent directory (default: current)")
    p.set_defaults(func=cmd_new_plugin)

    p = sub.add_parser("vocab", help="print the model's word vocabulary")
    p.add_argument("--model", default="tiny-induction")
    p.set_defaults(func=cmd_vocab)
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
