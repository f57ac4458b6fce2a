"""Project before expand: direct effects never allocate the ``T×F×D`` per-neuron writes.

Measured with ``torch.profiler`` (``profile_memory=True``): the largest single allocation of
any op while deriving.  ``mlp.write`` is the positive control that does build ``T×F×D``.
"""

from __future__ import annotations

from typing import Any

import pytest
import scalarlens
from torch.profiler import ProfilerActivity, profile

from ._tiny import D_MLP, D_MODEL, FWD, N_HEADS, REGISTRY, TOKENS, T, logit_diff, tiny_adapter


@pytest.fixture(scope="module")
def adapter() -> Any:
    return tiny_adapter()


def _largest_allocation(adapter: Any, name: str) -> int:
    deriver = REGISTRY.get(name)
    plan = scalarlens.make_plan([(deriver, FWD)], adapter.dims.n_layers)
    (run,) = adapter.run([TOKENS], plan.captures, logit_diff())
    raw = scalarlens.RawActivationStore.from_nested_dict(run.captured)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        scalarlens.execute_plan(plan, raw, model=adapter)
    return max(int(e.cpu_memory_usage) for e in prof.events())


def test_mlp_write_to_grad_never_builds_t_f_d(adapter: Any) -> None:
    t_f_d = T * D_MLP * D_MODEL * 8
    assert _largest_allocation(adapter, "mlp.write") >= t_f_d  # the method sees it
    assert _largest_allocation(adapter, "mlp.write_to_final_residual_grad") < t_f_d / 4


def test_attn_write_to_grad_never_builds_t_s_h_d(adapter: Any) -> None:
    t_s_h_d = T * T * N_HEADS * D_MODEL * 8
    assert _largest_allocation(adapter, "attn.write") >= t_s_h_d
    assert _largest_allocation(adapter, "attn.write_to_final_residual_grad") < t_s_h_d / 4
