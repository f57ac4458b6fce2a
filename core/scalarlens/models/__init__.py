"""Model adapters and loaders: GPT-2-architecture checkpoints and the bundled toy models.

``load_gpt2_checkpoint`` reads any Hugging Face GPT-2 directory (safetensors only);
``load_bundled_model`` loads a toy model shipped inside the package (no downloads), e.g.
``tiny-induction``, a 2-layer model with a previous-token head and an induction head.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..exceptions import CheckpointError
from ._adapter import GPT2Adapter
from ._checkpoint import load_gpt2_model, save_gpt2_checkpoint
from ._gpt2 import GPT2Config, GPT2Model
from ._hooked import HookedAdapter, HookFn
from ._loading import read_model_type
from ._tokenizer import WordTokenizer

__all__ = [
    "BUNDLED_MODELS",
    "GPT2Adapter",
    "GPT2Config",
    "GPT2Model",
    "HookFn",
    "HookedAdapter",
    "WordTokenizer",
    "load_bundled_model",
    "load_gpt2_checkpoint",
    "read_model_type",
    "save_gpt2_checkpoint",
]

from .._bundled import BUNDLED_MODELS

_HERE = Path(__file__).resolve().parent


def _word_tokenizer_for(directory: Path) -> WordTokenizer | None:
    """A ``WordTokenizer`` when the directory has a word-level ``vocab.json``.

    A BPE checkpoint (real GPT-2) also has ``vocab.json`` but always with ``merges.txt``; we
    leave those alone rather than pretend to tokenize them.
    """
    vocab = directory / "vocab.json"
    if not vocab.is_file() or (directory / "merges.txt").exists():
        return None
    return WordTokenizer.from_file(vocab)


def load_gpt2_checkpoint(
    path: str | Path, *, dtype: torch.dtype = torch.float32, name: str | None = None
) -> GPT2Adapter:
    """Load a HF GPT-2 directory (``config.json`` + ``model.safetensors``) as an adapter.

    ``name`` defaults to the directory name.  A word-level ``vocab.json`` next to the weights
    becomes ``adapter.tokenizer``; otherwise ``adapter.tokenizer`` is ``None``.
    """
    return _load(Path(path), dtype=dtype, name=name, source=None)


def _load(
    directory: Path, *, dtype: torch.dtype, name: str | None, source: str | None
) -> GPT2Adapter:
    model = load_gpt2_model(directory, dtype=dtype)
    if directory.is_file():
        directory = directory.parent
    return GPT2Adapter(
        model,
        name=name or directory.name,
        tokenizer=_word_tokenizer_for(directory),
        source=source or str(directory),
    )


def load_bundled_model(
    name: str = "tiny-induction", *, dtype: torch.dtype = torch.float32
) -> GPT2Adapter:
    """Load a model shipped with ScalarLens; never touches the network."""
    if name not in BUNDLED_MODELS:
        raise CheckpointError(
            f"unknown bundled model {name!r}; available: {', '.join(BUNDLED_MODELS)}"
        )
    directory = _HERE / name.replace("-", "_")
    return _load(directory, dtype=dtype, name=name, source=f"bundled:{name}")
