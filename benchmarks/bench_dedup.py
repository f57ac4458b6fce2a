"""Plan deduplication: 20 DSTs sharing sub-derivers, planned together vs derived one by one.

GPT-2-small shapes, random weights, one 128-token prompt.  An isolated registry holds the
builtin catalogue plus 20 small derived DSTs, five over each of four shared chains:

* ``attn.act_times_grad`` (→ ``attn.qk_probs`` forward and backward), summed over keys;
* ``mlp.act_times_grad`` (→ ``mlp.post_act`` forward and backward), scaled;
* ``mlp.write_to_final_residual_grad`` (→ ``mlp.post_act``, the direction g), shifted;
* ``attn.write_to_final_residual_grad`` (→ ``attn.v``, ``attn.qk_probs``, g), summed over keys.

The model runs once to capture every raw tensor the 20 need; both sides then start from that
store: ``execute_plan(make_plan(all 20))`` against ``execute_plan(make_plan([one]))`` for each
DST in turn.  We count kernel evaluations (``EvaluationCounter``: one per node and layer) and
time both (median of ``RUNS`` alternated runs after a warm-up, min–max).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import scalarlens
import torch
from scalarlens import (
    DeriveContext,
    DerivedScalarType,
    Dimension,
    DstConfig,
    DstReference,
    NodeType,
    PassType,
    ScalarDeriver,
)

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

N_TOKENS, RUNS, N_DSTS = 128, 5, 20
F = PassType.FORWARD
T, H, FF = Dimension.TOKENS, Dimension.ATTN_HEADS, Dimension.MLP_ACTS
Inputs = tuple[torch.Tensor | None, ...]
Kernel = Callable[[Inputs, int | None, DeriveContext], torch.Tensor]

# (shared source DST, result shape, node type, kernel of the i-th consumer)
CHAINS: tuple[tuple[str, tuple[Dimension, ...], NodeType, Callable[[int], Kernel]], ...] = (
    (
        "attn.act_times_grad",
        (T, H),
        NodeType.ATTENTION_HEAD,
        lambda i: lambda inputs, layer, ctx: _x(inputs).sum(1) * (i + 1),
    ),
    (
        "mlp.act_times_grad",
        (T, FF),
        NodeType.MLP_NEURON,
        lambda i: lambda inputs, layer, ctx: _x(inputs) * (i + 1),
    ),
    (
        "mlp.write_to_final_residual_grad",
        (T, FF),
        NodeType.MLP_NEURON,
        lambda i: lambda inputs, layer, ctx: _x(inputs) + i,
    ),
    (
        "attn.write_to_final_residual_grad",
        (T, H),
        NodeType.ATTENTION_HEAD,
        lambda i: lambda inputs, layer, ctx: _x(inputs).sum(1) - i,
    ),
)


def _x(inputs: Inputs) -> torch.Tensor:
    (x,) = inputs
    assert x is not None
    return x


def _factory(
    dst: DerivedScalarType, source: str, kernel: Kernel
) -> Callable[[DstConfig], ScalarDeriver]:
    def build(config: DstConfig) -> ScalarDeriver:
        return ScalarDeriver(dst, config, (DstReference(source, F),), kernel)

    return build


def dedup_registry(n: int = N_DSTS) -> tuple[scalarlens.Registry, list[str]]:
    """An isolated registry: the builtins plus ``n`` consumers ``bench.dedup_{i}``."""
    import scalarlens_builtins.plugin

    reg = scalarlens.Registry(autoload=False)
    reg.register(scalarlens_builtins.plugin, "builtins")
    names = []
    for i in range(n):
        source, shape, node_type, make_kernel = CHAINS[i % len(CHAINS)]
        dst = DerivedScalarType(
            f"bench.dedup_{i}", shape, node_type, description=f"consumer {i} of {source}"
        )

        reg.register_factory(dst, _factory(dst, source, make_kernel(i)), plugin="bench")
        names.append(dst.name)
    return reg, names


def _time_pair(
    a: Callable[[], object], b: Callable[[], object], runs: int
) -> tuple[list[float], list[float]]:
    a(), b()  # warm-up
    out_a: list[float] = []
    out_b: list[float] = []
    for _ in range(runs):
        for fn, out in ((a, out_a), (b, out_b)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return out_a, out_b


def _fmt(samples: list[float]) -> str:
    return (
        f"{statistics.median(samples) * 1e3:.1f} ms "
        f"({min(samples) * 1e3:.1f}–{max(samples) * 1e3:.1f})"
    )


def main(runs: int = RUNS) -> str:
    from bench_capture import gpt2_small

    adapter = gpt2_small()
    n_layers = adapter.dims.n_layers
    reg, names = dedup_registry()
    requests = [(reg.get(name, DstConfig()), F) for name in names]
    tokens = torch.randint(
        0, adapter.dims.n_vocab, (N_TOKENS,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    union = scalarlens.make_plan(requests, n_layers)
    (run,) = adapter.run([tokens], union.captures, scalarlens.LogitDiffObjective(1, 2))
    raw = scalarlens.RawActivationStore.from_nested_dict(run.captured)

    def together(counter: scalarlens.EvaluationCounter | None = None) -> dict[str, torch.Tensor]:
        out = scalarlens.execute_plan(
            scalarlens.make_plan(requests, n_layers), raw, model=adapter, counter=counter
        )
        return {k.dst.name: v[n_layers - 1] for k, v in out.items()}

    def separately(counter: scalarlens.EvaluationCounter | None = None) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = {}
        for request in requests:
            out = scalarlens.execute_plan(
                scalarlens.make_plan([request], n_layers), raw, model=adapter, counter=counter
            )
            result.update({k.dst.name: v[n_layers - 1] for k, v in out.items()})
        return result

    joint_counter, alone_counter = scalarlens.EvaluationCounter(), scalarlens.EvaluationCounter()
    joint, alone = together(joint_counter), separately(alone_counter)
    if joint.keys() != alone.keys() or any(not torch.equal(joint[k], alone[k]) for k in joint):
        raise AssertionError("deriving together and separately gave different numbers")
    shared = {source for source, *_ in CHAINS}
    shared_joint = sum(joint_counter.by_dst[s] for s in shared)
    shared_alone = sum(alone_counter.by_dst[s] for s in shared)

    t_joint, t_alone = _time_pair(together, separately, runs)
    per_run = [j / a for j, a in zip(t_joint, t_alone, strict=True)]
    ratio = statistics.median(t_joint) / statistics.median(t_alone)
    lines = [
        "### Plan deduplication (bench_dedup.py)",
        "",
        f"GPT-2-small shapes, random weights, {N_TOKENS} tokens, all {n_layers} layers: "
        f"{N_DSTS} DSTs, five over each of {', '.join(f'`{s}`' for s, *_ in CHAINS)}, derived "
        "from one captured store in one plan vs one plan per DST (identical results). Kernel "
        "evaluations are one per plan node and layer; times are the median of "
        f"{runs} alternated runs (min–max), planning included.",
        "",
        "| | one plan for all 20 | 20 separate plans | ratio |",
        "|---|---|---|---|",
        f"| kernel evaluations | {joint_counter.total} | {alone_counter.total} | "
        f"{joint_counter.total / alone_counter.total:.2f}× |",
        f"| of which shared nodes (the four shared DSTs and the direction g) | "
        f"{joint_counter.total - N_DSTS * n_layers} | {alone_counter.total - N_DSTS * n_layers} "
        f"| |",
        f"| of which the four shared DSTs themselves | {shared_joint} | {shared_alone} | "
        f"{shared_joint / shared_alone:.2f}× |",
        f"| time | {_fmt(t_joint)} | {_fmt(t_alone)} | {ratio:.2f}× "
        f"(per run {min(per_run):.2f}–{max(per_run):.2f}) |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
