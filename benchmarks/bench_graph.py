"""Attribution graphs (scalarlens-circuits) on a GPT-2-small-shaped random model: time, peak
memory against the figure ``estimate_memory`` gives in advance, and the graph's size.

The model is ``bench_capture.gpt2_small()``: ScalarLens's own GPT-2 (12 layers, d_model 768,
12 heads, d_mlp 3072, vocabulary 50257), GPT-2's random initialisation, float32.  The prompt is
``n`` random tokens; the objective is ``logit[11] − logit[12]`` at the last token;
``attribution_graph(max_nodes=2048, qk_heads=8)`` with the default edge block (256 MiB), then
``prune`` with its default thresholds.

Each prompt length runs in a fresh process: the model is built, one small graph (16 tokens) is
made as a warm-up (one-time library set-up is not the workload), then the measured graph.  Peak
memory is the process's peak RSS while ``attribution_graph`` + ``prune`` run, above the RSS
with the model loaded: the larger of ``getrusage`` ``ru_maxrss`` (the kernel's exact peak,
when it rose during the workload) and a 1 ms RSS sampler (``bench_capture.PeakSampler``).
The phases (``progress`` messages of ``attribution_graph``) are timed too.

    .venv/bin/python benchmarks/bench_graph.py [--out FILE] [--tokens 64 256 512] ...
"""

from __future__ import annotations

import itertools
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_capture import PeakSampler, _rss, gpt2_small  # noqa: E402

TOKENS = (64, 256, 512)
MAX_NODES = 2048
QK_HEADS = 8
TARGET, DISTRACTOR = 11, 12
VOCAB = 50257
PHASES = {  # attribution_graph's progress messages: the phase each one starts
    "running": "forward + backward with captures",
    "tracing": "query/key paths",
    "prune": "prune",
}
TITLE = "### Attribution graphs (bench_graph.py)\n\n"


def random_tokens(n: int, seed: int = 1) -> list[int]:
    import torch

    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _log(message: str) -> None:
    print(f"[bench_graph] {message}", file=sys.stderr, flush=True)


def worker(n_tokens: int, max_nodes: int, qk_heads: int) -> dict[str, Any]:
    """One graph over ``n_tokens`` (after a warm-up); time, memory, phases and sizes."""
    import gc

    from scalarlens_circuits import attribution_graph, estimate_memory, prune

    model = gpt2_small()
    tokens = random_tokens(n_tokens)
    warm = attribution_graph(
        model, tokens[:16], target=TARGET, distractor=DISTRACTOR, max_nodes=64, qk_heads=2
    )
    prune(warm)
    del warm
    gc.collect()

    block_bytes = 256 * 2**20  # attribution_graph's default
    model_bytes = next(model.model.parameters()).element_size()  # float32: 4
    estimate = estimate_memory(
        model.dims, n_tokens, max_nodes=max_nodes, block_bytes=block_bytes, model_bytes=model_bytes
    )
    phases: list[tuple[str, float, int]] = []
    base = _rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with PeakSampler() as sampler:
        start = time.perf_counter()

        def progress(message: str) -> None:
            phases.append((message, time.perf_counter() - start, sampler.peak - base))

        graph = attribution_graph(
            model,
            tokens,
            target=TARGET,
            distractor=DISTRACTOR,
            max_nodes=max_nodes,
            block_bytes=block_bytes,
            qk_heads=qk_heads,
            progress=progress,
        )
        built = time.perf_counter()
        phases.append(("prune", built - start, sampler.peak - base))
        pruned = prune(graph)
        done = time.perf_counter()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = sampler.above_baseline
    if maxrss_after > maxrss_before:  # the kernel's exact peak was set by this workload
        peak = max(peak, maxrss_after - base)
    return {
        "tokens": n_tokens,
        "graph_s": built - start,
        "prune_s": done - built,
        "peak": peak,
        "estimate": estimate,
        "model_rss": base,
        "nodes": len(graph.nodes),
        "components": sum(n.kind in ("neuron", "head") for n in graph.nodes),
        "edges": int(graph.edges.values().numel()),
        "kept_nodes": len(pruned.nodes),
        "kept_edges": int(pruned.edges.values().numel()),
        "qk_heads": len(graph.qk_edges),
        "phases": phases,
    }


def _spawn(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"bench_graph worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def _phase_line(r: dict[str, Any]) -> str:
    """``phase (seconds, peak so far)`` for each progress message, in order."""
    marks = [*r["phases"], ("end", r["graph_s"] + r["prune_s"], r["peak"])]
    parts = []
    for (name, t0, _), (_, t1, peak) in itertools.pairwise(marks):
        short = next((v for k, v in PHASES.items() if name.startswith(k)), "nodes and edges")
        parts.append(f"{short}: {t1 - t0:.1f} s (peak so far {_mib(peak)})")
    return f"- {r['tokens']} tokens — " + "; ".join(parts)


def main(
    tokens: Sequence[int] = TOKENS, max_nodes: int = MAX_NODES, qk_heads: int = QK_HEADS
) -> str:
    import importlib.util

    if importlib.util.find_spec("scalarlens_circuits") is None:
        return TITLE + "**Skipped**: `scalarlens-circuits` is not installed in this venv.\n"
    rows = []
    load_before = _load()
    for n in tokens:
        _log(f"{n} tokens (load {_load()})")
        rows.append(_spawn("worker", str(n), str(max_nodes), str(qk_heads)))
    load_after = _load()
    lines = [
        TITLE,
        f"GPT-2-small-shaped random model (`bench_capture.gpt2_small`, float32), random prompt, "
        f"`attribution_graph(max_nodes={max_nodes}, qk_heads={qk_heads})` with the default "
        "256 MiB edge block, then `prune()`. One run per length, each in a fresh process "
        "after a 16-token warm-up graph. Peak: RSS above the loaded model "
        f"({_mib(rows[0]['model_rss'])} RSS), max of `ru_maxrss` and a 1 ms sampler. "
        f"Load average {load_before} before, {load_after} after.\n",
        "| tokens | nodes (components) | edges | pruned nodes / edges | graph | prune | "
        "peak memory | `estimate_memory` | peak / estimate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['nodes']:,} ({r['components']:,}) | {r['edges']:,} | "
            f"{r['kept_nodes']:,} / {r['kept_edges']:,} | {r['graph_s']:.1f} s | "
            f"{r['prune_s']:.2f} s | {_mib(r['peak'])} | {_mib(r['estimate'])} | "
            f"{r['peak'] / r['estimate']:.2f} |"
        )
    lines.append("\nPhases of `attribution_graph` (time, and the peak reached by the end):\n")
    lines += [_phase_line(r) for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        n, nodes, qk = (int(a) for a in sys.argv[2:5])
        print(json.dumps(worker(n, nodes, qk)))
    else:
        import argparse

        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--out", type=Path, help="write the Markdown section here")
        parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
        parser.add_argument("--max-nodes", type=int, default=MAX_NODES)
        parser.add_argument("--qk-heads", type=int, default=QK_HEADS)
        args = parser.parse_args()
        text = main(args.tokens, args.max_nodes, args.qk_heads)
        if args.out:
            args.out.write_text(text)
        print(text)
