"""Loading a Hugging Face checkpoint directory as an ``HFAdapter`` — safetensors only, offline.

``load_hf_model("hf:DIR")`` (or a plain ``DIR`` whose ``config.json`` names a supported
``model_type``) reads ``config.json`` as JSON, checks the weight files (a single
``model.safetensors`` or a sharded ``model.safetensors.index.json`` whose shards all stay inside
the directory), refuses pickled ``.bin`` checkpoints, and loads with ``transformers`` with
``local_files_only=True`` and ``use_safetensors=True``: nothing is downloaded, nothing unpickled.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from scalarlens import CheckpointError, TokenizerError
from scalarlens.models import read_model_type

from ._adapter import HFAdapter
from ._families import FAMILIES, family_for

__all__ = ["HFTokenizer", "load_hf_model"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_GUIDE = "https://scalarlens.readthedocs.io/en/latest/plugins/model-adapters/"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class HFTokenizer:
    """A ``tokenizers``/``transformers`` tokenizer in the shape ScalarLens expects.

    ``encode`` (prompts) adds the model's special tokens (Llama's and Gemma's BOS);
    ``encode_word`` (targets, distractors) does not, and a word must be exactly one token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def __len__(self) -> int:
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True))

    def encode_word(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Any) -> str:
        return str(self._tok.decode(list(ids)))

    def decode_tokens(self, ids: Any) -> list[str]:
        return [self._tok.decode([int(i)]) for i in ids]

    @property
    def vocab(self) -> list[str]:
        by_id = sorted(self._tok.get_vocab().items(), key=lambda item: item[1])
        return [word for word, _ in by_id]


def _directory(spec: str) -> Path:
    text = spec.removeprefix("hf:")
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if not path.exists() and _HUB_ID.fullmatch(text):
        local = f"models/{text.split('/')[-1]}"
        raise CheckpointError(
            f"{text!r} is not a local directory. If it is a Hugging Face Hub id: ScalarLens never "
            f"downloads models; download it first (`hf download {text} --local-dir {local}`), "
            f"then pass that directory (hf:{local})"
        )
    raise CheckpointError(f"model directory {str(path)!r} does not exist (from spec {spec!r})")


def _check_weights(directory: Path) -> None:
    """A safetensors checkpoint whose shards stay inside ``directory``; else a clear error."""
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        return
    if index.is_file():
        for shard in _shards(index):
            _check_shard(directory, shard, index)
        return
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        # In place, so config.json and the tokenizer files stay next to the new weights.
        where = repr(str(directory))
        raise CheckpointError(
            f"{directory} has only pickled PyTorch weights (.bin/.pt), which ScalarLens never "
            "loads (unpickling runs arbitrary code). Convert it once, in an environment where you "
            "trust the file, to model.safetensors next to it: "
            '`python -c "from transformers import AutoModelForCausalLM as M; '
            f'M.from_pretrained({where}).save_pretrained({where})"`'
        )
    raise CheckpointError(f"{directory} has no model.safetensors or model.safetensors.index.json")


def _shards(index: Path) -> list[str]:
    """The shard file names of a ``model.safetensors.index.json``, checked field by field."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a valid shard index ({exc})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index}: expected a 'weight_map' of tensor names to shard file names"
        )
    return sorted(set(weight_map.values()))


def _check_shard(directory: Path, shard: str, index: Path) -> None:
    """A shard must be a file inside ``directory``.

    The index is downloaded data: ``../`` or an absolute name would read any file on disk.
    Symlinked *directories* are resolved and must stay inside; a symlinked shard *file* is
    allowed, because the Hugging Face cache stores each file of a snapshot as a link to a blob.
    """
    relative = Path(shard)
    parent = (directory / relative).parent.resolve()
    if (
        relative.is_absolute()
        or ".." in relative.parts
        or not parent.is_relative_to(directory.resolve())
    ):
        raise CheckpointError(
            f"{index}: shard {shard!r} lies outside the checkpoint directory {directory}; "
            "refusing to load. Shard names must be file names inside it"
        )
    if not (directory / relative).is_file():
        raise CheckpointError(f"{index}: shard {shard!r} is missing from {directory}")


def _family(directory: Path) -> Any:
    model_type = read_model_type(directory)
    if model_type is None:
        raise CheckpointError(f"{directory / 'config.json'}: missing, not JSON, or no model_type")
    family = family_for(model_type)
    if family is None:
        families = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
        raise CheckpointError(
            f"{directory}: model_type {model_type!r} is not supported by scalarlens-transformers "
            f"(supported: {families}). A family is one table row: see {ADAPTER_GUIDE}"
        )
    return family


# tokenizer_config.json classes that mean "exactly what tokenizer.json says".
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _tokenizer(directory: Path) -> HFTokenizer | None:
    if (
        not (directory / "tokenizer.json").is_file()
        and not (directory / "tokenizer_config.json").is_file()
    ):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        declared = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        declared = declared.get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        declared = None
    # AutoTokenizer swaps a generic class for the model type's own (a qwen2 config gets
    # Qwen2Tokenizer, which rebuilds a BPE pipeline and drops the saved tokenizer.json model):
    # load what the checkpoint declares.
    generic = declared in _GENERIC_TOKENIZERS and (directory / "tokenizer.json").is_file()
    loader = PreTrainedTokenizerFast if generic else AutoTokenizer
    try:
        with _quiet_transformers():
            return HFTokenizer(loader.from_pretrained(directory, local_files_only=True))
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        raise TokenizerError(f"{directory}: cannot load the tokenizer: {exc}") from None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or loading reports on stderr (problems become errors instead)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_hf_model(
    spec: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    name: str | None = None,
) -> HFAdapter:
    """Load ``hf:DIR`` (or ``DIR``) as an ``HFAdapter``; see the module docstring.

    ``dtype``: ``float32`` (default), ``bfloat16`` or ``float16``.  ``device``: ``cpu``,
    ``cuda``, ``mps``, or ``auto`` to spread layers over several GPUs (needs ``accelerate``).
    """
    directory = _directory(str(spec))
    family = _family(directory)
    _check_weights(directory)
    torch_dtype = DTYPES.get(dtype, None) if isinstance(dtype, str) else dtype
    if torch_dtype is None:
        raise CheckpointError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        with _quiet_transformers():
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                directory, use_safetensors=True, output_loading_info=True, **kwargs
            )
        model, info = loaded
    except Exception as exc:  # corrupt safetensors, shape mismatches…
        raise CheckpointError(f"{directory}: cannot load the checkpoint: {exc}") from None
    # transformers only warns about a missing tensor and initialises it at random.
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        shown = ", ".join(missing[:5]) + more
        raise CheckpointError(
            f"{directory}: the checkpoint lacks {len(missing)} weight(s) the {family.name} "
            f"model needs ({shown}); it is incomplete or of another architecture"
        )
    if device not in (None, "auto"):
        model.to(device)
    return HFAdapter(
        model,
        family,
        name=name or directory.name,
        tokenizer=_tokenizer(directory),
        source=f"hf:{directory}",
    )


def load_spec(spec: str) -> HFAdapter:
    """``hf:DIR`` or ``DIR``, optionally with ``?dtype=bfloat16&device=cuda`` (what the CLI's
    ``--model`` passes through, since a loader receives only the spec string)."""
    path, _, query = spec.partition("?")
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if not sep or key not in ("dtype", "device"):
            raise CheckpointError(
                f"model spec {spec!r}: unknown option {item!r}; use ?dtype=float32|bfloat16|"
                "float16 and/or &device=cpu|cuda|mps|auto"
            )
        options[key] = value
    return load_hf_model(path, dtype=options.get("dtype", "float32"), device=options.get("device"))
