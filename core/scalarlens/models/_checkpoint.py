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
from safetensors import SafetensorError
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


_FIX_CONFIG = "fix config.json or re-convert the checkpoint"


def _positive_int(raw: dict[str, Any], key: str, source: str, default: Any = None) -> int:
    """``raw[key]`` as a positive integer, or an error naming the field and what it held.

    ``int()`` alone would accept ``True``, truncate ``12.5`` and crash on a list, and a zero
    head count only surfaces later as a division by zero.
    """
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(
            f"{source}: field {key!r}: expected a positive integer, got {value!r}; {_FIX_CONFIG}"
        )
    return value


def _check_options(raw: dict[str, Any], source: str) -> str:
    """Refuse GPT-2 variants whose forward maths we do not implement; return the activation."""
    unsupported = []
    if raw.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("scale_attn_by_inverse_layer_idx=true")
    if not raw.get("scale_attn_weights", True):
        unsupported.append("scale_attn_weights=false")
    act: Any = raw.get("activation_function", "gelu_new")
    if not isinstance(act, str) or act not in SUPPORTED_ACTIVATIONS:
        unsupported.append(f"activation_function={act!r} (supported: {SUPPORTED_ACTIVATIONS})")
    if unsupported:
        raise CheckpointError(f"{source}: unsupported GPT-2 option(s): {', '.join(unsupported)}")
    return str(act)


def _epsilon(raw: dict[str, Any], source: str) -> float:
    value = raw.get("layer_norm_epsilon", 1e-5)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise CheckpointError(
            f"{source}: field 'layer_norm_epsilon': expected a positive number, got {value!r}; "
            f"{_FIX_CONFIG}"
        )
    return float(value)


def read_gpt2_config(raw: Any, source: str) -> GPT2Config:
    """Validate a ``config.json`` body and keep only what changes the forward maths."""
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{source}: expected a JSON object of GPT-2 settings, got a JSON "
            f"{type(raw).__name__}; {_FIX_CONFIG}"
        )
    model_type = raw.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise CheckpointError(f"{source}: model_type is {model_type!r}, expected 'gpt2'")
    required = ("vocab_size", "n_embd", "n_layer", "n_head")
    missing = [k for k in required if k not in raw]
    if missing:
        raise CheckpointError(f"{source}: config.json lacks required field(s) {missing}")
    act = _check_options(raw, source)
    sizes = {k: _positive_int(raw, k, source) for k in required}
    n_embd, n_head = sizes["n_embd"], sizes["n_head"]
    if n_embd % n_head:
        raise CheckpointError(f"{source}: n_embd={n_embd} is not divisible by n_head={n_head}")
    tie = raw.get("tie_word_embeddings", True)
    if not isinstance(tie, bool):
        raise CheckpointError(
            f"{source}: field 'tie_word_embeddings': expected true or false, got {tie!r}; "
            f"{_FIX_CONFIG}"
        )
    n_ctx_key = "n_positions" if "n_positions" in raw or "n_ctx" not in raw else "n_ctx"
    return GPT2Config(
        vocab_size=sizes["vocab_size"],
        n_positions=_positive_int(raw, n_ctx_key, source, 1024),
        n_embd=n_embd,
        n_layer=sizes["n_layer"],
        n_head=n_head,
        n_inner=4 * n_embd if raw.get("n_inner") is None else _positive_int(raw, "n_inner", source),
        layer_norm_epsilon=_epsilon(raw, source),
        activation_function=act,
        tie_word_embeddings=tie,
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


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in ``path``; a truncated or foreign file is a ``CheckpointError``.

    safetensors raises its own ``SafetensorError`` (not an ``OSError``) for a short or garbled
    header, which would reach the user as a traceback naming no file.
    """
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it is probably truncated or "
            "corrupted: download or convert the checkpoint again"
        ) from exc


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index, checked field by field."""
    fix = "download the checkpoint again or rewrite the index"
    try:
        body = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index} is not valid JSON ({exc}); {fix}") from exc
    if not isinstance(body, dict) or "weight_map" not in body:
        raise CheckpointError(
            f"{index}: expected a JSON object with a 'weight_map' field "
            f"({{tensor name: shard file}}); {fix}"
        )
    weight_map = body["weight_map"]
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{index}: field 'weight_map': expected a mapping of tensor names to shard file "
            f"names, got {type(weight_map).__name__} {str(weight_map)[:80]}; {fix}"
        )
    return weight_map


def _shard_path(directory: Path, shard: str, index: Path) -> Path:
    """``directory/shard``, refused unless it names a file inside ``directory``.

    The index is downloaded data: without this check ``../`` or an absolute name would make us
    read any file on disk.  Symlinked *directories* are resolved and must stay inside too; a
    symlinked shard *file* is allowed, because the Hugging Face cache stores every file of a
    snapshot as a link into its blob store.
    """
    relative = Path(shard)
    root = directory.resolve()
    parent = (directory / relative).parent.resolve()
    if relative.is_absolute() or ".." in relative.parts or not parent.is_relative_to(root):
        raise CheckpointError(
            f"{index}: shard {shard!r} lies outside the checkpoint directory {directory}; shard "
            "names must be plain file names inside it. Refusing to load; get the checkpoint "
            "from a source you trust"
        )
    path = directory / relative
    if not path.is_file():
        raise CheckpointError(
            f"{index} names shard {shard!r}, which is not a file in {directory}; download the "
            "missing shard(s) again"
        )
    return path


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    single = directory / WEIGHTS_FILE
    if single.is_file():
        return _load_safetensors(single)
    index = directory / SHARDED_INDEX_FILE
    if index.is_file():
        weight_map = _read_index(index)
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_load_safetensors(_shard_path(directory, shard, index)))
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


def _read_config(directory: Path) -> GPT2Config:
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE} (a GPT2Config JSON is required)")
    try:
        raw_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{config_path} is not valid JSON ({e}); fix it or re-convert the checkpoint"
        ) from e
    return read_gpt2_config(raw_config, str(config_path))


def _drop_tied_head(found: dict[str, torch.Tensor], cfg: GPT2Config, directory: Path) -> None:
    """A tied checkpoint's ``lm_head.weight`` is redundant if it equals ``wte.weight``."""
    if cfg.tie_word_embeddings and "lm_head.weight" in found:
        lm_head = found.pop("lm_head.weight")
        wte = found.get("wte.weight")
        if wte is not None and (lm_head.shape != wte.shape or not torch.equal(lm_head, wte)):
            raise CheckpointError(
                f"{directory}: config says tie_word_embeddings=true but lm_head.weight differs "
                "from transformer.wte.weight; set tie_word_embeddings=false in config.json"
            )


def _check_tensors(found: dict[str, torch.Tensor], cfg: GPT2Config, directory: Path) -> None:
    """Every tensor the config implies, with its shape, and nothing else."""
    expected = _expected_shapes(cfg)
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


def load_gpt2_model(path: str | Path, *, dtype: torch.dtype = torch.float32) -> GPT2Model:
    """Load a HF GPT-2 directory into a ``GPT2Model`` (eval mode, parameters frozen).

    Accepts tensor names with or without the ``transformer.`` prefix and ignores the old
    ``attn.bias``/``attn.masked_bias`` mask buffers.  A tied checkpoint may also carry
    ``lm_head.weight``; it is accepted only if it equals ``wte.weight``.
    """
    directory = Path(path)
    if directory.is_file() and directory.suffix == ".safetensors":
        directory = directory.parent
    cfg = _read_config(directory)
    found = {
        key.removeprefix("transformer."): value
        for key, value in _read_tensors(directory).items()
        if not key.endswith(_IGNORED_SUFFIXES)
    }
    _drop_tied_head(found, cfg, directory)
    _check_tensors(found, cfg, directory)
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
