"""A whitespace word tokenizer over a fixed vocabulary (the bundled toy models' tokenizer).

Toy models have a few hundred words, so one word = one token keeps attributions readable
(every token axis label is a real word) and needs no external tokenizer files or downloads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..exceptions import TokenizerError

__all__ = ["WordTokenizer"]

_VOCAB_HINT = (
    "See the vocabulary with `scalarlens vocab` or, in Python, "
    "`scalarlens.models.load_bundled_model('tiny-induction').tokenizer.vocab`."
)


class WordTokenizer:
    """Maps whitespace-separated words to ids ``0..len(vocab)-1`` and back (case-sensitive)."""

    def __init__(self, vocab: Sequence[str]) -> None:
        words = list(vocab)
        if not words:
            raise TokenizerError("a WordTokenizer needs at least one word")
        bad = [w for w in words if not w or any(c.isspace() for c in w)]
        if bad:
            raise TokenizerError(f"vocabulary words must be non-empty and contain no spaces: {bad}")
        index: dict[str, int] = {}
        dupes = []
        for i, word in enumerate(words):
            if word in index:
                dupes.append(word)
            index[word] = i
        if dupes:
            raise TokenizerError(f"duplicate vocabulary words: {sorted(set(dupes))}")
        self._words = tuple(words)
        self._index = index

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, int]) -> WordTokenizer:
        """From a HF-style ``{word: id}`` mapping whose ids are exactly ``0..n-1``."""
        ids = sorted(mapping.values())
        if ids != list(range(len(ids))):
            raise TokenizerError("vocabulary ids must be exactly 0..n-1 with no gaps or repeats")
        by_id = {i: w for w, i in mapping.items()}
        return cls([by_id[i] for i in range(len(ids))])

    @classmethod
    def from_file(cls, path: str | Path) -> WordTokenizer:
        """Read a ``vocab.json`` holding either ``{word: id}`` or a list of words in id order."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"cannot read vocabulary file {str(path)!r}: {e}") from e
        if isinstance(data, dict):
            bad = {k: v for k, v in data.items() if isinstance(v, bool) or not isinstance(v, int)}
            if bad:
                shown = dict(list(bad.items())[:3])
                raise TokenizerError(f"{path}: every word must map to an integer id, got {shown}")
            return cls.from_mapping(data)
        if isinstance(data, list):
            return cls([str(w) for w in data])
        raise TokenizerError(f"{path}: expected a JSON object {{word: id}} or a list of words")

    def save(self, path: str | Path) -> None:
        """Write ``{word: id}`` JSON (the HF ``vocab.json`` shape)."""
        Path(path).write_text(json.dumps(self.token_to_id, indent=1) + "\n")

    @property
    def vocab(self) -> tuple[str, ...]:
        """All words, in id order (``vocab[i]`` is the word for id ``i``)."""
        return self._words

    @property
    def token_to_id(self) -> dict[str, int]:
        return dict(self._index)

    def __len__(self) -> int:
        return len(self._words)

    def encode(self, text: str) -> list[int]:
        """Split on whitespace and look each word up; every unknown word is reported at once."""
        words = text.split()
        if not words:
            raise TokenizerError("cannot tokenize an empty prompt; give at least one word")
        unknown = [w for w in words if w not in self._index]
        if unknown:
            distinct = list(dict.fromkeys(unknown))
            msg = f"unknown word(s) not in the model's vocabulary: {distinct}."
            lowered = [w for w in distinct if w.lower() in self._index]
            if lowered:
                msg += f" The vocabulary is case-sensitive; try lowercase for {lowered}."
            raise TokenizerError(f"{msg} {_VOCAB_HINT}")
        return [self._index[w] for w in words]

    def decode(self, ids: Iterable[int]) -> str:
        """Join the words for ``ids`` with single spaces."""
        return " ".join(self.decode_tokens(ids))

    def decode_tokens(self, ids: Iterable[int]) -> list[str]:
        """One word per id (useful for axis labels)."""
        out = []
        for i in ids:
            if not 0 <= int(i) < len(self._words):
                raise TokenizerError(
                    f"token id {int(i)} is out of range for a {len(self._words)}-word vocabulary "
                    f"(valid ids: 0..{len(self._words) - 1})"
                )
            out.append(self._words[int(i)])
        return out
