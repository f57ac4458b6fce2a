"""Transcoders and cross-layer transcoders (CLTs): encoders per layer, decoders per layer pair.

A transcoder reads the MLP's input at source layer ``s`` and writes the MLP's output; a CLT
latent at layer ``s`` writes to the MLP output of every layer ``t ≥ s``:

    z_s = enc_s(x_s)                                  # x_s: the MLP input of layer s
    ŷ_t = Σ_{s ≤ t} z_s W_dec[s→t] + b_dec[t]         # the MLP output of layer t
    e_t = y_t − ŷ_t

A per-layer transcoder (PLT) is the case ``W_dec[s→t] = 0`` for ``t ≠ s``.  Each encoder is a
:class:`~scalarlens_sae._arch.SparseAutoencoder` (any architecture; its ``W_dec``/``b_dec``
are the same-layer decoder and bias), so JumpReLU and TopK transcoders use the same maths as
SAEs.

Formats read from local disk:

* **SAELens** — a directory with ``cfg.json`` (``architecture`` ``transcoder`` /
  ``jumprelu_transcoder``, ``d_out``) + ``sae_weights.safetensors``: one transcoder at one
  layer (``options['transcoder']['layer']``);
* **circuit-tracer PLT set** — ``layer_{i}.safetensors`` with ``W_enc`` (d_transcoder ×
  d_model, *transposed* relative to SAELens), ``W_dec``, ``b_enc``, ``b_dec`` and optionally
  ``activation_function.threshold`` (JumpReLU) or ``k`` (TopK);
* **circuit-tracer CLT** — ``W_enc_{i}.safetensors`` (``W_enc_i``, ``b_enc_i``, ``b_dec_i``,
  optionally ``threshold_i``) + ``W_dec_{i}.safetensors`` (``W_dec_i``: d_transcoder ×
  (n_layers − i) × d_model).

Skip connections (``W_skip``) are refused by name: they are not latents, and no DST owns them.
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ._arch import SparseAutoencoder
from ._errors import SaeLoadError

if TYPE_CHECKING:
    import torch

__all__ = ["Transcoder", "load_transcoder", "random_transcoder", "transcoder_layers"]


@attrs.frozen(eq=False)
class Transcoder:
    """Encoders per source layer, decoders per (source, target) pair, biases per target."""

    encoders: dict[int, SparseAutoencoder]
    decoders: dict[tuple[int, int], torch.Tensor]
    b_dec: dict[int, torch.Tensor]
    source: str
    _casts: dict[tuple[Any, Any], Transcoder] = attrs.field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        widths = {(e.d_in, e.n_latents) for e in self.encoders.values()}
        if len(widths) != 1:
            raise SaeLoadError(
                f"{self.source}: every layer's encoder must have the same input width and "
                f"latent count, got (d_in, d_sae) {sorted(widths)}"
            )
        for (s, t), w in self.decoders.items():
            if t < s or s not in self.encoders or t not in self.b_dec:
                raise SaeLoadError(f"{self.source}: decoder {s}→{t} has no encoder or bias")
            if tuple(w.shape) != (self.n_latents, self.d_out):
                raise SaeLoadError(
                    f"{self.source}: W_dec {s}→{t} has shape {list(w.shape)}, expected "
                    f"{[self.n_latents, self.d_out]}"
                )

    @property
    def layers(self) -> tuple[int, ...]:
        """Source layers (where latents live)."""
        return tuple(sorted(self.encoders))

    @property
    def targets(self) -> tuple[int, ...]:
        """Target layers (whose MLP output is replaced)."""
        return tuple(sorted(self.b_dec))

    @property
    def cross_layer(self) -> bool:
        return any(s != t for s, t in self.decoders)

    @property
    def d_in(self) -> int:
        return next(iter(self.encoders.values())).d_in

    @property
    def d_out(self) -> int:
        return int(next(iter(self.b_dec.values())).shape[0])

    @property
    def n_latents(self) -> int:
        return next(iter(self.encoders.values())).n_latents

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.encoders[layer].encode(x)

    def reconstruct(self, target: int, latents: dict[int, torch.Tensor]) -> torch.Tensor:
        """``ŷ_t = Σ_{s ≤ t} z_s W_dec[s→t] + b_dec[t]`` from the latents of each source."""
        out = self.b_dec[target]
        for (s, t), w in self.decoders.items():
            if t == target:
                out = out + latents[s] @ w
        return out

    def write_weights(self, source: int, targets: set[int] | None = None) -> torch.Tensor:
        """``Σ_t W_dec[s→t]`` over the targets (all by default): latent ``j``'s total write."""
        total = self.decoders[(source, source)].new_zeros((self.n_latents, self.d_out))
        for (s, t), w in self.decoders.items():
            if s == source and (targets is None or t in targets):
                total = total + w
        return total

    def cast(self, like: torch.Tensor) -> Transcoder:
        key = (like.dtype, like.device)
        first = next(iter(self.b_dec.values()))
        if first.dtype == like.dtype and first.device == like.device:
            return self
        cached = self._casts.get(key)
        if cached is None:
            cached = Transcoder(
                {s: e.cast(like) for s, e in self.encoders.items()},
                {k: w.to(dtype=like.dtype, device=like.device) for k, w in self.decoders.items()},
                {t: b.to(dtype=like.dtype, device=like.device) for t, b in self.b_dec.items()},
                self.source,
            )
            self._casts[key] = cached
        return cached


def _from_encoders(
    encoders: dict[int, SparseAutoencoder],
    extra_decoders: dict[tuple[int, int], torch.Tensor],
    extra_biases: dict[int, torch.Tensor],
    source: str,
) -> Transcoder:
    decoders = {(s, s): e.W_dec for s, e in encoders.items()}
    biases = {s: e.b_dec for s, e in encoders.items()}
    return Transcoder(
        {**encoders}, {**decoders, **extra_decoders}, {**biases, **extra_biases}, source
    )


# --- loading ---------------------------------------------------------------------------------

_LOCK = threading.Lock()
_CACHE: dict[tuple[Any, ...], Transcoder] = {}
_PLT = re.compile(r"^layer_(\d+)\.safetensors$")
_CLT = re.compile(r"^W_enc_(\d+)\.safetensors$")


def _format(directory: Path) -> str:
    names = {p.name for p in directory.iterdir()}
    if {"cfg.json", "sae_weights.safetensors"} <= names:
        return "saelens"
    if any(_CLT.match(n) for n in names):
        return "circuit_tracer_clt"
    if any(_PLT.match(n) for n in names):
        return "circuit_tracer_plt"
    raise SaeLoadError(
        f"transcoder path {str(directory)!r} holds no transcoder; found {sorted(names)}. "
        "Expected an SAELens transcoder (cfg.json + sae_weights.safetensors), circuit-tracer "
        "per-layer files layer_{i}.safetensors, or a circuit-tracer CLT "
        "(W_enc_{i}.safetensors + W_dec_{i}.safetensors)"
    )


def _directory(path: str | Path) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise SaeLoadError(
            f"transcoder path {str(directory)!r} is not a directory; options['transcoder']"
            "['path'] must be a directory of transcoder files"
        )
    return directory.resolve()


def _numbered(directory: Path, pattern: re.Pattern[str]) -> list[int]:
    layers = sorted(int(m.group(1)) for p in directory.iterdir() if (m := pattern.match(p.name)))
    if layers != list(range(len(layers))):
        raise SaeLoadError(
            f"{directory}: layer files must be numbered 0..n−1 without gaps, got {layers}"
        )
    return layers


def transcoder_layers(path: str | Path, layer: int | None) -> tuple[int, ...]:
    """Source layers of the transcoder at ``path`` (cheap: file names only), for build time."""
    directory = _directory(path)
    fmt = _format(directory)
    if fmt == "saelens":
        if layer is None:
            raise SaeLoadError(
                f"{directory} is a single SAELens transcoder: give options['transcoder']"
                "['layer'] (the layer whose MLP it replaces)"
            )
        return (layer,)
    return tuple(_numbered(directory, _CLT if fmt == "circuit_tracer_clt" else _PLT))


def transcoder_n_latents(path: str | Path) -> int:
    """``d_transcoder`` from a file header (no weights read)."""
    from safetensors import safe_open

    from ._sae import read_sae_config

    directory = _directory(path)
    fmt = _format(directory)
    if fmt == "saelens":
        return int(read_sae_config(directory)["d_sae"])
    file, key = (
        ("W_enc_0.safetensors", "W_enc_0")
        if fmt == "circuit_tracer_clt"
        else ("layer_0.safetensors", "W_enc")
    )
    with safe_open(str(directory / file), framework="pt") as handle:
        return int(handle.get_slice(key).get_shape()[0])


def _read(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types
        raise SaeLoadError(f"{file}: cannot read safetensors file ({exc})") from None


def _get(tensors: dict[str, torch.Tensor], name: str, file: Path) -> torch.Tensor:
    if name not in tensors:
        raise SaeLoadError(f"{file}: missing tensor {name!r}; found {sorted(tensors)}")
    return tensors[name]


def _refuse_skip(tensors: dict[str, torch.Tensor], file: Path) -> None:
    if any(name.startswith("W_skip") for name in tensors):
        raise SaeLoadError(
            f"{file}: skip transcoders (W_skip) are not supported: the skip term belongs to no "
            "latent; supported: transcoders and CLTs without skip connections"
        )


def _encoder(
    w_enc: torch.Tensor,
    b_enc: torch.Tensor,
    w_dec: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None,
    k: Any,
    where: str,
) -> SparseAutoencoder:
    architecture = "jumprelu" if threshold is not None else "topk" if k is not None else "standard"
    return SparseAutoencoder(
        w_enc,
        b_enc,
        w_dec,
        b_dec,
        apply_b_dec_to_input=False,
        source=where,
        architecture=architecture,
        threshold=threshold,
        k=None if k is None else int(k),
        transcoder=True,
    )


def load_transcoder(path: str | Path, layer: int | None = None) -> Transcoder:
    """Load (once per path, layer and file versions) a transcoder or CLT from local disk."""
    from ._sae import load_sae

    directory = _directory(path)
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in directory.iterdir()))
    key = (str(directory), layer, stamp)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    fmt = _format(directory)
    if fmt == "saelens":
        (source_layer,) = transcoder_layers(directory, layer)
        encoder = load_sae(directory)
        if not encoder.transcoder:
            raise SaeLoadError(
                f"{directory}/cfg.json: architecture {encoder.architecture!r} is an SAE, not a "
                "transcoder; supported: 'transcoder', 'jumprelu_transcoder' (or circuit-tracer "
                "transcoder files)"
            )
        transcoder = _from_encoders({source_layer: encoder}, {}, {}, str(directory))
    elif fmt == "circuit_tracer_plt":
        encoders = {}
        for i in _numbered(directory, _PLT):
            file = directory / f"layer_{i}.safetensors"
            t = _read(file)
            _refuse_skip(t, file)
            k = t.get("k")
            encoders[i] = _encoder(
                _get(t, "W_enc", file).T,
                _get(t, "b_enc", file),
                _get(t, "W_dec", file),
                _get(t, "b_dec", file),
                t.get("activation_function.threshold"),
                None if k is None else int(k.item()),
                str(file),
            )
        transcoder = _from_encoders(encoders, {}, {}, str(directory))
    else:
        transcoder = _load_clt(directory)
    with _LOCK:
        _CACHE[key] = transcoder
    return transcoder


def _load_clt(directory: Path) -> Transcoder:
    layers = _numbered(directory, _CLT)
    n = len(layers)
    encoders: dict[int, SparseAutoencoder] = {}
    decoders: dict[tuple[int, int], torch.Tensor] = {}
    for i in layers:
        enc_file, dec_file = (
            directory / f"W_enc_{i}.safetensors",
            directory / f"W_dec_{i}.safetensors",
        )
        if not dec_file.is_file():
            raise SaeLoadError(f"{directory}: has {enc_file.name} but no {dec_file.name}")
        enc, dec = _read(enc_file), _read(dec_file)
        _refuse_skip({**enc, **dec}, enc_file)
        w_dec = _get(dec, f"W_dec_{i}", dec_file)
        if w_dec.dim() != 3 or w_dec.shape[1] != n - i:
            raise SaeLoadError(
                f"{dec_file}: W_dec_{i} has shape {list(w_dec.shape)}, expected "
                f"[d_transcoder, {n - i}, d_model] (layer {i} writes to layers {i}..{n - 1})"
            )
        encoders[i] = _encoder(
            _get(enc, f"W_enc_{i}", enc_file).T,
            _get(enc, f"b_enc_{i}", enc_file),
            w_dec[:, 0],
            _get(enc, f"b_dec_{i}", enc_file),
            enc.get(f"threshold_{i}"),
            None,
            str(enc_file),
        )
        for offset in range(1, n - i):
            decoders[(i, i + offset)] = w_dec[:, offset]
    return _from_encoders(encoders, decoders, {}, str(directory))


def random_transcoder(
    n_latents: int, d_model: int, n_layers: int, seed: int = 0, *, cross_layer: bool = True
) -> Transcoder:
    """A deterministic random (cross-layer) transcoder over every layer, float64, cached."""
    key = ("random", n_latents, d_model, n_layers, seed, cross_layer)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    import torch

    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    encoders = {
        s: _encoder(
            randn(d_model, n_latents) / math.sqrt(d_model),
            randn(n_latents) * 0.1,
            randn(n_latents, d_model) / math.sqrt(n_latents),
            randn(d_model) * 0.1,
            None,
            None,
            f"random_transcoder layer {s}",
        )
        for s in range(n_layers)
    }
    decoders = {
        (s, t): randn(n_latents, d_model) / math.sqrt(n_latents)
        for s in range(n_layers)
        for t in range(s + 1, n_layers)
        if cross_layer
    }
    where = f"random_init(n_latents={n_latents}, seed={seed}, cross_layer={cross_layer})"
    transcoder = _from_encoders(encoders, decoders, {}, where)
    with _LOCK:
        _CACHE[key] = transcoder
    return transcoder


def clear_transcoder_cache() -> None:
    with _LOCK:
        _CACHE.clear()
