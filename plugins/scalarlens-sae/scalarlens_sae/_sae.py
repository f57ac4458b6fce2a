"""Loading SAEs from local disk (nothing is ever downloaded), a cache, and saving.

Formats (detected from the directory's files):

* **SAELens** — ``cfg.json`` + ``sae_weights.safetensors`` (every architecture of
  :mod:`scalarlens_sae._arch`, SAELens' ``matryoshka_batchtopk`` as its base ``batchtopk``;
  ``transcoder`` / ``jumprelu_transcoder`` load as transcoders);
* **Gemma Scope** — ``params.npz`` (read with ``allow_pickle=False``: never unpickled) or
  ``params.safetensors`` with ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``: a
  JumpReLU SAE whose encoder reads ``x`` itself (``apply_b_dec_to_input`` false); an optional
  ``cfg.json`` beside it may add metadata.

The bias convention of every SAE: see :mod:`scalarlens_sae._arch`.  ``x`` is the *full*
activation at the SAE's location, biases included (``resid.delta_mlp`` contains ``b_out``,
``resid.delta_attn`` contains ``b_O``), so offline and online latents agree exactly.

Loading happens lazily at derive time and is cached per resolved path (and file modification
time), so a deriver holds only its options, never tensors.  Unsupported variants are refused
by name, with what is supported.
"""

from __future__ import annotations

import json
import math
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._arch import ARCHITECTURES, TENSORS, SparseAutoencoder, check_shapes
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
GEMMA_SCOPE_FILES = ("params.npz", "params.safetensors")
_EXPECTED = "W_enc (d_in×d_sae), b_enc (d_sae), W_dec (d_sae×d_in), b_dec (d_in)"

# cfg.json "architecture" → (base architecture, is a transcoder)
_ARCHITECTURE_ALIASES: dict[str, tuple[str, bool]] = {
    **{name: (name, False) for name in ARCHITECTURES},
    "matryoshka_batchtopk": ("batchtopk", False),
    "transcoder": ("standard", True),
    "jumprelu_transcoder": ("jumprelu", True),
}
SUPPORTED_ARCHITECTURES = tuple(sorted(_ARCHITECTURE_ALIASES))
_NORMALIZE = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
# cfg.json flags that change the maths in ways this plugin does not implement: refused when set
_REFUSED_FLAGS = {
    "finetuning_scaling_factor": "a fine-tuning scale on the latents",
    "rescale_acts_by_decoder_norm": "latents rescaled by decoder norms at inference",
    "hook_head_index": "an SAE on one attention head",
    "hook_head_index_out": "a transcoder writing one attention head",
}


def _directory(path: str | Path) -> Path:
    directory = Path(path).expanduser()
    if not directory.exists():
        raise SaeLoadError(
            f"SAE path {str(directory)!r} does not exist; options['sae']['path'] must be a "
            f"directory holding {CFG_FILE} and {WEIGHTS_FILE} (SAELens layout) or a Gemma Scope "
            f"{' / '.join(GEMMA_SCOPE_FILES)}"
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
            f"SAELens layout ({CFG_FILE} + {WEIGHTS_FILE}) or Gemma Scope's "
            f"{' / '.join(GEMMA_SCOPE_FILES)}"
        )
    return file


def sae_format(directory: Path) -> str:
    """``"saelens"`` or ``"gemma_scope"``, from the files present."""
    if (directory / WEIGHTS_FILE).is_file() or not any(
        (directory / name).is_file() for name in GEMMA_SCOPE_FILES
    ):
        return "saelens"
    return "gemma_scope"


def _weights_file(directory: Path) -> Path:
    if sae_format(directory) == "saelens":
        _file(directory, CFG_FILE)
        return _file(directory, WEIGHTS_FILE)
    return next(directory / n for n in GEMMA_SCOPE_FILES if (directory / n).is_file())


_LOCK = threading.Lock()
_CONFIGS: dict[tuple[str, int], dict[str, Any]] = {}
_SAES: dict[tuple[Any, ...], SparseAutoencoder] = {}


def _read_json(cfg_file: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SaeLoadError(f"{cfg_file}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise SaeLoadError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def read_sae_config(path: str | Path) -> dict[str, Any]:
    """The validated config of an SAE directory, with what the plugin derived from it.

    Always present: ``d_in``, ``d_sae``, ``d_out``, ``format`` (``saelens`` / ``gemma_scope``),
    ``base_architecture`` (one of :data:`~scalarlens_sae._arch.ARCHITECTURES`),
    ``transcoder`` (bool), ``k`` (or ``None``), ``run_time_normalize`` and
    ``scaling_factor``.  Cheap (JSON plus the weight file's header), so it is what deriver
    factories call at build time to size ``Dimension.AUTOENCODER_LATENTS``.
    """
    directory = _directory(path)
    weights = _weights_file(directory)
    key = (str(weights), weights.stat().st_mtime_ns)
    with _LOCK:
        if key in _CONFIGS:
            return dict(_CONFIGS[key])
    fmt = sae_format(directory)
    cfg_file = directory / CFG_FILE
    cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
    if fmt == "gemma_scope":
        cfg = _gemma_scope_config(cfg, weights)
    else:
        cfg = _saelens_config(cfg, cfg_file, weights)
    with _LOCK:
        _CONFIGS[key] = cfg
    return dict(cfg)


def _refuse(where: Path, field: str, value: Any, supported: Any) -> SaeLoadError:
    return SaeLoadError(
        f"{where}: {field}={value!r} is not supported by scalarlens-sae; supported: {supported}"
    )


def _saelens_config(cfg: dict[str, Any], cfg_file: Path, weights: Path) -> dict[str, Any]:
    architecture = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    if activation == "topk" and architecture == "standard":  # SAELens < 6 spelled TopK this way
        architecture = "topk"
    elif activation not in ("relu", None):
        field = "activation_fn_str" if "activation_fn_str" in cfg else "activation_fn"
        raise _refuse(cfg_file, field, activation, "'relu' (or 'topk' for a TopK SAE)")
    if architecture not in _ARCHITECTURE_ALIASES:
        raise _refuse(cfg_file, "architecture", architecture, list(SUPPORTED_ARCHITECTURES))
    base, transcoder = _ARCHITECTURE_ALIASES[architecture]
    normalize = cfg.get("normalize_activations", "none") or "none"
    if normalize not in _NORMALIZE:
        raise _refuse(cfg_file, "normalize_activations", normalize, list(_NORMALIZE))
    for field, what in _REFUSED_FLAGS.items():
        if cfg.get(field) not in (None, False):
            raise _refuse(cfg_file, field, cfg[field], f"absent/false ({what} is not implemented)")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise _refuse(cfg_file, "reshape_activations", cfg["reshape_activations"], "'none'")
    apply_b_dec = cfg.get("apply_b_dec_to_input", not transcoder)
    if not isinstance(apply_b_dec, bool):
        raise SaeLoadError(f"{cfg_file}: apply_b_dec_to_input must be true or false")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
    scaling = cfg.get("norm_scaling_factor", cfg.get("scaling_factor"))
    if scaling is not None and (isinstance(scaling, bool) or not isinstance(scaling, int | float)):
        raise SaeLoadError(f"{cfg_file}: norm_scaling_factor must be a number, got {scaling!r}")
    if scaling is not None and normalize != "expected_average_only_in":
        raise SaeLoadError(
            f"{cfg_file}: norm_scaling_factor is given but normalize_activations is "
            f"{normalize!r}; it belongs to 'expected_average_only_in'"
        )
    shapes = _tensor_shapes(weights, base, transcoder=transcoder)
    d_in, d_sae = shapes["W_enc"]
    d_out = shapes["W_dec"][1]
    if base == "jumprelu" and "threshold" not in shapes:
        raise SaeLoadError(
            f"{weights}: architecture {architecture!r} needs a per-latent 'threshold' tensor "
            f"(d_sae={d_sae}), but the file has none; found {sorted(shapes)}"
        )
    if base == "topk" or (base == "batchtopk" and "threshold" not in shapes):
        if k is None and "topk_threshold" not in cfg:
            raise SaeLoadError(f"{cfg_file}: a {architecture} SAE needs 'k' in {CFG_FILE}")
        if k is not None:
            _check_k_cfg(k, d_sae, base, cfg_file)
    if transcoder and apply_b_dec:
        raise SaeLoadError(
            f"{cfg_file}: apply_b_dec_to_input=true for a transcoder; its b_dec lives in the "
            "output space, so it cannot be subtracted from the input (set it false)"
        )
    if not transcoder and d_out != d_in:
        raise SaeLoadError(
            f"{weights}: W_dec has shape {[d_sae, d_out]}, expected {[d_sae, d_in]} "
            f"(an SAE reconstructs its input; architecture 'transcoder' writes elsewhere)"
        )
    for field, actual in (("d_in", d_in), ("d_sae", d_sae), ("d_out", d_out)):
        if field in cfg and cfg[field] != actual:
            raise SaeLoadError(
                f"{cfg_file}: {field}={cfg[field]!r} but {weights.name} has W_enc of shape "
                f"{[d_in, d_sae]} and W_dec of shape {[d_sae, d_out]}"
            )
    return {
        **cfg,
        "d_in": d_in,
        "d_sae": d_sae,
        "d_out": d_out,
        "format": "saelens",
        "base_architecture": base,
        "transcoder": transcoder,
        "apply_b_dec_to_input": apply_b_dec,
        "k": k,
        "run_time_normalize": normalize
        if normalize in ("constant_norm_rescale", "layer_norm")
        else "none",
        "scaling_factor": scaling,
    }


def _check_k_cfg(k: Any, d_sae: int, architecture: str, where: Path) -> None:
    from ._arch import _check_k

    _check_k(k, d_sae, architecture, str(where))


def _gemma_scope_config(cfg: dict[str, Any], weights: Path) -> dict[str, Any]:
    shapes = _tensor_shapes(weights, "jumprelu")
    d_in, d_sae = shapes["W_enc"]
    if "threshold" not in shapes:
        raise SaeLoadError(
            f"{weights}: a Gemma Scope (JumpReLU) SAE needs a per-latent 'threshold' array "
            f"(d_sae={d_sae}), but the file has none; found {sorted(shapes)}"
        )
    return {
        **cfg,
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_sae,
        "d_out": d_in,
        "format": "gemma_scope",
        "base_architecture": "jumprelu",
        "transcoder": False,
        "apply_b_dec_to_input": False,
        "k": None,
        "run_time_normalize": "none",
        "scaling_factor": None,
    }


def _required(base: str) -> tuple[str, ...]:
    if base == "gated":
        return ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")
    return TENSORS


def _npz_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Array shapes of an ``.npz`` from each member's header (no data read, nothing unpickled)."""
    import numpy as np

    shapes = {}
    with zipfile.ZipFile(weights) as archive:
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            with archive.open(member) as handle:
                version = np.lib.format.read_magic(handle)
                header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = header(handle)
                if dtype.hasobject:
                    raise SaeLoadError(
                        f"{weights}: array {member[:-4]!r} holds Python objects; refusing to "
                        "unpickle (Gemma Scope params.npz holds plain float arrays)"
                    )
                shapes[member[:-4]] = tuple(int(n) for n in shape)
    return shapes


def _tensor_shapes(
    weights: Path, base: str, *, transcoder: bool = False
) -> dict[str, tuple[int, ...]]:
    try:
        if weights.suffix == ".npz":
            found = _npz_shapes(weights)
        else:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as handle:
                found = {n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()}
    except SaeLoadError:
        raise
    except Exception as exc:  # safetensors / zipfile raise their own error types
        kind = "npz" if weights.suffix == ".npz" else "safetensors"
        raise SaeLoadError(f"{weights}: cannot read {kind} file ({exc})") from None
    required = _required(base)
    missing = [n for n in required if n not in found]
    if missing:
        raise SaeLoadError(
            f"{weights}: missing tensor(s) {missing}; found {sorted(found)}. Expected the "
            f"SAELens layout: {_EXPECTED}"
            + (" plus b_gate, r_mag, b_mag (d_sae) for gated SAEs" if base == "gated" else "")
        )
    shapes = {n: found[n] for n in required}
    if base == "gated":
        shapes["b_enc"] = shapes.pop("b_mag")
    if "threshold" in found:
        shapes["threshold"] = found["threshold"]
        if shapes["threshold"] == () and base == "batchtopk":
            shapes["threshold"] = (shapes["W_enc"][-1],) if len(shapes["W_enc"]) == 2 else ()
    check_shapes(shapes, str(weights), transcoder=transcoder)
    return shapes


def _load_tensors(weights: Path) -> dict[str, torch.Tensor]:
    import torch

    if weights.suffix == ".npz":
        import numpy as np

        with np.load(weights, allow_pickle=False) as arrays:
            return {name: torch.from_numpy(np.array(arrays[name])) for name in arrays.files}
    from safetensors.torch import load_file

    return load_file(str(weights))


def load_sae(path: str | Path) -> SparseAutoencoder:
    """Load (once per path and file version) an SAE directory (SAELens or Gemma Scope)."""
    cfg = read_sae_config(path)
    directory = _directory(path)
    weights = _weights_file(directory)
    key = ("path", str(weights), weights.stat().st_mtime_ns)
    with _LOCK:
        if key in _SAES:
            return _SAES[key]
    tensors = _load_tensors(weights)
    base = cfg["base_architecture"]
    for name in _required(base) + (("threshold",) if "threshold" in tensors else ()):
        if not tensors[name].is_floating_point():
            raise SaeLoadError(f"{weights}: {name} has dtype {tensors[name].dtype}, not a float")
    extra: dict[str, Any] = {}
    if base == "gated":
        extra = {"b_gate": tensors["b_gate"], "r_mag": tensors["r_mag"]}
        b_enc = tensors["b_mag"]
    else:
        b_enc = tensors["b_enc"]
    threshold = tensors.get("threshold")
    if threshold is None and base == "batchtopk" and "topk_threshold" in cfg:
        threshold = b_enc.new_full(b_enc.shape, float(cfg["topk_threshold"]))
    if threshold is not None and threshold.dim() == 0:
        threshold = threshold.expand(b_enc.shape).clone()
    if base in ("jumprelu", "batchtopk") and threshold is not None:
        extra["threshold"] = threshold
    w_enc, w_dec, b_dec = tensors["W_enc"], tensors["W_dec"], tensors["b_dec"]
    scaling = cfg["scaling_factor"]
    if scaling is not None:  # expected_average_only_in: fold the constant scale (exact)
        w_enc, w_dec, b_dec = w_enc * scaling, w_dec / scaling, b_dec / scaling
    sae = SparseAutoencoder(
        w_enc,
        b_enc,
        w_dec,
        b_dec,
        apply_b_dec_to_input=bool(cfg["apply_b_dec_to_input"]),
        source=str(directory),
        architecture=base,
        k=cfg["k"],
        normalize=cfg["run_time_normalize"],
        transcoder=bool(cfg["transcoder"]),
        **extra,
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
        {n: t.detach().contiguous().cpu() for n, t in sae.tensors().items()},
        str(out / WEIGHTS_FILE),
    )
    architecture = sae.architecture
    if sae.transcoder:
        architecture = "jumprelu_transcoder" if architecture == "jumprelu" else "transcoder"
    meta: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": sae.normalize,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
    }
    if sae.transcoder:
        meta["d_out"] = sae.d_out
    if sae.k is not None:
        meta["k"] = sae.k
    (out / CFG_FILE).write_text(json.dumps({**meta, **cfg}, indent=2, sort_keys=True) + "\n")
    return out


def clear_cache() -> None:
    """Forget every loaded SAE, transcoder and config (they reload on next use)."""
    from ._transcoder import clear_transcoder_cache

    with _LOCK:
        _CONFIGS.clear()
        _SAES.clear()
    clear_transcoder_cache()
