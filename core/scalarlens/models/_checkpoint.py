"""Read and write Hugging Face GPT-2 checkpoint directories (``config.json`` + safetensors).

Only safetensors are read: a pickle (``pytorch_model.bin``, ``*.pt``) can run arbitrary code on
load, and a research tool that opens checkpoints from the internet must not do that.  Every
problem found in a checkpoint is reported at once (missing, unexpected and mis-shaped tensors),
because fixing a conversion script one error per run is miserable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..exceptions import CheckpointError
from ._gpt2 import SUPPORTED_ACTIVATIONS, GPT2Config, GPT2Model

__all__ = ["load_gpt2_model", "read_gpt2_config", "save_gpt2_checkpoint"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SHARDED_INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# HF GPT-2 stores the causal mask as non-persistent-ish buffers in old checkpoints.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def read_gpt2_config(raw: dict[str, Any], source: str) -> GPT2Config:
    """Validate a ``config.json`` body and keep only what changes the forward maths."""
    model_type = raw.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise CheckpointError(f"{source}: model_type is {model_type!r}, expected 'gpt2'")
    required = ("vocab_size", "n_embd", "n_layer", "n_head")
    missing = [k for k in required if k not in raw]
    if missing:
        raise CheckpointError(f"{source}: config.json lacks required field(s) {missing}")
    unsupported = []
    if raw.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("scale_attn_by_inverse_layer_idx=true")
    if not raw.get("scale_attn_weights", True):
        unsupported.append("scale_attn_weights=false")
    act = raw.get("activation_function", "gelu_new")
    if act not in SUPPORTED_ACTIVATIONS:
        unsupported.append(f"activation_function={act!r} (supported: {SUPPORTED_ACTIVATIONS})")
    if unsupported:
        raise CheckpointError(f"{source}: unsupported GPT-2 option(s): {', '.join(unsupported)}")
    n_embd = int(raw["n_embd"])
    n_head = int(raw["n_head"])
    if n_embd % n_head:
        raise CheckpointError(f"{source}: n_embd={n_embd} is not divisible by n_head={n_head}")
    n_inner = raw.get("n_inner")
    return GPT2Config(
        vocab_size=int(raw["vocab_size"]),
        n_positions=int(raw.get("n_positions", raw.get("n_ctx", 1024))),
        n_embd=n_embd,
        n_layer=int(raw["n_layer"]),
        n_head=n_head,
        n_inner=int(n_inner) if n_inner is not None else 4 * n_embd,
        layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
        activation_function=act,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
    )


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory} holds {', '.join(pickles)} but no {WEIGHTS_FILE}; ScalarLens only "
            "loads safetensors because pickled checkpoints can execute code when loaded. "
            "Convert it once, in an environment you trust:\n"
            "    from transformers import GPT2LMHeadModel\n"
            f"    GPT2LMHeadModel.from_pretrained({str(directory)!r})"
            f".save_pretrained({str(directory)!r}, safe_serialization=True)"
        )
    raise CheckpointError(
        f"{directory} has no {WEIGHTS_FILE} (or {SHARDED_INDEX_FILE}); expected a Hugging Face "
        "GPT-2 directory with config.json and model.safetensors"
    )


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    single = directory / WEIGHTS_FILE
    if single.is_file():
        return load_file(str(single))
    index = directory / SHARDED_INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(load_file(str(directory / shard)))
        return tensors
    _refuse_pickles(directory)
    raise AssertionError("unreachable")


def _expected_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor our ``GPT2Model`` needs, keyed by its HF name (no ``transformer.``)."""
    with torch.device("meta"):
        model = GPT2Model(cfg)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def load_gpt2_model(path: str | Path, *, dtype: torch.dtype = torch.float32) -> GPT2Model:
    """Load a HF GPT-2 directory into a ``GPT2Model`` (eval mode, parameters frozen).

    Accepts tensor names with or without the ``transformer.`` prefix and ignores the old
    ``attn.bias``/``attn.masked_bias`` mask buffers.  A tied checkpoint may also carry
    ``lm_head.weight``; it is accepted only if it equals ``wte.weight``.
    """
    directory = Path(path)
    if directory.is_file() and directory.suffix == ".safetensors":
        directory = directory.parent
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE} (a GPT2Config JSON is required)")
    try:
        raw_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
    cfg = read_gpt2_config(raw_config, str(config_path))
    tensors = _read_tensors(directory)

    found: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key.removeprefix("transformer.")
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        found[name] = value

    expected = _expected_shapes(cfg)
    if cfg.tie_word_embeddings and "lm_head.weight" in found:
        lm_head = found.pop("lm_head.weight")
        wte = found.get("wte.weight")
        if wte is not None and (lm_head.shape != wte.shape or not torch.equal(lm_head, wte)):
            raise CheckpointError(
                f"{directory}: config says tie_word_embeddings=true but lm_head.weight differs "
                "from transformer.wte.weight; set tie_word_embeddings=false in config.json"
            )

    problems: list[str] = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append("missing tensor(s): " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensor(s): " + ", ".join(unexpected))
    for name in sorted(set(expected) & set(found)):
        actual = tuple(found[name].shape)
        if actual != expected[name]:
            problems.append(
                f"tensor {name!r} has shape {_fmt_shape(actual)}, expected "
                f"{_fmt_shape(expected[name])} (from config.json)"
            )
    if problems:
        raise CheckpointError(
            f"{directory}/{WEIGHTS_FILE} does not match its GPT-2 config "
            f"(n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, n_head={cfg.n_head}, "
            f"n_inner={cfg.n_inner}, vocab_size={cfg.vocab_size}, "
            f"n_positions={cfg.n_positions}):\n  " + "\n  ".join(problems)
        )

    # Built on the meta device and filled with ``assign=True`` so a large checkpoint is never
    # held twice (random init + loaded copy).
    with torch.device("meta"):
        model = GPT2Model(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in found.items()}, strict=True, assign=True)
    model.eval()
    model.requires_grad_(False)
    return model


def save_gpt2_checkpoint(
    model: GPT2Model, path: str | Path, *, extra_config: dict[str, Any] | None = None
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in HF GPT-2 layout (``transformer.`` keys).

    The result loads with ``load_gpt2_checkpoint`` and with
    ``transformers.GPT2LMHeadModel.from_pretrained``.  Tied models omit ``lm_head.weight``,
    as HF does.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf_dict()
    config.update(extra_config or {})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        key = name if name.startswith("lm_head.") else f"transformer.{name}"
        tensors[key] = value.detach().to(torch.float32).contiguous().clone()
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory
