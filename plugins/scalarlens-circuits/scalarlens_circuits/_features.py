"""Transcoder features as graph nodes, in place of the MLP neurons they replace.

A transcoder (per-layer or cross-layer) reads the MLP's input at source layer ``s`` and writes
the MLP's output at every target layer ``t ≥ s``:

    z_s = enc_s(x_s)            ŷ_t = Σ_{s≤t} z_s W_dec[s→t] + b_dec[t]

This is the graph circuit-tracer builds: features are nodes, each MLP's output minus the
transcoder's reconstruction is the error node (``y_t − ŷ_t``, plus the writes of features not
kept), and with the encoder's gate frozen (which latents are active) a feature's activation is
linear in the residual stream its source layer reads.  ``y_t`` is the MLP's write to the
residual stream as ``scalarlens-sae`` defines it (``resid.delta_mlp``, after any post-norm), so
decoder rows are written as they are: no post-norm factor.

The transcoder is any object with the shape of ``scalarlens_sae``'s ``Transcoder`` — ``layers``
(source layers), ``encode(layer, x)``, ``decoders[(s, t)]`` (``A×D``), ``b_dec[t]`` and
optionally ``cast(like)`` — so the two plugins never import each other.
"""

from __future__ import annotations

from typing import Any

import torch
from scalarlens import ActivationLocationType, PassType
from scalarlens.exceptions import ModelInputError

__all__ = ["TranscoderFeatures"]

ALT = ActivationLocationType
BWD = PassType.BACKWARD


class TranscoderFeatures:
    """What the graph builder asks of a transcoder, computed once per graph in float64."""

    def __init__(self, transcoder: Any, builder: Any) -> None:
        for name in ("layers", "encode", "decoders", "b_dec"):
            if not hasattr(transcoder, name):
                raise ModelInputError(
                    f"attribution_graph(transcoder=...): {type(transcoder).__name__} has no "
                    f"{name!r}; pass a transcoder with layers, encode(layer, x), "
                    "decoders[(s, t)] and b_dec[t] (e.g. scalarlens_sae.load_transcoder(...))"
                )
        self.builder = builder
        dims = builder.dims
        like = torch.zeros((), dtype=torch.float64)
        self.tc = transcoder.cast(like) if hasattr(transcoder, "cast") else transcoder
        self.sources = tuple(sorted(int(s) for s in self.tc.layers))
        self.targets = tuple(sorted({int(t) for (_, t) in self.tc.decoders}))
        bad = [s for s in (*self.sources, *self.targets) if not 0 <= s < dims.n_layers]
        if bad:
            raise ModelInputError(
                f"attribution_graph(transcoder=...): layers {bad} are outside the model's "
                f"{dims.n_layers} layers"
            )
        self.inputs = {s: builder.mlp_input(s) for s in self.sources}  # T×D normalised
        self.latents = {s: self._encode(s, self.inputs[s]) for s in self.sources}
        self.n_latents = next(iter(self.latents.values())).shape[1]

    def _encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.tc.encode(layer, x.to(torch.float64))
        if z.ndim != 2 or z.shape[0] != x.shape[0]:
            raise ModelInputError(
                f"transcoder.encode({layer}, x) returned shape {tuple(z.shape)} for {x.shape[0]} "
                "tokens; expected tokens × latents"
            )
        return z.to(torch.float64)

    def replaces(self, layer: int) -> bool:
        """Whether ``layer``'s MLP is written by the transcoder (its neurons are not nodes)."""
        return layer in self.targets

    def decoder(self, source: int, target: int) -> torch.Tensor:
        w: torch.Tensor = self.tc.decoders[(source, target)]
        return w.to(torch.float64)

    def bias(self, target: int) -> torch.Tensor:
        b: torch.Tensor = self.tc.b_dec[target]
        return b.to(torch.float64)

    def scores(self, source: int) -> torch.Tensor:
        """``|z·∂objective/∂z|`` per token and latent, through the decoders' direct paths."""
        b = self.builder
        z = self.latents[source]
        grad = torch.zeros_like(z)
        for target in self.targets:
            if (source, target) not in self.tc.decoders:
                continue
            g = b.cap(ALT.RESID_DELTA_MLP, target, BWD)  # ŷ is resid.delta_mlp itself
            grad = grad + g @ self.decoder(source, target).T
        return (z * grad).abs()

    def write_rows(
        self, source: int, index: torch.Tensor, pos: torch.Tensor
    ) -> list[tuple[int, torch.Tensor]]:
        """``(target layer, k×D)`` writes of the kept features at each target layer."""
        z = self.latents[source][pos, index]
        out = []
        for target in self.targets:
            if (source, target) in self.tc.decoders:
                w = self.decoder(source, target).index_select(0, index)
                out.append((target, z[:, None] * w))
        return out

    def read(
        self, source: int, index: torch.Tensor, position: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For features ``index`` at one token: ``∂z/∂x`` (``k×D``, the gate frozen), the
        constant ``z − (∂z/∂x)·x`` and ``z`` itself."""
        x = self.inputs[source][position : position + 1].clone().requires_grad_(True)
        with torch.enable_grad():
            z = self.tc.encode(source, x)[0].to(torch.float64)
            picks = torch.zeros(len(index), z.shape[0], dtype=z.dtype)
            picks[torch.arange(len(index)), index] = 1.0
            (grads,) = torch.autograd.grad(z, x, grad_outputs=picks, is_grads_batched=True)
        grads = grads[:, 0].to(torch.float64)
        values = z.detach()[index]
        constant = values - grads @ x.detach()[0]
        return grads, constant, values
