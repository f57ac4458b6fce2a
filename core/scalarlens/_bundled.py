"""The models shipped inside the package: their names and words (no torch needed for either).

The registry needs the names to treat a plugin loader registered under a bundled name as a
conflict, and ``scalarlens vocab`` needs only the words; neither may import the model code (and
torch) to get them.
"""

from __future__ import annotations

import json
from pathlib import Path

BUNDLED_MODELS: tuple[str, ...] = ("tiny-induction",)


def bundled_vocab(name: str) -> tuple[str, ...]:
    """The words of bundled model ``name`` in id order, read from its ``{word: id}`` vocab.json.

    The same words as ``load_bundled_model(name).tokenizer.vocab`` (a test checks it).
    """
    directory = Path(__file__).resolve().parent / "models" / name.replace("-", "_")
    mapping: dict[str, int] = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    return tuple(sorted(mapping, key=mapping.__getitem__))
