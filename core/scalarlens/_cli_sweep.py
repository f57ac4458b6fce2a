"""``scalarlens sweep``, ``scalarlens show`` and ``scalarlens export``: corpus sweeps from the
command line.  Registered by ``cli.build_parser``; imports nothing heavy until a command runs,
so ``scalarlens --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import TYPE_CHECKING, Any

from ._inputs import check_top_k

if TYPE_CHECKING:
    from ._registry import Registry


def cmd_sweep(args: argparse.Namespace, reg: Registry) -> int:
    from ._config import DstConfig
    from ._sweep import sweep, synthetic_corpus
    from .exceptions import ModelInputError

    check_top_k(args.top_k, "--top-k")
    if (args.corpus is None) == (args.synthetic is None):
        raise ModelInputError("give the corpus: --corpus FILE|DIR, or --synthetic N")
    corpus: Any = args.corpus if args.corpus is not None else synthetic_corpus(args.synthetic)
    objective = None if args.objective == "none" else "next_token"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _one_line_warning
        result = sweep(
            args.model,
            corpus,
            args.dst,
            out=args.out,
            top_k=args.top_k,
            context=args.context,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            engine=args.engine,
            objective=objective,
            config=DstConfig(
                derive_gradients=args.derive_gradients, options=_options(args.options)
            ),
            layers=args.layers,
            overwrite=args.overwrite,
            ray_address=args.ray_address,
            workers=args.workers,
            progress=not args.quiet,
            registry=reg,
        )
    run = result.run
    reused = run.shards_total - run.shards_run
    corpus_info = result.manifest["corpus"]
    print(
        f"swept {corpus_info['n_prompts']} prompts ({corpus_info['n_tokens']} tokens) into "
        f"{args.out}: {len(result.keys())} DST layers, {run.shards_total} shards"
        + (f" ({reused} reused from an earlier run)" if reused else "")
    )
    print(f"next: scalarlens show {args.out} --dst {args.dst[0]} --layer ... --index ...")
    return 0


def _options(text: str | None) -> Any:
    from .exceptions import ModelInputError

    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelInputError(
            f"--options must be JSON, e.g. '{{\"sae\": {{...}}}}': {exc}"
        ) from None


def _one_line_warning(message: Any, category: Any, *_: Any, **__: Any) -> None:
    print(f"scalarlens: warning: {message}", file=sys.stderr)


def cmd_show(args: argparse.Namespace, reg: Registry) -> int:
    from ._sweep._results import format_examples, load_sweep, vocab_words

    result = load_sweep(args.directory)
    layer = None if args.layer is None else args.layer
    index: Any = args.index[0] if len(args.index) == 1 else args.index
    pass_type = args.pass_type
    stats = result.stats(args.dst, layer, pass_type)
    flat = result._flat(result._prefix(args.dst, layer, pass_type), index)
    top = result.top(args.dst, layer, index, pass_type)[: args.top]
    if args.json:
        payload = {
            "dst": args.dst,
            "layer": layer,
            "index": flat,
            "stats": {
                name: value[flat].tolist() for name, value in stats.items() if name != "hist"
            },
            "top": [r.to_dict() for r in top],
            "samples": [r.to_dict() for r in result.samples(args.dst, layer, index, pass_type)],
        }
        print(json.dumps(payload, indent=2))
        return 0
    words = vocab_words(result, reg)
    s = {name: value[flat] for name, value in stats.items()}
    print(
        f"{args.dst} layer {layer} component {flat} ({pass_type}): n={int(s['count'])}  "
        f"mean {float(s['mean']):+.4g}  sd {float(s['variance']) ** 0.5:.4g}  "
        f"skew {float(s['skewness']):+.3g}  kurt {float(s['kurtosis']):+.3g}  "
        f"min {float(s['min']):+.4g}  max {float(s['max']):+.4g}  "
        f"non-zero {float(s['fraction_nonzero']):.3f}"
    )
    print(f"\ntop {len(top)} examples ([[token]]; << >> marks the attended token):")
    print("\n".join(format_examples(result, top, words)))
    if args.samples:
        boundaries = [f"{float(b):+.3g}" for b in s["quantile_boundaries"]]
        quantiles = result.meta["quantiles"]
        print(f"\nquantile boundaries {quantiles}: {boundaries}")
        for q, records in enumerate(result.quantile_samples(args.dst, layer, index, pass_type)):
            print(f"\nquantile bin {q}:")
            print("\n".join(format_examples(result, records, words)) or "  (none)")
    return 0


def cmd_export(args: argparse.Namespace, reg: Registry) -> int:
    from ._sweep import export_neuronpedia

    files = export_neuronpedia(args.directory, args.to, model_id=args.model_id)
    print(f"wrote {len(files)} files under {args.to} (Neuronpedia bulk layout)")
    return 0


def add_sweep_commands(sub: Any) -> None:
    """The three subcommands, added to ``scalarlens``'s subparsers."""
    p = sub.add_parser("sweep", help="top examples and statistics of every component over a corpus")
    p.add_argument("--model", default="tiny-induction", help="bundled name or checkpoint path")
    p.add_argument(
        "--corpus", help="text file (one prompt a line), .jsonl ({'text': ...}) or dataset dir"
    )
    p.add_argument("--synthetic", type=int, help="N synthetic repeated-word prompts instead")
    p.add_argument("--dst", action="append", required=True, help="DST name (repeatable)")
    p.add_argument("--layers", type=int, nargs="+", help="layers to sweep (default: all)")
    p.add_argument("--out", required=True, help="output directory (resumed if it holds this sweep)")
    p.add_argument("--top-k", type=int, default=20, help="top examples kept per component")
    p.add_argument("--context", type=int, help="max tokens per prompt (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    p.add_argument("--shard-size", type=int, default=1024, help="prompts per shard file")
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (one model each)")
    p.add_argument(
        "--objective",
        choices=("next-token", "none"),
        default="next-token",
        help="objective of gradient DSTs: each prompt's next-token log-likelihood",
    )
    p.add_argument("--derive-gradients", action="store_true", help="also sweep backward passes")
    p.add_argument("--options", help='plugin options as JSON, e.g. \'{"sae": {"path": "..."}}\'')
    p.add_argument("--overwrite", action="store_true", help="replace another sweep in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("show", help="a swept component's statistics and top examples")
    p.add_argument("directory", help="a sweep output directory")
    p.add_argument("--dst", required=True)
    p.add_argument("--layer", type=int, help="layer (omit for layer-less DSTs)")
    p.add_argument(
        "--index", type=int, nargs="+", required=True, help="component: flat or one per axis"
    )
    p.add_argument("--pass", dest="pass_type", default="forward", choices=("forward", "backward"))
    p.add_argument("--top", type=int, default=10, help="examples to print")
    p.add_argument("--samples", action="store_true", help="also print the per-quantile samples")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("export", help="write a sweep in Neuronpedia's bulk layout")
    p.add_argument("directory", help="a sweep output directory")
    p.add_argument("--to", required=True, help="output directory (features/, activations/)")
    p.add_argument("--model-id", help="Neuronpedia modelId (default: the model's name)")
    p.set_defaults(func=cmd_export)
