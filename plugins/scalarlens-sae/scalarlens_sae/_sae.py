"""Sparse autoencoders: one bias convention, loading from disk (SAELens layout), a cache.

**Bias convention** (SAELens "standard" ReLU SAE, used by every DST of this plugin, offline
and online alike)::

    latents = relu((x − b_dec) W_enc + b_enc)        # b_dec subtracted iff apply_b_dec_to_input
    x̂       = latents W_dec + b_dec
    error   = x − x̂

with ``W_enc: d_in×A``, ``b_enc: A``, ``W_dec: A×d_in``, ``b_dec: d_in``.  ``x`` is the *full*
activation at the SAE's location, biases included (``resid.delta_mlp`` contains ``b_out``,
``resid.delta_attn`` contains ``b_O``): offline and online latents read the very same tensor,
so they agree exactly (unlike the reference, which dropped ``b_out`` offline; §6 item 16).
SAELens' ``apply_b_dec_to_input: false`` (encoder reads ``x`` itself) is honoured when
``cfg.json`` says so; the default is ``true``.

Loading happens lazily at derive time and is cached per resolved path (and file modification
time), so a deriver holds only its options, never tensors.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ._errors import SaeLoadError

if TYPE_CHECKING:  # imported where tensors are made: the plugin's metadata loads without it
    import torch

__all__ = [
    "CFG_FILE",
    "WEIGHTS_FILE",
    "SparseAutoencoder",
    "clear_cache",
    "load_sae",
    "random_sae",
    "read_sae_config",
    "save_sae",
]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
_EXPECTED = "W_enc (d_in×d_sae), b_enc (d_sae), W_dec (d_sae×d_in), b_dec (d_in)"


@attrs.frozen(eq=False)
class SparseAutoencoder:
    """A ReLU SAE in the SAELens layout; see the module docstring for the bias convention.

    Immutable; ``cast(like)`` returns (and memoises) a copy in another dtype/device.
    """

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    apply_b_dec_to_input: bool = True
    source: str = "<in memory>"
    _casts: dict[tuple[torch.dtype, torch.device], SparseAutoencoder] = attrs.field(
        factory=dict, init=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        check_shapes({name: tuple(getattr(self, name).shape) for name in TENSORS}, self.source)

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def n_latents(self) -> int:
        return int(self.W_enc.shape[1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``relu((x − b_dec) W_enc + b_enc)`` over the last axis (``…×d_in → …×A``)."""
        centred = x - self.b_dec if self.apply_b_dec_to_input else x
        return (centred @ self.W_enc + self.b_enc).relu()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents W_dec + b_dec`` (``…×A → …×d_in``)."""
        return latents @ self.W_dec + self.b_dec

    def cast(self, like: torch.Tensor) -> SparseAutoencoder:
        """This SAE in ``like``'s dtype and device (memoised; the original is unchanged)."""
        key = (like.dtype, like.device)
        if self.W_enc.dtype == like.dtype and self.W_enc.device == like.device:
            return self
        cached = self._casts.get(key)
        if cached is None:
            moved = {n: getattr(self, n).to(dtype=like.dtype, device=like.device) for n in TENSORS}
            cached = SparseAutoencoder(
                **moved,
                apply_b_dec_to_input=self.apply_b_dec_to_input,
                source=self.source,
            )
            self._casts[key] = cached
        return cached


def check_shapes(shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise ``SaeLoadError`` naming the tensor whose shape breaks the SAELens layout."""
    w_enc = shapes["W_enc"]
    if len(w_enc) != 2:
        raise SaeLoadError(f"{where}: W_enc must be 2-d (d_in×d_sae), got shape {list(w_enc)}")
    d_in, d_sae = w_enc
    expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, want in expected.items():
        if shapes[name] != want:
            raise SaeLoadError(
                f"{where}: {name} has shape {list(shapes[name])}, expected {list(want)} "
                f"(W_enc is {d_in}×{d_sae}; layout: {_EXPECTED})"
            )


# --- reading from disk ---------------------------------------------------------------------

_SUPPORTED: dict[str, set[object]] = {
    # cfg.json key: accepted values (absent is always accepted)
    "architecture": {"standard"},
    "activation_fn_str": {"relu"},
    "activation_fn": {"relu"},
    "normalize_activations": {"none", None},
    "finetuning_scaling_factor": {False, None},
}


def _directory(path: str | Path) -> Path:
    directory = Path(path).expanduser()
    if not directory.exists():
        raise SaeLoadError(
            f"SAE path {str(directory)!r} does not exist; options['sae']['path'] must be a "
            f"directory holding {CFG_FILE} and {WEIGHTS_FILE} (SAELens layout)"
        )
    if not directory.is_dir():
        raise SaeLoadError(
            f"SAE path {str(directory)!r} is a file; options['sae']['path'] must be the "
            f"directory holding {CFG_FILE} and {WEIGHTS_FILE} (SAELens layout)"
        )
    return directory.resolve()


def _file(directory: Path, name: str) -> Path:
    file = directory / name
    if not file.is_file():
        present = sorted(p.name for p in directory.iterdir())
        raise SaeLoadError(
            f"SAE directory {str(directory)!r} has no {name}; found {present}. Expected the "
            f"SAELens layout: {CFG_FILE} + {WEIGHTS_FILE}"
        )
    return file


_LOCK = threading.Lock()
_CONFIGS: dict[tuple[str, int], dict[str, Any]] = {}
_SAES: dict[tuple[Any, ...], SparseAutoencoder] = {}


def read_sae_config(path: str | Path) -> dict[str, Any]:
    """The validated ``cfg.json`` of an SAE directory, with ``d_in``/``d_sae`` always present.

    Cheap (JSON plus the safetensors header when ``cfg.json`` lacks sizes), so it is what
    deriver factories call at build time to size ``Dimension.AUTOENCODER_LATENTS``.
    """
    directory = _directory(path)
    cfg_file = _file(directory, CFG_FILE)
    key = (str(cfg_file), cfg_file.stat().st_mtime_ns)
    with _LOCK:
        if key in _CONFIGS:
            return dict(_CONFIGS[key])
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SaeLoadError(f"{cfg_file}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise SaeLoadError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
    for field, accepted in _SUPPORTED.items():
        if field in cfg and cfg[field] not in accepted:
            raise SaeLoadError(
                f"{cfg_file}: {field}={cfg[field]!r} is not supported; scalarlens-sae handles "
                f"standard ReLU SAEs ({field} in {sorted(map(str, accepted))})"
            )
    if not isinstance(cfg.get("apply_b_dec_to_input", True), bool):
        raise SaeLoadError(f"{cfg_file}: apply_b_dec_to_input must be true or false")
    shapes = _tensor_shapes(_file(directory, WEIGHTS_FILE))
    d_in, d_sae = shapes["W_enc"]
    for field, actual in (("d_in", d_in), ("d_sae", d_sae)):
        if field in cfg and cfg[field] != actual:
            raise SaeLoadError(
                f"{cfg_file}: {field}={cfg[field]!r} but {WEIGHTS_FILE} has W_enc of shape "
                f"{[d_in, d_sae]}"
            )
    cfg = {**cfg, "d_in": d_in, "d_sae": d_sae}
    with _LOCK:
        _CONFIGS[key] = cfg
    return dict(cfg)


def _tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = set(handle.keys())
            missing = [n for n in TENSORS if n not in names]
            if missing:
                raise SaeLoadError(
                    f"{weights}: missing tensor(s) {missing}; found {sorted(names)}. Expected "
                    f"the SAELens layout: {_EXPECTED}"
                )
            shapes = {n: tuple(handle.get_slice(n).get_shape()) for n in TENSORS}
    except SaeLoadError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise SaeLoadError(f"{weights}: cannot read safetensors file ({exc})") from None
    check_shapes(shapes, str(weights))
    return shapes


def load_sae(path: str | Path) -> SparseAutoencoder:
    """Load (once per path and file version) an SAE directory in the SAELens layout."""
    from safetensors.torch import load_file

    cfg = read_sae_config(path)
    directory = _directory(path)
    weights = _file(directory, WEIGHTS_FILE)
    key = ("path", str(weights), weights.stat().st_mtime_ns)
    with _LOCK:
        if key in _SAES:
            return _SAES[key]
    tensors = load_file(str(weights))
    for name in TENSORS:
        if not tensors[name].is_floating_point():
            raise SaeLoadError(f"{weights}: {name} has dtype {tensors[name].dtype}, not a float")
    sae = SparseAutoencoder(
        **{n: tensors[n] for n in TENSORS},
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        source=str(directory),
    )
    with _LOCK:
        _SAES[key] = sae
    return sae


def random_sae(n_latents: int, d_in: int, seed: int = 0) -> SparseAutoencoder:
    """A deterministic random SAE for tests and examples (float64, cached per arguments).

    Scaled so that roughly half the latents fire on unit-scale inputs, and with a non-zero
    ``b_dec`` so that every bias term of the identities is exercised.
    """
    key = ("random", n_latents, d_in, seed)
    with _LOCK:
        if key in _SAES:
            return _SAES[key]
    import torch

    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    sae = SparseAutoencoder(
        W_enc=randn(d_in, n_latents) / math.sqrt(d_in),
        b_enc=randn(n_latents) * 0.1,
        W_dec=randn(n_latents, d_in) / math.sqrt(n_latents),
        b_dec=randn(d_in) * 0.1,
        source=f"random_init(n_latents={n_latents}, d_in={d_in}, seed={seed})",
    )
    with _LOCK:
        _SAES[key] = sae
    return sae


def save_sae(sae: SparseAutoencoder, directory: str | Path, **cfg: Any) -> Path:
    """Write ``sae`` in the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {n: getattr(sae, n).detach().contiguous().cpu() for n in TENSORS}, str(out / WEIGHTS_FILE)
    )
    meta = {
        "architecture": "standard",
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        **cfg,
    }
    (out / CFG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def clear_cache() -> None:
    """Forget every loaded SAE and config (they reload on next use)."""
    with _LOCK:
        _CONFIGS.clear()
        _SAES.clear()
