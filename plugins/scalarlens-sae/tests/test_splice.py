"""The splice function on its own (no adapter support needed): value, and every gradient."""

from __future__ import annotations

import scalarlens
import torch
from sae_testlib import sae_options

from scalarlens_sae import SaeOptions, make_interventions, online_locations, random_sae


def test_splice_is_the_identity_with_real_latent_and_error_gradients(
    model: scalarlens.ModelAdapter,
) -> None:
    """out = dec(z) + e = x; ∂J/∂x = ∇out, ∂J/∂z = ∇out W_decᵀ, ∂J/∂e = ∇out."""
    opts = SaeOptions(**sae_options())
    (intervention,) = make_interventions(opts.splice_params(), model)
    latents_loc, error_loc = online_locations(opts)
    assert intervention.emits == (latents_loc, error_loc)
    assert intervention.layers == frozenset({1})
    assert intervention.location is scalarlens.ActivationLocationType.MLP_POST_ACT

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 32, generator=generator, dtype=torch.float64).requires_grad_()
    weight = torch.randn(2, 5, 32, generator=generator, dtype=torch.float64)
    emitted: dict[str, torch.Tensor] = {}

    def emit(location: object, tensor: torch.Tensor) -> torch.Tensor:
        tensor.retain_grad()
        emitted[location.name] = tensor  # type: ignore[attr-defined]
        return tensor

    out = intervention.fn(x, 1, emit)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)
    (out * weight).sum().backward()
    sae = random_sae(24, 32, seed=0)
    z, e = emitted["sae.online.latents"], emitted["sae.online.error"]
    torch.testing.assert_close(z, sae.encode(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(z.grad, weight @ sae.W_dec.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(e.grad, weight, rtol=0, atol=1e-12)


def test_splice_casts_to_the_activation_dtype(model: scalarlens.ModelAdapter) -> None:
    opts = SaeOptions(**sae_options(location="resid.delta_attn"))
    (intervention,) = make_interventions(opts.splice_params(), model)
    x = torch.randn(1, 3, 16, dtype=torch.float32)
    out = intervention.fn(x, 1, lambda loc, t: t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
