"""Corpus sweeps (``scalarlens.sweep``): throughput, Ray against local, memory as the corpus grows.

1. Throughput of a local sweep of a forward-only DST (``mlp.post_act``: every MLP neuron of every
   layer, 36,864 components) over 16 prompts × 128 tokens on GPT-2-small shapes (random weights),
   against a plain forward pass of the same model over the same batches (8 prompts each), in
   tokens/s; the sweep's time includes hashing the corpus, writing the shard and the final
   merge.  Alternated runs after a warm-up, median with min–max.  Target: ≥ 0.8×.
2. The same sweep on Ray with 2 workers (a local Ray started by the sweep, its start-up
   included; the model is a saved checkpoint each worker loads once) against the local engine.
3. Peak memory (resident set above the loaded model, sampled every millisecond in a fresh
   process) of a sweep of ``mlp.post_act`` on the bundled model over 40 and 400 synthetic
   prompts (10×), 10 prompts a shard so that both runs fold several shards: it should stay
   flat, since nothing is kept per token.

``python benchmarks/bench_sweep.py`` prints this module's section of RESULTS.md.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

N_PROMPTS, N_TOKENS, BATCH, RUNS = 16, 128, 8, 3
MEMORY_PROMPTS = (40, 400)


def _corpus() -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (N_PROMPTS, N_TOKENS), generator=generator)
    return ids.tolist()  # type: ignore[no-any-return]


def worker_throughput() -> dict[str, list[float]]:
    import scalarlens
    import torch
    from bench_capture import gpt2_small

    adapter = gpt2_small()
    corpus = _corpus()
    batches = [torch.tensor(corpus[i : i + BATCH]) for i in range(0, N_PROMPTS, BATCH)]

    def plain() -> None:
        with torch.no_grad():
            for batch in batches:
                adapter.model(batch)

    def blocks() -> None:  # the forward a sweep of mlp.post_act needs: no unembedding
        with torch.no_grad():
            for batch in batches:
                adapter.model(batch, unembed=False)

    def sweep(out: str) -> None:
        scalarlens.sweep(
            adapter,
            corpus,
            "mlp.post_act",
            out=out,
            batch_size=BATCH,
            shard_size=N_PROMPTS,
            overwrite=True,
        )

    times: dict[str, list[float]] = {"plain": [], "blocks": [], "sweep": []}
    with tempfile.TemporaryDirectory() as tmp:
        plain(), sweep(tmp)  # warm-up
        for _ in range(RUNS):
            for name, fn in (("plain", plain), ("blocks", blocks), ("sweep", lambda: sweep(tmp))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def worker_engines() -> dict[str, float]:
    import scalarlens
    from bench_capture import gpt2_small
    from scalarlens.models._checkpoint import save_gpt2_checkpoint

    corpus = _corpus()
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_gpt2_checkpoint(gpt2_small().model, Path(tmp) / "gpt2-random")
        for engine in ("local", "ray"):
            t0 = time.perf_counter()
            scalarlens.sweep(
                str(checkpoint),
                corpus,
                "mlp.post_act",
                out=Path(tmp) / engine,
                batch_size=BATCH,
                shard_size=BATCH,
                engine=engine,
                workers=2,
            )
            out[engine] = time.perf_counter() - t0
        same = all(
            (Path(tmp) / "local" / p).read_bytes() == (Path(tmp) / "ray" / p).read_bytes()
            for p in ("manifest.json", "results.safetensors")
        )
    out["identical"] = float(same)
    return out


def worker_memory(n_prompts: int) -> dict[str, float]:
    import scalarlens
    from bench_capture import PeakSampler

    model = scalarlens.load_model()
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up outside the measurement: library set-up is not what the corpus size costs.
        scalarlens.sweep(model, scalarlens.synthetic_corpus(4), "mlp.post_act", out=tmp + "/w")
        corpus = scalarlens.synthetic_corpus(n_prompts, seed=7)
        with PeakSampler() as sampler:
            scalarlens.sweep(model, corpus, "mlp.post_act", out=tmp + "/m", shard_size=10)
    return {"bytes": float(sampler.above_baseline)}


def _spawn(*args: str) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def main() -> str:
    tokens = N_PROMPTS * N_TOKENS
    times = _spawn("throughput")
    rate = {name: [tokens / t for t in values] for name, values in times.items()}
    ratios = [s / p for s, p in zip(rate["sweep"], rate["plain"], strict=True)]
    limit = [s / p for s, p in zip(rate["sweep"], rate["blocks"], strict=True)]
    engines = _spawn("engines")
    memory = {n: _spawn("memory", str(n))["bytes"] for n in MEMORY_PROMPTS}
    small, large = (memory[n] for n in MEMORY_PROMPTS)
    lines = [
        "### Corpus sweeps (bench_sweep.py)",
        "",
        "| workload | ScalarLens | baseline | ratio | target |",
        "|---|---|---|---|---|",
        f"| local sweep of `mlp.post_act` (36,864 neurons), {N_PROMPTS} × {N_TOKENS} tokens, "
        f"GPT-2-small shapes: tokens/s vs a plain forward over the same batches, median of "
        f"{RUNS} | {_summary(rate['sweep'])} tok/s | {_summary(rate['plain'])} tok/s | "
        f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) | ≥ 0.8× |",
        f"| same, vs the forward through the blocks only (no unembedding: all a sweep of "
        f"`mlp.post_act` runs) | {_summary(rate['sweep'])} tok/s | {_summary(rate['blocks'])} "
        f"tok/s | {statistics.median(limit):.2f}× ({min(limit):.2f}–{max(limit):.2f}) | "
        "reported |",
        f"| same sweep on Ray, 2 workers (local Ray start-up included), 2 shards: wall time vs "
        f"the local engine | {engines['ray']:.1f} s | {engines['local']:.1f} s | "
        f"{engines['ray'] / engines['local']:.2f}× | reported |",
        f"| peak memory above the model, sweep of `mlp.post_act` on tiny-induction, "
        f"{MEMORY_PROMPTS[1]} vs {MEMORY_PROMPTS[0]} synthetic prompts (10× the corpus; 10 "
        f"prompts a shard) | "
        f"{large / 2**20:.1f} MiB | {small / 2**20:.1f} MiB | {large / small:.2f}× | flat |",
        "",
        "Ray and local outputs were "
        + ("byte-identical" if engines["identical"] else "**not** identical")
        + " (manifest and results). Ray workers run with the driver's torch thread count (so "
        "they round alike), so two workers on two cores oversubscribe them: the Ray row "
        "measures the engine's overhead on one machine, not its scaling.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "throughput":
        print(json.dumps(worker_throughput()))
    elif len(sys.argv) > 1 and sys.argv[1] == "engines":
        print(json.dumps(worker_engines()))
    elif len(sys.argv) > 1 and sys.argv[1] == "memory":
        print(json.dumps(worker_memory(int(sys.argv[2]))))
    else:
        print(main())
