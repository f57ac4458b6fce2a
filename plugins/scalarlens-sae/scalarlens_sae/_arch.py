"""Encoder maths of every supported SAE architecture, in one immutable class.

All architectures share ``x̂ = z W_dec + b_dec`` (then the output map of the input
normalisation) and differ only in how the latents ``z`` are computed from the *encoder input*

    u   = norm_in(x) − b_dec·[apply_b_dec_to_input]
    pre = u W_enc + b_enc

| architecture | latents ``z`` (reference: SAELens 6 inference classes) |
|---|---|
| ``standard``  | ``relu(pre)`` |
| ``jumprelu``  | ``relu(pre)·[pre > θ]`` (per-latent threshold θ; Gemma Scope) |
| ``topk``      | ``relu(pre)`` on the ``k`` largest entries of ``pre`` per token, 0 elsewhere |
| ``batchtopk`` | with a threshold θ (how BatchTopK SAEs are saved for inference):
  ``relu(pre)·[relu(pre) > θ]``; without one, the ``⌊k·N⌋`` largest entries of ``relu(pre)``
  over the N tokens encoded together (one prompt), 0 elsewhere |
| ``gated``     | ``[u W_enc + b_gate > 0] · relu(u (W_enc ⊙ exp(r_mag)) + b_mag)``
  (``b_enc`` holds ``b_mag``) |

Ties (TopK, BatchTopK) are broken deterministically: among equal values the lower index (the
lower flat index ``token·A + latent`` for BatchTopK) wins.

**Gradients through the sparsifier** (used by every gradient of an encode, e.g. attribution
through the encoder): the derivative of a jump or of the top-k selection is taken as **zero**;
the gradient flows unchanged through every active latent (``∂z_j/∂pre_j = 1`` where
``z_j > 0``), and not at all through inactive ones.  No straight-through estimator: that is a
training device, not the derivative of the function.  The splice's latent gradients
``∂J/∂z = ∇x̂ ∂x̂/∂z`` do not depend on this choice.

**Input normalisation** (SAELens ``normalize_activations``): ``none``;
``expected_average_only_in`` with a scaling factor ``s`` is folded into the weights at load
(``W_enc·s``, ``W_dec/s``, ``b_dec/s``: exact, SAELens' ``fold_activation_norm_scaling_factor``),
without one it is the identity at inference (as in SAELens); ``constant_norm_rescale``
(``norm_in(x) = x·√d_in/‖x‖``, output divided by the same factor) and ``layer_norm``
(``(x − μ)/(σ + 1e-5)`` with the unbiased σ, output ``x̂·σ + μ``) are per token, so the decoder
is affine in ``z`` with a per-token scale: ``x̂ = scale(x)·(z W_dec + b_dec) + offset(x)``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import attrs

from ._errors import SaeLoadError

if TYPE_CHECKING:
    import torch

__all__ = ["ARCHITECTURES", "NORMALIZATIONS", "SparseAutoencoder", "check_shapes"]

ARCHITECTURES = ("standard", "jumprelu", "topk", "batchtopk", "gated")
"""Encoder architectures; SAELens' ``matryoshka_batchtopk`` loads as its base ``batchtopk``."""

NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
"""Run-time input normalisations (``expected_average_only_in`` is folded at load)."""

TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
_EXPECTED = "W_enc (d_in×d_sae), b_enc (d_sae), W_dec (d_sae×d_out), b_dec (d_out)"
LAYER_NORM_EPS = 1e-5


def check_shapes(shapes: dict[str, tuple[int, ...]], where: str, *, transcoder: bool) -> None:
    """Raise ``SaeLoadError`` naming the tensor whose shape breaks the SAELens layout.

    An SAE reconstructs its input (``d_out = d_in``); a transcoder may write elsewhere.
    """
    w_enc = shapes["W_enc"]
    if len(w_enc) != 2:
        raise SaeLoadError(f"{where}: W_enc must be 2-d (d_in×d_sae), got shape {list(w_enc)}")
    d_in, d_sae = w_enc
    w_dec = shapes["W_dec"]
    d_out = w_dec[1] if transcoder and len(w_dec) == 2 else d_in
    expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    for name in ("threshold", "b_gate", "r_mag"):
        if name in shapes:
            expected[name] = (d_sae,)
    for name, want in expected.items():
        if shapes[name] != want:
            raise SaeLoadError(
                f"{where}: {name} has shape {list(shapes[name])}, expected {list(want)} "
                f"(W_enc is {d_in}×{d_sae}; layout: {_EXPECTED})"
            )


@attrs.frozen(eq=False)
class SparseAutoencoder:
    """An SAE (or one layer's transcoder) of any architecture in :data:`ARCHITECTURES`.

    Immutable; ``cast(like)`` returns (and memoises) a copy in another dtype/device.  A
    transcoder is the same object with ``d_out ≠ d_in`` allowed (``transcoder=True``) and
    ``apply_b_dec_to_input`` false.
    """

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    apply_b_dec_to_input: bool = True
    source: str = "<in memory>"
    architecture: str = attrs.field(default="standard", kw_only=True)
    threshold: torch.Tensor | None = attrs.field(default=None, kw_only=True)
    k: float | None = attrs.field(default=None, kw_only=True)
    b_gate: torch.Tensor | None = attrs.field(default=None, kw_only=True)
    r_mag: torch.Tensor | None = attrs.field(default=None, kw_only=True)
    normalize: str = attrs.field(default="none", kw_only=True)
    transcoder: bool = attrs.field(default=False, kw_only=True)
    _casts: dict[tuple[torch.dtype, torch.device], SparseAutoencoder] = attrs.field(
        factory=dict, init=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        where = self.source
        if self.architecture not in ARCHITECTURES:
            raise SaeLoadError(
                f"{where}: architecture {self.architecture!r} is not supported; supported: "
                f"{list(ARCHITECTURES)}"
            )
        if self.normalize not in NORMALIZATIONS:
            raise SaeLoadError(
                f"{where}: normalize_activations {self.normalize!r} is not supported at run "
                f"time; supported: {list(NORMALIZATIONS)}"
            )
        shapes = {n: tuple(getattr(self, n).shape) for n in TENSORS}
        for name in ("threshold", "b_gate", "r_mag"):
            value = getattr(self, name)
            if value is not None:
                shapes[name] = tuple(value.shape)
        check_shapes(shapes, where, transcoder=self.transcoder)
        if self.architecture == "jumprelu" and self.threshold is None:
            raise SaeLoadError(
                f"{where}: a jumprelu SAE needs a per-latent 'threshold' tensor (d_sae); "
                "none was given"
            )
        if self.architecture == "gated" and (self.b_gate is None or self.r_mag is None):
            raise SaeLoadError(f"{where}: a gated SAE needs 'b_gate' and 'r_mag' (d_sae each)")
        if self.architecture == "topk" or (
            self.architecture == "batchtopk" and self.threshold is None
        ):
            _check_k(self.k, self.n_latents, self.architecture, where)
        if self.transcoder and self.normalize != "none":
            raise SaeLoadError(
                f"{where}: a transcoder with normalize_activations={self.normalize!r} is not "
                "supported (its output lives in another space); supported: 'none'"
            )
        if self.d_out != self.d_in and self.apply_b_dec_to_input:
            raise SaeLoadError(
                f"{where}: apply_b_dec_to_input is true but b_dec has {self.d_out} entries and "
                f"the input {self.d_in}; a transcoder must set apply_b_dec_to_input false"
            )

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def n_latents(self) -> int:
        return int(self.W_enc.shape[1])

    # --- maths ---------------------------------------------------------------------------

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize == "constant_norm_rescale":
            scaled: torch.Tensor = x * (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True))
            return scaled
        if self.normalize == "layer_norm":
            centred = x - x.mean(dim=-1, keepdim=True)
            return centred / (centred.std(dim=-1, keepdim=True) + LAYER_NORM_EPS)
        return x

    def output_map(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(scale, offset)`` with ``x̂ = scale·(z W_dec + b_dec) + offset`` (``None`` = 1, 0)."""
        if self.normalize == "constant_norm_rescale":
            return x.norm(dim=-1, keepdim=True) / math.sqrt(self.d_in), None
        if self.normalize == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            return (x - mean).std(dim=-1, keepdim=True), mean
        return None, None

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """``u W_enc + b_enc`` (``b_mag`` for gated SAEs) with ``u`` the encoder input."""
        u = self._encoder_input(x)
        if self.architecture == "gated":
            assert self.r_mag is not None
            return u @ (self.W_enc * self.r_mag.exp()) + self.b_enc
        return u @ self.W_enc + self.b_enc

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        u = self._normalized(x)
        return u - self.b_dec if self.apply_b_dec_to_input else u

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``…×A`` of ``x`` (``…×d_in``); see the module docstring per architecture."""
        pre = self.pre_activation(x)
        arch = self.architecture
        if arch == "standard":
            return pre.relu()
        if arch == "jumprelu":
            assert self.threshold is not None
            return pre.relu() * (pre > self.threshold).to(pre.dtype)
        if arch == "gated":
            assert self.b_gate is not None
            gate = (self._encoder_input(x) @ self.W_enc + self.b_gate) > 0
            return gate.to(pre.dtype) * pre.relu()
        if arch == "batchtopk" and self.threshold is not None:
            acts = pre.relu()
            return acts * (acts > self.threshold).to(pre.dtype)
        assert self.k is not None
        if arch == "topk":
            keep = _top_mask(pre, int(self.k))
            return pre.relu() * keep.to(pre.dtype)
        # batchtopk without a threshold: one selection over all tokens encoded together
        acts = pre.relu()
        flat = acts.reshape(-1)
        n_tokens = flat.numel() // self.n_latents
        keep = _top_mask(flat, min(flat.numel(), int(self.k * n_tokens)))
        return (flat * keep.to(flat.dtype)).reshape(acts.shape)

    def decode(self, latents: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """``scale(x)·(z W_dec + b_dec) + offset(x)``; ``x`` is needed only with normalisation."""
        out = latents @ self.W_dec + self.b_dec
        if self.normalize == "none":
            return out
        if x is None:
            raise ValueError(f"{self.source}: decode needs the input x ({self.normalize})")
        scale, offset = self.output_map(x)
        if scale is not None:
            out = out * scale
        return out if offset is None else out + offset

    def decoder_offset(self, x: torch.Tensor) -> torch.Tensor:
        """What no latent owns: ``decode(0, x)`` = ``scale(x)·b_dec + offset(x)`` (``…×d_out``)."""
        return self.decode(x.new_zeros((*x.shape[:-1], self.n_latents)), x)

    # --- variants --------------------------------------------------------------------------

    def fold_decoder_norm(self) -> SparseAutoencoder:
        """The same function with unit-norm decoder rows: ``z' = z·‖W_dec[j]‖``, ``x̂`` unchanged.

        Exact for every architecture whose selection is invariant to a positive per-latent
        scale of ``pre`` (standard, jumprelu, gated, thresholded batchtopk); TopK and BatchTopK
        by count rank latents by ``pre``, which the scale changes, so they are refused.
        ``r_mag`` is unchanged (the magnitude path already shares the scaled ``W_enc``).
        """
        if self.architecture == "topk" or (
            self.architecture == "batchtopk" and self.threshold is None
        ):
            raise SaeLoadError(
                f"{self.source}: decoder-norm folding changes which latents a {self.architecture}"
                " SAE selects (it ranks latents by their scaled pre-activation); supported for "
                "standard, jumprelu, gated and thresholded batchtopk SAEs"
            )
        norms = self.W_dec.norm(dim=-1)
        scaled = {
            "W_enc": self.W_enc * norms,
            "b_enc": self.b_enc * norms,
            "W_dec": self.W_dec / norms[:, None],
            "b_dec": self.b_dec,
        }
        extra: dict[str, Any] = {}
        if self.threshold is not None:
            extra["threshold"] = self.threshold * norms
        if self.b_gate is not None:
            extra["b_gate"] = self.b_gate * norms
        return attrs.evolve(self, **scaled, **extra, source=f"{self.source} (decoder norm folded)")

    def with_k(self, k: float) -> SparseAutoencoder:
        """The same TopK / BatchTopK SAE with another inference-time ``k``."""
        if self.architecture not in ("topk", "batchtopk"):
            raise SaeLoadError(
                f"{self.source}: k applies to topk and batchtopk SAEs, not {self.architecture}"
            )
        if self.architecture == "batchtopk":
            return attrs.evolve(self, k=k, threshold=None)
        return attrs.evolve(self, k=k)

    def cast(self, like: torch.Tensor) -> SparseAutoencoder:
        """This SAE in ``like``'s dtype and device (memoised; the original is unchanged)."""
        key = (like.dtype, like.device)
        if self.W_enc.dtype == like.dtype and self.W_enc.device == like.device:
            return self
        cached = self._casts.get(key)
        if cached is None:
            moved = {
                n: t.to(dtype=like.dtype, device=like.device)
                for n in (*TENSORS, "threshold", "b_gate", "r_mag")
                if (t := getattr(self, n)) is not None
            }
            cached = attrs.evolve(self, **moved)
            self._casts[key] = cached
        return cached

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors in the SAELens layout (``b_enc`` is ``b_mag`` for gated SAEs)."""
        out = {n: getattr(self, n) for n in TENSORS}
        if self.architecture == "gated":
            out["b_mag"] = out.pop("b_enc")
        for name in ("threshold", "b_gate", "r_mag"):
            if (value := getattr(self, name)) is not None:
                out[name] = value
        return out


def _check_k(k: Any, n_latents: int, architecture: str, where: str) -> None:
    if k is None:
        raise SaeLoadError(f"{where}: a {architecture} SAE needs k (cfg.json 'k'); none given")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k <= 0:
        raise SaeLoadError(f"{where}: k must be a positive number, got {k!r}")
    if architecture == "topk" and int(k) != k:
        raise SaeLoadError(f"{where}: k of a topk SAE must be an integer, got {k!r}")
    if k > n_latents:
        raise SaeLoadError(
            f"{where}: k={k} is larger than the SAE's {n_latents} latents; choose "
            f"1 ≤ k ≤ {n_latents}"
        )


def _top_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries along the last axis, ties to the lower index."""
    import torch

    order = torch.sort(values.detach(), dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    return mask.scatter_(-1, order[..., :k], True)
