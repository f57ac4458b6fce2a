"""Clean vs corrupted (issue 12): activation patching against TransformerLens, and attribution
patching against one act×grad, on a GPT-2-small-shaped model with random weights.

Runs inside the TransformerLens venv (``benchmarks/setup_tl_venv.sh``), like ``bench_peers.py``,
whose helpers it reuses: the same random GPT-2-small (12 layers, 12 heads, d_model 768, d_mlp
3072, vocabulary 50257) saved once as safetensors and loaded by both libraries with no weight
processing, so both hold the very same weights.  Float32, one prompt of 128 random tokens (the
*main* prompt); the *baseline* (corrupted) prompt is the same sequence with the token at
position 5 changed.  Objective: the logit difference ``logit[11] − logit[12]`` at the last token.

1. Activation patching of every attention head (``attn.v_out``, TransformerLens ``hook_z``) at
   every position.  ScalarLens: ``derive(attn.activation_patching, baseline=...)`` with
   ``DstConfig(patch_positions=..., batch_rows=...)`` — ``objective(main) − objective(main with
   head h at position t from the baseline)``, ``batch_rows − 1`` patched copies of the prompt
   and one unpatched reference row per forward.  TransformerLens: its patching utility
   ``transformer_lens.patching.get_act_patch_attn_head_out_by_pos`` (one ``run_with_hooks``
   forward per (layer, pos, head)), the main prompt as its ``corrupted_tokens`` and the
   baseline's ``run_with_cache`` as its ``clean_cache``; it returns ``metric(patched)``, so
   ScalarLens's effect is ``metric(main)`` minus TransformerLens's value.  The two are checked
   to agree before anything is reported (float32: max |difference| ≤ ``ATOL`` over the
   measured subset; float64, every head of layer 0 at the corrupted position: relative
   ≤ ``RTOL_F64``).  A full run is 12 × 128 × 12 = 18,432 patched forwards, far too long on a
   small CPU for either library, so both patch the same uniformly strided subset — every head
   at ``LAYERS`` × ``POSITIONS`` — and per-patch time × 18,432 extrapolates the full run.  In
   TransformerLens every patch is a whole forward of the 128-token prompt, the same cost
   wherever it is.  ScalarLens resumes each pass from layer ``l`` and token ``t`` of its
   earliest patch (``scalarlens._patching``), so its cost per patch falls with later layers and
   positions: the subset is centred (mean fraction of layers and tokens left to run ≈ the full
   run's), and because a pass costs as much as its earliest patch, a sparse subset (patches of
   one pass far apart) costs ScalarLens more per patch than the full run, where neighbours share
   a pass; ScalarLens also skips components whose baseline value equals the main value (every
   position before the corruption, 5 of 128, in a full run).  Both make ScalarLens's
   extrapolation an upper bound.  ScalarLens restricts with ``layers=`` and ``patch_positions``;
   TransformerLens's utility is handed an ``index_df`` holding just those (layer, pos, head)
   rows (its own loop, unchanged, over fewer rows).  TransformerLens runs
   under ``torch.no_grad`` (its demos set ``torch.set_grad_enabled(False)``; the utility does
   not), its progress bar off.  Each side's time includes its clean and baseline runs.
2. Attribution patching of every head and neuron (``attn.attribution_patching`` +
   ``mlp.attribution_patching``, one ``derive`` with the baseline: main forward and backward,
   baseline forward) against one act×grad of every head and neuron (``attn.
   act_times_grad_per_token`` + ``mlp.act_times_grad``, one ``derive`` without baseline,
   ``bench_peers.scalarlens_act_times_grad``).

Times: median of ``RUNS`` runs alternated between the cases, after a short warm-up (min–max in
brackets; a ratio's range is over per-run pairs).  Memory: peak RSS above the loaded model,
each case in a fresh process after a warm-up (``bench_capture.PeakSampler``), the patching
cases at one position (their memory depends on ``batch_rows``, not on how many patches).

    benchmarks/.venv-tl/bin/python benchmarks/bench_patching.py [--out FILE] [--runs N] ...
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's patching loop has a progress bar

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_capture import PeakSampler  # noqa: E402
from bench_peers import (  # noqa: E402
    DISTRACTOR,
    HEAD_ATG,
    NEURON_ATG,
    SHAPES,
    TARGET,
    VOCAB,
    _fmt_s,
    _mib,
    _ratio,
    _versions,
    load_scalarlens,
    load_transformer_lens,
    random_tokens,
    relative_difference,
    save_random_gpt2,
    scalarlens_act_times_grad,
)

if TYPE_CHECKING:
    import torch
    from scalarlens.models import GPT2Adapter
    from transformer_lens import HookedTransformer

SHAPE = "gpt2-small"
N_TOKENS = 128
CORRUPT_AT = 5  # the baseline differs from the main prompt at this position only
# The measured subset: every head at these layers and positions (72 of the 18,432 triples),
# strided and centred: on average 7 of 12 layers and 64 of 128 tokens are left to run after a
# patch (a full run: 6.5 and 64.5), which is what a resumed ScalarLens pass costs.
POSITIONS = tuple(range(32, N_TOKENS, 64))  # 32, 96
LAYERS = tuple(range(1, SHAPES[SHAPE]["n_layer"], 4))  # 1, 5, 9
BATCH_ROWS = (8, 32)  # 32 is the default
RUNS = 3  # activation patching (each TransformerLens run is hundreds of forwards)
RUNS_AP = 5  # attribution patching vs act×grad
# Agreement required before anything is reported: max |difference| of the effects, in logits.
# Float32 rounding of the two objectives is ~1e-6 here (random weights: effects ~1e-3, so a
# relative bound would measure rounding); in float64 the two agree to ~3e-8.
ATOL = 1e-4
RTOL_F64 = 1e-9
HEAD_PATCH = "attn.activation_patching"
HEAD_AP, NEURON_AP = "attn.attribution_patching", "mlp.attribution_patching"


def prompts() -> tuple[list[int], list[int]]:
    """The main prompt and its baseline: one token changed, at ``CORRUPT_AT``."""
    main = random_tokens(N_TOKENS)
    baseline = list(main)
    baseline[CORRUPT_AT] = (baseline[CORRUPT_AT] + 1) % VOCAB
    return main, baseline


# --- workload 1: activation patching of every head ----------------------------------------------


def scalarlens_patching(
    adapter: GPT2Adapter,
    main: list[int],
    baseline: list[int],
    positions: Sequence[int],
    batch_rows: int,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """``objective(main) − objective(patched)`` per (layer, position, head): ``L×P×H``."""
    import scalarlens
    import torch

    store = scalarlens.derive(
        adapter,
        [main],
        [HEAD_PATCH],
        baseline=[baseline],
        target=TARGET,
        distractor=DISTRACTOR,
        layers=layers,
        config=scalarlens.DstConfig(patch_positions=list(positions), batch_rows=batch_rows),
    )
    chosen = range(adapter.dims.n_layers) if layers is None else layers
    return torch.stack([store.get(HEAD_PATCH, layer)[list(positions)] for layer in chosen])


def _logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return logits[0, -1, TARGET] - logits[0, -1, DISTRACTOR]


def transformer_lens_patching(
    model: HookedTransformer,
    main: list[int],
    baseline: list[int],
    positions: Sequence[int],
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """TransformerLens's ``get_act_patch_attn_head_out_by_pos`` over the chosen positions.

    Its ``corrupted_tokens`` is our main prompt, its ``clean_cache`` our baseline's; it returns
    ``metric(patched)``, turned here into ``metric(main) − metric(patched)``: ``L×P×H``.
    """
    import pandas as pd
    import torch
    from transformer_lens import patching

    cfg = model.cfg
    chosen = range(cfg.n_layers) if layers is None else layers
    model.set_use_attn_result(False)
    with torch.no_grad():
        main_ids, baseline_ids = torch.tensor([main]), torch.tensor([baseline])
        clean = _logit_diff(model(main_ids))
        _, cache = model.run_with_cache(baseline_ids)
        index = pd.DataFrame(
            [
                (layer, pos, head)
                for layer in chosen
                for pos in positions
                for head in range(cfg.n_heads)
            ],
            columns=["layer", "pos", "head"],
        )
        # The utility stores metric values in a tensor of the default dtype: float64 when the
        # model is, so that the float64 check is not rounded to float32.
        default = torch.get_default_dtype()
        torch.set_default_dtype(cfg.dtype)
        try:
            patched = patching.get_act_patch_attn_head_out_by_pos(
                model, main_ids, cache, _logit_diff, index_axis_names=None, index_df=index
            )
        finally:
            torch.set_default_dtype(default)
    effects: torch.Tensor = (clean - patched).reshape(len(chosen), len(positions), cfg.n_heads)
    return effects


# --- workload 2: attribution patching vs act×grad -----------------------------------------------


def scalarlens_attribution_patching(
    adapter: GPT2Adapter, main: list[int], baseline: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a − b)·∇a`` for every (token, head) and (token, neuron): ``L×T×H``, ``L×T×F``."""
    import scalarlens
    import torch

    store = scalarlens.derive(
        adapter,
        [main],
        [HEAD_AP, NEURON_AP],
        baseline=[baseline],
        target=TARGET,
        distractor=DISTRACTOR,
    )
    layers = range(adapter.dims.n_layers)
    return (
        torch.stack([store.get(HEAD_AP, layer) for layer in layers]),
        torch.stack([store.get(NEURON_AP, layer) for layer in layers]),
    )


# --- workers (each in its own process) ----------------------------------------------------------


def _time_alternating(
    fns: Mapping[str, Callable[[], Any]], runs: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Times of ``runs`` alternated runs of each case, and each case's result of the first."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, Any] = {}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - start)
            results.setdefault(name, result)
    return times, results


def _log(message: str) -> None:
    print(f"[bench_patching] {message}", file=sys.stderr, flush=True)


def worker_time(directory: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Both workloads: ``spec`` holds runs, runs_ap, batch_rows, positions and layers."""
    adapter = load_scalarlens(directory)
    tl = load_transformer_lens(directory)
    main, baseline = prompts()
    positions, layers = spec["positions"], spec["layers"]

    # Warm-up: one layer, one position (one-time library set-up is not the workload).
    for rows in spec["batch_rows"]:
        scalarlens_patching(adapter, main, baseline, [CORRUPT_AT], rows, layers=[0])
    transformer_lens_patching(tl, main, baseline, [CORRUPT_AT], layers=[0])
    scalarlens_attribution_patching(adapter, main, baseline)
    scalarlens_act_times_grad(adapter, main)

    _log(f"activation patching, positions {positions}, layers {layers}, {spec['runs']} runs")
    cases: dict[str, Callable[[], Any]] = {
        "tl": functools.partial(
            transformer_lens_patching, tl, main, baseline, positions, layers=layers
        )
    }
    for rows in spec["batch_rows"]:
        cases[f"sl{rows}"] = functools.partial(
            scalarlens_patching, adapter, main, baseline, positions, rows, layers=layers
        )
    patch_times, patch_results = _time_alternating(cases, spec["runs"])
    theirs = patch_results.pop("tl")
    agreement = {name: relative_difference(ours, theirs) for name, ours in patch_results.items()}
    absolute = max(float((ours - theirs).abs().max()) for ours in patch_results.values())
    nonzero = int((theirs.abs() > ATOL).sum())
    if absolute > ATOL:
        raise AssertionError(
            f"ScalarLens and TransformerLens disagree: max |difference| {absolute:.1e} > {ATOL} "
            f"(relative {agreement})"
        )

    _log(f"attribution patching vs act×grad, {spec['runs_ap']} runs")
    ap_times, _ = _time_alternating(
        {
            "attribution_patching": functools.partial(
                scalarlens_attribution_patching, adapter, main, baseline
            ),
            "act_times_grad": functools.partial(scalarlens_act_times_grad, adapter, main),
        },
        spec["runs_ap"],
    )
    # The same in float64, on a small subset: the two libraries do the same computation.
    del adapter, tl
    import torch

    ours64 = scalarlens_patching(
        load_scalarlens(directory, torch.float64), main, baseline, [CORRUPT_AT], 32, layers=[0]
    )
    theirs64 = transformer_lens_patching(
        load_transformer_lens(directory, torch.float64), main, baseline, [CORRUPT_AT], layers=[0]
    )
    agreement_f64 = relative_difference(ours64, theirs64)
    if agreement_f64 > RTOL_F64:
        raise AssertionError(f"float64: relative difference {agreement_f64:.1e} > {RTOL_F64}")
    return {
        "agreement_f64": agreement_f64,
        "patching": patch_times,
        "agreement": agreement,
        "agreement_abs": absolute,
        "largest_effect": float(theirs.abs().max()),
        "nonzero": nonzero,
        "patches": int(theirs.numel()),
        "ap": ap_times,
    }


def worker_memory(directory: str, case: str) -> dict[str, float]:
    """Peak RSS of one case above the loaded model, after a warm-up.

    ``tl``: TransformerLens's patching at one position of layer 0 (12 forwards, one at a time);
    ``sl<batch_rows>``: ScalarLens's at one position of enough layers to fill a whole pass;
    ``attribution_patching``; ``act_times_grad``.
    """
    main, baseline = prompts()
    model: Any
    fn: Callable[..., Any]
    warm: Callable[..., Any]
    if case == "tl":
        model = load_transformer_lens(directory)
        fn = warm = functools.partial(
            transformer_lens_patching, model, main, baseline, [CORRUPT_AT], layers=[0]
        )
    elif case.startswith("sl"):
        model = load_scalarlens(directory)
        rows = int(case[2:])
        heads = model.dims.n_heads
        layers = list(range(min(-(-rows // heads), model.dims.n_layers)))
        fn = functools.partial(
            scalarlens_patching, model, main, baseline, [CORRUPT_AT], rows, layers=layers
        )
        warm = functools.partial(
            scalarlens_patching, model, main, baseline, [CORRUPT_AT], rows, layers=[0]
        )
    elif case == "attribution_patching":
        model = load_scalarlens(directory)
        fn = warm = functools.partial(scalarlens_attribution_patching, model, main, baseline)
    else:
        model = load_scalarlens(directory)
        fn = warm = functools.partial(scalarlens_act_times_grad, model, main)
    warm()
    with PeakSampler() as sampler:
        result = fn()
    del result
    return {"bytes": float(sampler.above_baseline)}


# --- driver -------------------------------------------------------------------------------------


def _spawn(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"bench_patching worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def main(
    runs: int = RUNS,
    runs_ap: int = RUNS_AP,
    batch_rows: Sequence[int] = BATCH_ROWS,
    positions: Sequence[int] = POSITIONS,
    layers: Sequence[int] = LAYERS,
    memory: bool = True,
) -> str:
    started = time.perf_counter()
    load_before = _load()
    spec = {
        "runs": runs,
        "runs_ap": runs_ap,
        "batch_rows": list(batch_rows),
        "positions": list(positions),
        "layers": list(layers),
    }
    with tempfile.TemporaryDirectory(prefix="scalarlens-patching-") as tmp:
        directory = str(save_random_gpt2(Path(tmp) / SHAPE, SHAPES[SHAPE]))
        t = _spawn("time", directory, json.dumps(spec))
        load_after = _load()
        mem: dict[str, float] = {}
        if memory:
            cases = ["tl", *(f"sl{n}" for n in batch_rows), "attribution_patching"]
            for case in [*cases, "act_times_grad"]:
                _log(f"memory: {case}")
                mem[case] = _spawn("memory", directory, case)["bytes"]
    minutes = (time.perf_counter() - started) / 60

    cfg = SHAPES[SHAPE]
    full = cfg["n_layer"] * N_TOKENS * cfg["n_head"]
    patches = t["patches"]
    times = t["patching"]
    tl = times["tl"]

    def per_patch(values: list[float]) -> str:
        ms = [1e3 * v / patches for v in values]
        return f"{statistics.median(ms):.1f} ms ({min(ms):.1f}–{max(ms):.1f})"

    def full_run(values: list[float]) -> str:
        return f"{statistics.median(values) / patches * full / 60:.0f} min"

    rows = [
        "| TransformerLens `get_act_patch_attn_head_out_by_pos` (one forward per patch) | "
        f"{_fmt_s(tl)} | {per_patch(tl)} | {full_run(tl)} | | |"
    ]
    for n in batch_rows:
        ours = times[f"sl{n}"]
        default = " (default)" if n == 32 else ""
        rows.append(
            f"| ScalarLens `attn.activation_patching`, `batch_rows={n}`{default} | "
            f"{_fmt_s(ours)} | {per_patch(ours)} | {full_run(ours)} | {_ratio(ours, tl)} | "
            "≤ 0.3× |"
        )
    ap, atg = t["ap"]["attribution_patching"], t["ap"]["act_times_grad"]
    agree = ", ".join(f"`batch_rows={n}` {t['agreement'][f'sl{n}']:.1e}" for n in batch_rows)
    lines = [
        "### Clean vs corrupted: activation and attribution patching (bench_patching.py)",
        "",
        f"`bench_peers.py`'s random GPT-2-small, loaded by both libraries ({_versions()}), "
        f"float32, {N_TOKENS} random tokens, the baseline the same with token {CORRUPT_AT} "
        f"changed; objective logit[{TARGET}] − logit[{DISTRACTOR}] at the last token. "
        f"A full run patches {full:,} (layer, position, head) triples; both libraries patch "
        f"the same uniformly strided subset, every head at layers {list(layers)} and positions "
        f"{list(positions)} ({patches} triples; ScalarLens `derive(layers=..., "
        "config=DstConfig(patch_positions=..., batch_rows=...))`, TransformerLens its utility, "
        "unchanged, given an `index_df` of those rows, under `torch.no_grad`), and the full-run "
        f"column is per-patch time × {full:,}. TransformerLens runs one whole forward per "
        "patch. ScalarLens batches `batch_rows` − 1 patches and one unpatched reference row "
        "per pass and resumes each pass at the layer and token of its earliest patch, so its "
        "cost per patch depends on where the patches are: the subset is centred (on average "
        "7 of 12 layers and 64 of 128 tokens left to run, a full run 6.5 and 64.5), and since "
        "the patches sharing a pass are farther apart than in a full run and ScalarLens skips "
        "the positions before the corruption there, its full-run figure is an upper bound. "
        f"Median of {runs} alternated runs after a warm-up (min–max; the ratio is "
        "of medians, with the range of per-run ratios); attribution patching: "
        f"{runs_ap} runs. Load average (1 min) {load_before} before, {load_after} after the "
        f"timed runs, {os.cpu_count()} cores. This section took {minutes:.1f} min.",
        "",
        "| 1. activation patching, every head at every position | time of the subset | "
        "per patch | full run (extrapolated) | ratio to TransformerLens | target |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Checked before the figures are reported: ScalarLens's effect, objective(main) − "
        "objective(patched), against TransformerLens's metric(main) − its returned "
        f"metric(patched) over the subset: max |difference| {t['agreement_abs']:.1e} "
        f"(required ≤ {ATOL:.0e}; float32 rounding), largest |effect| "
        f"{t['largest_effect']:.2e}, {t['nonzero']} of {patches} effects above {ATOL:.0e}; "
        f"relative (max |difference| / max |effect|): {agree}. The same in float64 (both "
        f"models loaded in float64, every head of layer 0 at position {CORRUPT_AT}): relative "
        f"{t['agreement_f64']:.1e} (required ≤ {RTOL_F64:.0e}).",
        "",
        "| 2. every head and neuron, 128 tokens | ScalarLens | baseline | ratio | target |",
        "|---|---|---|---|---|",
        "| attribution patching (`attn.` + `mlp.attribution_patching`, with the baseline) | "
        f"{_fmt_s(ap)} | one act×grad (`{HEAD_ATG}` + `{NEURON_ATG}`, no baseline) "
        f"{_fmt_s(atg)} | {_ratio(ap, atg)} | ≤ 1.4× |",
        "",
    ]
    if mem:
        mem_rows = [
            f"| 1. activation patching, `batch_rows={n}` | {_mib(mem[f'sl{n}'])} | "
            f"TransformerLens {_mib(mem['tl'])} | {mem[f'sl{n}'] / mem['tl']:.2f}× |"
            for n in batch_rows
        ]
        a, b = mem["attribution_patching"], mem["act_times_grad"]
        mem_rows.append(
            f"| 2. attribution patching | {_mib(a)} | one act×grad {_mib(b)} | {a / b:.2f}× |"
        )
        lines += [
            "Peak RSS above the loaded model, one fresh process per figure after a warm-up "
            "(patching at one position: ScalarLens over enough layers to fill one whole pass "
            "of `batch_rows` rows, TransformerLens layer 0; neither grows with the number of "
            "patches):",
            "",
            "| peak memory above the model | ScalarLens | baseline | ratio |",
            "|---|---|---|---|",
            *mem_rows,
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "time":
        print(json.dumps(worker_time(sys.argv[2], json.loads(sys.argv[3]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "memory":
        print(json.dumps(worker_memory(sys.argv[2], sys.argv[3])))
    else:
        import argparse

        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--out", type=Path, help="write the Markdown section here")
        parser.add_argument("--runs", type=int, default=RUNS)
        parser.add_argument("--runs-ap", type=int, default=RUNS_AP)
        parser.add_argument("--batch-rows", nargs="+", type=int, default=list(BATCH_ROWS))
        parser.add_argument("--positions", nargs="+", type=int, default=list(POSITIONS))
        parser.add_argument("--layers", nargs="+", type=int, default=list(LAYERS))
        parser.add_argument("--no-memory", action="store_true", help="skip the memory figures")
        args = parser.parse_args()
        text = main(
            args.runs,
            args.runs_ap,
            args.batch_rows,
            args.positions,
            args.layers,
            memory=not args.no_memory,
        )
        if args.out:
            args.out.write_text(text)
        else:
            print(text)
