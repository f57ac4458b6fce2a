"""Reconstitution on ScalarLens's own GPT-2: the oracle of ``scalarlens.testing``, plus the
services (JVP, path choice) checked against autograd and finite differences."""

from __future__ import annotations

import pytest
import scalarlens
import torch
from scalarlens import ActivationLocationType as ALT
from scalarlens.testing import check_reconstitution

from tests.builtins._tiny import TOKENS, tiny_adapter


def test_gpt2_reconstitutes_its_own_run_and_backward() -> None:
    check_reconstitution(tiny_adapter(), TOKENS, atol=1e-10)


def test_the_oracle_catches_a_wrong_reconstitution() -> None:
    adapter = tiny_adapter()
    real = adapter.reconstitute_mlp

    def off_by_bias(resid: torch.Tensor, layer: int, *, detach_scale: bool = False):  # type: ignore[no-untyped-def]
        pre, post = real(resid, layer, detach_scale=detach_scale)
        return pre + 1e-6, post

    adapter.reconstitute_mlp = off_by_bias  # type: ignore[method-assign]
    with pytest.raises(AssertionError, match="mlp.pre_act"):
        check_reconstitution(adapter, TOKENS, atol=1e-10)


def test_jvp_equals_a_finite_difference_along_a_write() -> None:
    adapter = tiny_adapter()
    captures = [scalarlens.CaptureRequest(ALT.RESID_POST_ATTN, scalarlens.PassType.FORWARD, [1])]
    (run,) = adapter.run([TOKENS], captures, return_logits=False)
    resid = run.captured[(ALT.RESID_POST_ATTN, scalarlens.PassType.FORWARD)][1]
    write = torch.zeros_like(resid)
    write[2] = torch.randn(
        resid.shape[1], generator=torch.Generator().manual_seed(3), dtype=resid.dtype
    )

    def post(r: torch.Tensor) -> torch.Tensor:
        return adapter.reconstitute_mlp(r, 1, detach_scale=True)[1]

    out, tangent = scalarlens.reconstitute_jvp(post, resid, write)
    eps = 1e-6
    fd = (post(resid + eps * write) - post(resid - eps * write)) / (2 * eps)
    # The scale is detached only for differentiation, so the finite difference (which moves σ)
    # matches the JVP only where σ's change is second order: compare against the undetached one.
    _, tangent_live = scalarlens.reconstitute_jvp(
        lambda r: adapter.reconstitute_mlp(r, 1)[1], resid, write
    )
    assert torch.allclose(out, post(resid))
    assert torch.allclose(tangent_live, fd, atol=1e-7)
    assert tangent[:2].abs().max() == 0 and tangent[3:].abs().max() == 0  # other tokens untouched
    assert not torch.allclose(tangent, tangent_live)  # detaching σ changes the derivative


def test_residual_read_by_follows_the_block_wiring() -> None:
    dims = tiny_adapter().dims
    assert scalarlens.residual_read_by(dims, "attn", 0) == (ALT.RESID_POST_EMBEDDING, None)
    assert scalarlens.residual_read_by(dims, "attn", 2) == (ALT.RESID_POST_MLP, 1)
    assert scalarlens.residual_read_by(dims, "mlp", 2) == (ALT.RESID_POST_ATTN, 2)
    import attrs

    parallel = attrs.evolve(dims, parallel_residual=True)
    assert scalarlens.residual_read_by(parallel, "mlp", 2) == (ALT.RESID_POST_MLP, 1)
