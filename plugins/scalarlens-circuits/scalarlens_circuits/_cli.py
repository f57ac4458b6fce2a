"""``scalarlens graph``: build, prune and save an attribution graph from the command line."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

__all__ = ["configure"]


def configure(parser: argparse.ArgumentParser) -> Any:
    """build a pruned attribution graph: Neuronpedia JSON and a PNG"""
    parser.add_argument("--model", default="tiny-induction", help="model spec (default: bundled)")
    parser.add_argument(
        "--prompt",
        help="the prompt (default: the demo's repeated sequence on the bundled model)",
    )
    parser.add_argument(
        "--target",
        help="the predicted token (word or id) at the last position (default with --prompt: the "
        "model's top logits)",
    )
    parser.add_argument(
        "--distractor", help="trace target − distractor (default: the target's logit)"
    )
    parser.add_argument(
        "--top-logits", type=int, default=10, help="without --target: at most this many logits"
    )
    parser.add_argument(
        "--logit-probability",
        type=float,
        default=0.95,
        help="without --target: top logits until their probabilities add up to this",
    )
    parser.add_argument(
        "--transcoder",
        help="a (cross-layer) transcoder whose features replace the MLP neurons, by a spec a "
        "plugin loads: transcoder:DIR or transcoder-random:N (scalarlens-sae)",
    )
    parser.add_argument("--out", default="graph.json", help="Neuronpedia graph JSON to write")
    parser.add_argument("--plot", help="PNG of the pruned graph to write")
    parser.add_argument("--slug", default="scalarlens-graph", help="the graph's slug in the JSON")
    parser.add_argument(
        "--max-nodes", type=int, default=2048, help="neurons and heads kept as nodes"
    )
    parser.add_argument("--node-threshold", type=float, default=0.8)
    parser.add_argument("--edge-threshold", type=float, default=0.98)
    parser.add_argument("--qk-heads", type=int, default=8, help="heads whose Q/K paths are traced")
    parser.add_argument(
        "--block-mb", type=int, default=256, help="largest dense edge block held at once (MiB)"
    )
    return run


def run(args: argparse.Namespace, registry: Any) -> int:
    import scalarlens
    from scalarlens.exceptions import ModelInputError

    from ._draw import draw
    from ._graph import attribution_graph, estimate_memory
    from ._neuronpedia import write_neuronpedia
    from ._prune import prune

    model = scalarlens.load_model(args.model)
    prompt, target, distractor = args.prompt, args.target, args.distractor
    if prompt is None:
        from scalarlens import demo_prompt

        prompt, demo_target, demo_distractor = demo_prompt()
        target = target if target is not None else demo_target
        distractor = distractor if distractor is not None else demo_distractor
    if target is None and distractor is not None:
        raise ModelInputError("scalarlens graph: --distractor needs --target")
    tokens = model.tokenizer.encode(prompt) if hasattr(model, "tokenizer") else None
    n_tokens = len(tokens) if tokens is not None else 0
    block = args.block_mb * 2**20
    # Captures are kept in the adapter's accumulation dtype (float32 for a bfloat16 model).
    dtype = getattr(model, "accumulation_dtype", None) or getattr(model, "dtype", None)
    need = estimate_memory(
        model.dims,
        n_tokens,
        max_nodes=args.max_nodes,
        block_bytes=block,
        model_bytes=dtype.itemsize if dtype is not None else 8,
    )
    print(
        f"graph of {model.name}: {n_tokens} tokens, up to {args.max_nodes} component nodes; "
        f"memory needed beyond the model: at most {need / 2**20:,.0f} MiB",
        file=sys.stderr,
    )
    start = time.perf_counter()

    def say(message: str) -> None:
        print(f"  [{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr)

    transcoder = None
    if args.transcoder:
        transcoder = registry.feature_loader(args.transcoder)(args.transcoder, model)
        say(f"transcoder {args.transcoder}: layers {list(transcoder.layers)}")
    graph = attribution_graph(
        model,
        prompt,
        target=_token(target),
        distractor=_token(distractor),
        transcoder=transcoder,
        top_logits=args.top_logits,
        logit_probability=args.logit_probability,
        max_nodes=args.max_nodes,
        block_bytes=block,
        qk_heads=args.qk_heads,
        progress=say,
    )
    say("pruning by influence")
    result = prune(graph, args.node_threshold, args.edge_threshold)
    out = write_neuronpedia(graph, args.out, slug=args.slug, prompt=prompt)
    print(
        f"{len(result.nodes)} nodes and {result.edges._nnz()} edges kept of {len(graph.nodes)} "
        f"and {graph.edges._nnz()}; wrote {out}"
    )
    print("strongest path: " + " <- ".join(graph.label(i) for i in graph.top_path()))
    if args.plot:
        print(f"wrote {draw(graph, args.plot)}")
    return 0


def _token(value: str | None) -> str | int | None:
    if value is None:
        return None
    return int(value) if value.isdigit() else value
