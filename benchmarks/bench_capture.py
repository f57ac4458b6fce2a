"""Capture cost of ``derive`` at GPT-2-small shapes (random weights, nothing downloaded).

1. Peak memory *above the loaded model's baseline* of ``derive(..., "mlp.post_act")`` against
   capturing every location (the TransformerLens-style "cache everything" run), at 128 and 512
   tokens.  Each case runs in a fresh process; a sampler thread reads the resident set size
   (``/proc/self/statm``) every millisecond during the run, and the figure is the peak minus the
   RSS measured just before the run (after one short warm-up forward).  Target: ≤ 0.3×.
2. ``derive`` end-to-end time (forward + backward, ``mlp.post_act`` and its gradient for a
   logit-difference objective) against a plain forward + backward of the same model on the same
   tokens, gradients taken with respect to activations only in both.  Target: ≤ 1.3×.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

N_TOKENS = (128, 512)
RUNS = 5


def gpt2_small(seed: int = 0):  # type: ignore[no-untyped-def]
    import torch
    from scalarlens.models import GPT2Adapter, GPT2Config, GPT2Model

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=3072
    )
    return GPT2Adapter(GPT2Model(cfg), name="gpt2-small-random")


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_bytes_reader() -> Callable[[], int] | None:
    """Bytes malloc has handed out and not taken back (glibc ``mallinfo2``), or ``None``.

    RSS growth also counts freed heap memory glibc keeps, so it depends on what ran before
    (a warm-up that freed 100 MB hides 100 MB of the measured run); live bytes do not.
    """
    import ctypes
    import ctypes.util

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
            ).split()
        ]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None
    mallinfo2.restype = MallInfo2

    def live() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return live


def live_cell(ours: float | None, base: float | None, digits: int = 3) -> str:
    """A table cell with two peak live-allocation figures and their ratio (— where unknown)."""
    if ours is None or base is None:
        return "—"
    ratio = f"{ours / base:.{digits}f}×" if base > 0 else "—"
    return f"{ours / 2**20:.1f} / {base / 2**20:.1f} MiB = {ratio}"


class PeakSampler:
    """Highest RSS seen while the ``with`` block runs, minus the RSS at entry; likewise the
    live malloc bytes where glibc reports them (``live_above_baseline``, else ``None``)."""

    def __enter__(self) -> PeakSampler:
        self._live = _live_bytes_reader()
        self.base = _rss()
        self.peak = self.base
        self.live_base = self.live_peak = self._live() if self._live else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        self.peak = max(self.peak, _rss())
        if self._live is not None:
            self.live_peak = max(self.live_peak, self._live())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def above_baseline(self) -> int:
        return self.peak - self.base

    @property
    def live_above_baseline(self) -> int | None:
        return None if self._live is None else self.live_peak - self.live_base


def worker_memory(case: str, n_tokens: int) -> dict[str, float]:
    import scalarlens
    import torch
    from scalarlens import ActivationLocationType, CaptureRequest, PassType

    adapter = gpt2_small()
    tokens = [
        torch.randint(0, 50257, (n_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    ]
    layers = range(adapter.dims.n_layers)
    # Every location this model has (GPT-2: all but a gated MLP's mlp.up and the post-norm
    # scales, which it does not have and returns as ones), as before those were added.
    absent = {
        ActivationLocationType.MLP_UP,
        ActivationLocationType.ATTN_POST_NORM_SCALE,
        ActivationLocationType.MLP_POST_NORM_SCALE,
    }
    everything = [
        CaptureRequest(loc, PassType.FORWARD, None if loc.has_no_layers else layers)
        for loc in ActivationLocationType
        if loc not in absent
    ]
    # One short forward first: one-time library set-up (thread pools, kernel workspaces) is not
    # what either strategy costs.
    adapter.run([tokens[0][:8]], [])
    with PeakSampler() as sampler:
        if case == "derive_post_act":
            result = scalarlens.derive(adapter, tokens, "mlp.post_act")
        else:
            result = adapter.run(tokens, everything)
    del result
    return {"bytes": float(sampler.above_baseline)}


def worker_time(n_tokens: int) -> dict[str, list[float]]:
    import scalarlens
    import torch
    from scalarlens import DstConfig

    adapter = gpt2_small()
    model = adapter.model
    tokens = torch.randint(0, 50257, (1, n_tokens), generator=torch.Generator().manual_seed(1))
    target, distractor = 11, 12

    def leaf_embedding(name: str, layer: int | None, t: torch.Tensor) -> torch.Tensor:
        return t.detach().requires_grad_() if name == "resid.post_emb" else t

    def plain() -> None:
        with torch.enable_grad():
            logits = model(tokens, hook=leaf_embedding)
            (logits[0, -1, target] - logits[0, -1, distractor]).backward()

    config = DstConfig(derive_gradients=True)

    def ours() -> None:
        scalarlens.derive(
            adapter,
            tokens.tolist(),
            "mlp.post_act",
            target=target,
            distractor=distractor,
            config=config,
        )

    times: dict[str, list[float]] = {"plain": [], "derive": []}
    plain(), ours()  # warm-up
    for _ in range(RUNS):
        for name, fn in (("plain", plain), ("derive", ours)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def _spawn(*args: str) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s ({min(values):.3f}–{max(values):.3f})"


def main() -> str:
    lines = [
        "### Capture: memory and end-to-end time (GPT-2-small shapes, random weights)",
        "",
        "| workload | ScalarLens | baseline | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for n in N_TOKENS:
        ours = _spawn("memory", "derive_post_act", str(n))["bytes"]
        every = _spawn("memory", "capture_everything", str(n))["bytes"]
        lines.append(
            f"| peak memory above model, `derive(mlp.post_act)` vs capture every location, "
            f"{n} tokens | {_mib(ours)} | {_mib(every)} | {ours / every:.3f}× | ≤ 0.3× |"
        )
    times = _spawn("time", "128")
    ratios = [d / p for d, p in zip(times["derive"], times["plain"], strict=True)]
    lines.append(
        f"| `derive` (mlp.post_act + gradient, logit-diff objective) vs plain forward+backward, "
        f"128 tokens, median of {RUNS} | {_summary(times['derive'])} | "
        f"{_summary(times['plain'])} | {statistics.median(ratios):.2f}× "
        f"({min(ratios):.2f}–{max(ratios):.2f}) | ≤ 1.3× |"
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "memory":
        print(json.dumps(worker_memory(sys.argv[2], int(sys.argv[3]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "time":
        print(json.dumps(worker_time(int(sys.argv[2]))))
    else:
        print(main())
