"""The ``scalarlens`` command line.

Every failure exits non-zero with one clear line; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ._bundled import BUNDLED_MODELS, bundled_vocab
from ._cli_sweep import add_sweep_commands
from ._inputs import (
    Job,
    check_top_k,
    coerce_token,
    located,
    parse_token_ids,
    read_prompts_file,
)
from ._registry import Registry
from ._report import format_table
from .exceptions import ConfigError, DstConflictError, ModelInputError, ScalarLensError

if TYPE_CHECKING:  # torch-importing modules load lazily so `scalarlens dsts` starts fast
    from ._config import DstConfig
    from ._model import ModelAdapter
    from ._prepare import Preparation
    from ._store import DerivedScalarStore


DEMO_FIGURE = "scalarlens-demo.png"


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


SLOW_PLUGIN_SECONDS = 0.2
"""A plugin taking longer than this to import is named under ``scalarlens plugins``."""


def _load_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f}"


def cmd_plugins(args: argparse.Namespace, reg: Registry) -> int:
    if args.check:
        return _check_plugins(args, reg)
    infos = reg.plugins()
    slow = [i for i in infos if (i.load_seconds or 0.0) > SLOW_PLUGIN_SECONDS]
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return 0
    rows = [
        [
            i.name,
            i.distribution or "-",
            i.version or "-",
            i.status,
            str(len(i.dsts)),
            _load_ms(i.load_seconds),
            i.error or "",
        ]
        for i in infos
    ]
    headers = ["plugin", "distribution", "version", "status", "DSTs", "load ms", "error"]
    print(format_table(headers, rows))
    failed = [i for i in infos if i.status == "failed"]
    if failed:
        print(f"\n{len(failed)} plugin(s) failed to load; their DSTs are unavailable.")
    for info in slow:
        print(f"slow to load: {info.name} ({_load_ms(info.load_seconds)} ms)")
    return 0


def _check_plugins(args: argparse.Namespace, reg: Registry) -> int:
    """``plugins --check``: every problem, grouped by plugin; exit 1 if there is any."""
    problems = reg.check()
    n_plugins = len(reg.plugins())
    if args.json:
        records = [
            {"plugin": p.plugin, "subject": p.subject, "message": p.message} for p in problems
        ]
        print(json.dumps({"plugins": n_plugins, "ok": not problems, "problems": records}, indent=2))
        return 1 if problems else 0
    if not problems:
        print(f"all {n_plugins} plugins OK")
        return 0
    by_plugin: dict[str, list[str]] = {}
    for problem in problems:
        by_plugin.setdefault(problem.plugin, []).append(f"  {problem.subject}: {problem.message}")
    for plugin, lines in by_plugin.items():
        print(f"{plugin}:")
        print("\n".join(lines))
    print(f"\n{len(problems)} problem(s) in {len(by_plugin)} plugin(s)")
    return 1


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


class _RunBars:
    """``derive(progress=)`` as progress bars (rows, rows/s, ETA), one per engine run, for
    activation patching's thousands of patched copies; only on a terminal, so logs and pipes
    stay clean."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}  # what -> _progress.Progress (imported on first use)

    def __call__(self, what: str, done: int, total: int) -> None:
        from ._progress import Progress

        if not sys.stderr.isatty() or not total:
            return
        if done == 0:
            self.bars[what] = Progress(total, unit="rows", rate_unit="rows/s", label=what)
            return
        bar = self.bars[what]
        bar.advance(done - bar.done)
        if done == total:
            bar.close()


def _jobs(args: argparse.Namespace) -> list[Job]:
    """Every prompt to derive, each knowing where it came from (flag, or file and line)."""
    target, distractor = coerce_token(args.target), coerce_token(args.distractor)
    if args.prompt is not None:
        return [Job(args.prompt, "--prompt", target, distractor, args.baseline)]
    if args.tokens is not None:
        return [Job(parse_token_ids(args.tokens), "--tokens", target, distractor, args.baseline)]
    return read_prompts_file(args.prompts_file, target, distractor, args.baseline)


def _json_arg(text: str | None, flag: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelInputError(f"{flag} must be JSON, e.g. '{{\"sae\": {{...}}}}': {exc}") from None


_CONFIG_FLAGS = {
    "DstConfig.layer_indices": "--layers",
    "DstConfig.direction": "--direction",
    "DstConfig.options": "--options",
    "DstConfig.steps": "--steps",
    "DstConfig.patch_group": "--patch-group",
    "DstConfig.patch_positions": "--patch-positions",
    "DstConfig.batch_rows": "--batch-rows",
}


def _derive_config(args: argparse.Namespace) -> DstConfig:
    """``DstConfig`` from the flags; its errors name the flag as well as the field."""
    from ._config import DstConfig

    try:
        return DstConfig(
            layer_indices=args.layers,
            derive_gradients=args.derive_gradients,
            detach_final_ln_scale=args.detach_ln_f,
            memory=args.memory,
            direction=_json_arg(args.direction, "--direction"),
            options=_json_arg(args.options, "--options"),
            steps=args.steps,
            patch_group=args.patch_group,
            patch_positions=args.patch_positions,
            batch_rows=args.batch_rows,
        )
    except ScalarLensError as exc:
        flags = [flag for field, flag in _CONFIG_FLAGS.items() if str(exc).startswith(field)]
        raise (located(exc, flags[0]) if flags else exc) from None


def _check_outputs(args: argparse.Namespace) -> None:
    """Output paths and the plot format are checked before the model is even loaded."""
    from ._output_files import check_output_path

    if args.out:
        check_output_path(args.out, "--out")
    if args.plot:
        from ._report import plot_format

        check_output_path(args.plot, "--plot")
        plot_format(args.plot, "--plot")


def _require_objective(prepared: Preparation, jobs: Sequence[Job]) -> None:
    needing = prepared.needs_objective
    lacking = [job for job in jobs if job.target is None or job.distractor is None]
    if not needing or not lacking:
        return
    where = f"{lacking[0].where} has no target/distractor; " if len(jobs) > 1 else ""
    raise ModelInputError(
        f"{where}{', '.join(needing)} need(s) an objective, so give the logit difference to "
        "explain: e.g. scalarlens derive --prompt 'the cat sat on the mat the cat sat on "
        f"the' --dst {needing[0]} --target mat --distractor cat"
    )


def _check_baselines(prepared: Preparation, jobs: Sequence[Job]) -> None:
    """A baseline for every prompt exactly when a requested DST compares two prompts."""
    from ._prepare import check_baseline_use

    for job in jobs:
        try:
            check_baseline_use(prepared, job.baseline is not None)
        except ScalarLensError as exc:
            raise located(exc, job.where) if len(jobs) > 1 else exc from None


def _check_jobs(model: ModelAdapter, jobs: Sequence[Job]) -> None:
    """Tokenize every prompt, baseline and target before deriving any, errors naming the line."""
    from ._prepare import check_aligned, prepare_objective, prepare_tokens

    for job in jobs:
        try:
            (tokens,) = prepare_tokens(model, job.prompt)
            if job.baseline is not None:
                (baseline,) = prepare_tokens(model, job.baseline)
                check_aligned(model, tokens, baseline)
            prepare_objective(model, job.target, job.distractor)
        except ScalarLensError as exc:
            raise located(exc, job.where) from None


def _derive_jobs(
    model: ModelAdapter,
    jobs: Sequence[Job],
    args: argparse.Namespace,
    config: DstConfig,
    reg: Registry,
) -> DerivedScalarStore:
    from ._derive import derive
    from ._store import DerivedScalarStore

    stores, bars = [], _RunBars()
    for done, job in enumerate(jobs, 1):
        try:
            stores.append(
                derive(
                    model,
                    job.prompt,
                    args.dst,
                    target=job.target,
                    distractor=job.distractor,
                    baseline=job.baseline,
                    config=config,
                    registry=reg,
                    progress=bars,
                )
            )
        except ScalarLensError as exc:
            raise located(exc, job.where) from None
        _progress(done, len(jobs))
    return DerivedScalarStore.concat(stores)


def _write_outputs(
    args: argparse.Namespace, store: DerivedScalarStore, words: Sequence[str] | None
) -> None:
    """``--out`` and ``--plot`` as one set: both written, or neither (the error says which)."""
    from ._output_files import Writer, write_all

    outputs: list[tuple[str, Path, Writer]] = []
    if args.out:
        outputs.append(("--out", Path(args.out), store._write))
    if args.plot and args.compare:
        from ._compare import compare, comparison_plot_writer

        found = [compare(store, name) for name in _estimates(args, store)]
        outputs.append(("--plot", Path(args.plot), comparison_plot_writer(found, args.plot)))
    elif args.plot:
        from ._report import plot_writer

        outputs.append(
            ("--plot", Path(args.plot), plot_writer(store, args.dst[0], args.plot, words=words))
        )
    write_all(outputs)


def _estimates(args: argparse.Namespace, store: DerivedScalarStore) -> list[str]:
    """The requested DSTs that estimate another (``--compare`` compares each with it)."""
    return [d.name for d in store.dsts if d.name in args.dst and d.estimate_of is not None]


def _with_exact_dsts(args: argparse.Namespace, reg: Registry) -> None:
    """``--compare``: add the exact DST of every requested estimate, refuse if there is none."""
    exact = [reg.dst(name).estimate_of for name in args.dst]
    wanted = [name for name in exact if name is not None]
    if not wanted:
        raise ConfigError(
            f"--compare compares an estimate with the exact effect, but none of {args.dst} is "
            "an estimate; add e.g. --dst attn.attribution_patching (or "
            "attn.integrated_gradients) with --baseline"
        )
    args.dst = list(dict.fromkeys([*args.dst, *wanted]))


def cmd_derive(args: argparse.Namespace, reg: Registry) -> int:
    config = _derive_config(args)  # the checks up to the model load need no torch: fast
    check_top_k(args.top, "--top")
    _check_outputs(args)
    jobs = _jobs(args)
    from ._prepare import prepare

    if args.compare:
        _with_exact_dsts(args, reg)
    prepared = prepare(args.dst, config, reg)  # unknown DSTs fail here
    _require_objective(prepared, jobs)
    _check_baselines(prepared, jobs)
    from .models._loading import load_model

    model = load_model(args.model, reg)
    _check_jobs(model, jobs)
    store = _derive_jobs(model, jobs, args, config, reg)
    tokenizer = getattr(model, "tokenizer", None)

    def decode(ids: Sequence[int]) -> list[str] | None:
        return tokenizer.decode_tokens(list(ids)) if tokenizer else None

    _write_outputs(args, store, decode(store.tokens[0]))
    _print_results(args, model, store, decode)
    return 0


def _print_results(
    args: argparse.Namespace,
    model: ModelAdapter,
    store: DerivedScalarStore,
    decode: Callable[[Sequence[int]], list[str] | None],
) -> None:
    def words(p: int) -> list[str] | None:
        return decode(store.tokens[p])

    # Ranked per DST: values of different DSTs are in different units, one ranking would
    # let the largest-scale DST crowd out the rest.
    dsts = list(dict.fromkeys(args.dst))
    results = [
        {
            "prompt": p,
            "tokens": list(store.tokens[p]),
            "words": words(p),
            "objective_value": store.metadata["objective_values"][p],
            "top": {dst: store.topk(args.top, [dst], prompt=p, absolute=True) for dst in dsts},
        }
        for p in range(store.n_prompts)
    ]
    if args.json:
        for r in results:
            r["top"] = [
                {**record.to_dict(), "rank": rank}
                for ranking in r["top"].values()
                for rank, record in enumerate(ranking, 1)
            ]
            if args.compare:
                r["comparisons"] = _comparisons_json(args, store, r["prompt"])
        payload = {"model": model.name, "dsts": dsts, "top_per_dst": args.top, "results": results}
        print(json.dumps(payload, indent=2))
        return
    from ._report import records_table

    for r in results:
        shown = " ".join(r["words"]) if r["words"] else " ".join(map(str, r["tokens"]))
        print(f"prompt {r['prompt']}: {shown}")
        _print_objective(store, r["prompt"], decode)
        for dst, ranking in r["top"].items():
            print(f"\n{dst}: top {len(ranking)} by |value|")
            print(records_table(ranking, r["words"], show_dst=False))
        if args.compare:
            from ._compare import compare, format_comparison

            for name in _estimates(args, store):
                found = compare(store, name, prompt=r["prompt"], top=args.top)
                print("\n" + format_comparison(found, r["words"]))
        print()
    if args.out:
        print(f"store written to {args.out}")
    if args.plot:
        print(f"plot written to {args.plot}")


def _comparisons_json(
    args: argparse.Namespace, store: DerivedScalarStore, prompt: int
) -> list[dict[str, Any]]:
    """``--compare --json``: each estimate against its exact DST, as plain data."""
    from ._compare import compare

    out = []
    for name in _estimates(args, store):
        c = compare(store, name, prompt=prompt, top=args.top)
        out.append(
            {
                "estimate": c.estimate,
                "exact": c.exact,
                "n": c.n,
                "pearson": c.pearson,
                "spearman": c.spearman,
                "disagreements": [
                    {**record.to_dict(), "estimate": estimate}
                    for record, estimate in c.disagreements
                ],
            }
        )
    return out


def _print_objective(
    store: DerivedScalarStore, p: int, decode: Callable[[Sequence[int]], list[str] | None]
) -> None:
    main = store.metadata["objective_values"][p]
    base = store.metadata.get("baseline_objective_values")
    if base is not None:
        tokens = store.metadata["baseline_tokens"][p]
        print(f"baseline: {' '.join(decode(tokens) or map(str, tokens))}")
        print(f"objective: {main:+.4f} (baseline {base[p]:+.4f}, difference {main - base[p]:+.4f})")
    elif main is not None:
        print(f"objective: {main:+.4f}")


def cmd_demo(args: argparse.Namespace, reg: Registry) -> int:
    """The tables need no plotting library: without matplotlib they print, plus a hint.

    Only an explicit ``--plot`` makes a missing matplotlib an error (checked before any work).
    """
    from ._demo import format_demo, run_demo
    from ._output_files import check_output_path
    from ._report import PLOT_HINT, plot_format, plotting_available
    from .models._loading import load_model

    check_top_k(args.top, "--top")
    figure, hint = args.plot, None
    if figure is None and not args.no_plot:
        figure, hint = (DEMO_FIGURE, None) if plotting_available() else (None, PLOT_HINT)
    if figure is not None:
        check_output_path(figure, "--plot")
        plot_format(figure, "--plot")

    result = run_demo(load_model(args.model, reg), top=args.top, figure=figure)
    print(format_demo(result, args.top))
    if hint:
        print(f"\n{hint}")
    return 0


def _vocab_words(spec: str, reg: Registry) -> Sequence[str]:
    """A bundled model's words come from its vocab.json alone: no model, no torch."""
    if spec in BUNDLED_MODELS and reg.model_loader(spec) is None:
        return bundled_vocab(spec)
    from .models._loading import load_model

    tokenizer = getattr(load_model(spec, reg), "tokenizer", None)
    if tokenizer is None:
        raise ModelInputError(f"model {spec!r} has no word tokenizer; pass token ids")
    words: Sequence[str] = tokenizer.vocab
    return words


def cmd_vocab(args: argparse.Namespace, reg: Registry) -> int:
    from ._report import format_columns

    words = _vocab_words(args.model, reg)
    if args.json:
        records = (json.dumps({"id": i, "word": w}) for i, w in enumerate(words))
        print("[\n  " + ",\n  ".join(records) + "\n]")  # one record a line: greppable
        return 0
    width = shutil.get_terminal_size((100, 24)).columns
    id_width = len(str(len(words) - 1))
    cells = [f"{i:>{id_width}} {word}" for i, word in enumerate(words)]
    print(format_columns(cells, width))
    print(f"\n{len(words)} words (id word); ids work wherever a word does, e.g. --target 12")
    return 0


def cmd_new_plugin(args: argparse.Namespace, reg: Registry) -> int:
    from ._scaffold import write_plugin

    root = write_plugin(args.name, args.dir)
    print(f"wrote {root}")
    print(f"next: pip install -e '{root}[test]' && pytest {root}/tests")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error (still exit code 2).

    argparse prints the whole usage block first; for ``derive`` that is a dozen lines in which
    the actual complaint is easy to miss.  ``--help`` still shows the usage.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"scalarlens: error: {message} (see: {self.prog} --help)\n")


def _add_derive(sub: Any) -> None:
    """The ``derive`` subcommand: the one with most flags."""
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
        help="one prompt per line, or JSONL records with prompt/tokens and optional "
        "target/distractor and baseline/baseline_tokens",
    )
    p.add_argument("--target", help="token whose logit difference to explain (word or id)")
    p.add_argument("--distractor", help="the competing token (word or id)")
    p.add_argument("--dst", action="append", required=True, help="DST name (repeatable)")
    p.add_argument("--layers", type=int, nargs="+", help="layers to derive (default: all)")
    p.add_argument(
        "--top",
        type=int,
        default=10,
        help="records per DST and prompt, ranked by |value| (--json: one flat list per prompt, "
        "each record with its dst and its rank within that DST)",
    )
    p.add_argument("--out", help="write the store to this .safetensors file")
    p.add_argument(
        "--plot",
        help="write a figure of the first DST (with --compare: estimate-vs-exact scatter plots)",
    )
    p.add_argument("--json", action="store_true", help="print records as JSON")
    _add_engine_flags(p)
    _add_contrast_flags(p)
    p.set_defaults(func=cmd_derive)


def _add_engine_flags(p: Any) -> None:
    """How the DSTs are derived: gradients, the LayerNorm detach, memory, options, direction."""
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
        "--memory",
        choices=("default", "low"),
        default="default",
        help="low: recompute each layer in the backward pass instead of keeping its "
        "intermediates (same results, less memory, about one more forward of time)",
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


def _add_contrast_flags(p: Any) -> None:
    """Flags of the DSTs that compare the prompt with a baseline (corrupted) prompt."""
    g = p.add_argument_group("comparing two prompts (attribution / activation patching, IG)")
    g.add_argument(
        "--baseline",
        help="the corrupted prompt (same token count as the prompt; in --prompts-file a "
        'record\'s own "baseline" or "baseline_tokens" field overrides it)',
    )
    g.add_argument(
        "--compare",
        action="store_true",
        help="for each estimate DST (attribution patching, IG) also derive the exact "
        "activation patching and print their correlation and worst disagreements; --plot "
        "then draws estimate-vs-exact scatter plots",
    )
    g.add_argument(
        "--steps", type=int, default=8, help="integrated-gradients quadrature points (default 8)"
    )
    g.add_argument(
        "--patch-positions",
        type=int,
        nargs="+",
        help="activation patching at these token positions only (default: all)",
    )
    g.add_argument(
        "--patch-group",
        type=int,
        default=1,
        help="patch this many consecutive heads/neurons/positions together (default 1)",
    )
    g.add_argument(
        "--batch-rows",
        type=int,
        default=32,
        help="patched or interpolated copies per forward pass (default 32)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="scalarlens",
        description="Derived scalars from transformer activations, through plugins.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dsts", help="list every registered derived scalar type")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_dsts)
    p = sub.add_parser(
        "plugins", help="list plugins, their versions, DSTs, load times and load errors"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--check",
        action="store_true",
        help="resolve every plugin's DSTs and references without running a model; "
        "exit 1 on any problem",
    )
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("demo", help="explain the bundled model's prediction on a repeated sequence")
    p.add_argument("--model", default="tiny-induction", help="model spec (default: bundled)")
    p.add_argument("--top", type=int, default=8, help="rows per table")
    plot = p.add_mutually_exclusive_group()
    plot.add_argument(
        "--plot",
        help=f"image to write (default: {DEMO_FIGURE} when matplotlib is installed)",
    )
    plot.add_argument("--no-plot", action="store_true", help="print the tables only")
    p.set_defaults(func=cmd_demo)

    _add_derive(sub)
    add_sweep_commands(sub)

    p = sub.add_parser("new-plugin", help="write a new plugin distribution (scalarlens-NAME)")
    p.add_argument("name", help="plugin name: a lowercase identifier, e.g. 'probe'")
    p.add_argument("--dir", default=".", help="parent directory (default: current)")
    p.set_defaults(func=cmd_new_plugin)

    p = sub.add_parser("vocab", help="print the model's word vocabulary with token ids")
    p.add_argument("--model", default="tiny-induction")
    p.add_argument("--json", action="store_true", help='[{"id": 0, "word": ...}, ...]')
    p.set_defaults(func=cmd_vocab)
    return parser


def _command_word(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _subcommands(parser: argparse.ArgumentParser) -> Any:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def add_plugin_commands(parser: argparse.ArgumentParser, registry: Registry) -> None:
    """Add the subcommands plugins offer (hook ``scalarlens_cli_commands``).

    Built-in names win; a plugin whose ``configure`` raises is reported on stderr, naming it,
    and its command is left out — the other commands keep working.
    """
    sub = _subcommands(parser)
    for name, (plugin, configure) in sorted(registry.cli_commands().items()):
        if name in sub.choices:
            continue
        help_text = (configure.__doc__ or "").strip().splitlines()[:1]
        p = sub.add_parser(name, help=(help_text[0] if help_text else f"(from plugin {plugin})"))
        try:
            run = configure(p)
        except Exception as exc:  # a broken plugin must not take the CLI down
            print(
                f"scalarlens: warning: plugin {plugin!r} failed to set up its command {name!r}: "
                f"{type(exc).__name__}: {exc}",
                file=sys.stderr,
            )
            sub.choices.pop(name, None)
            continue
        p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None, registry: Registry | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if registry is None:
        from ._registry import registry as default_registry

        registry = default_registry
    parser = build_parser()
    word = _command_word(argv)
    if (
        word is None or word not in _subcommands(parser).choices
    ):  # a plugin's command, or --help listing them
        add_plugin_commands(parser, registry)
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args, registry)
        return result
    except ScalarLensError as exc:
        if args.debug:
            raise
        print(f"scalarlens: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `scalarlens vocab | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
