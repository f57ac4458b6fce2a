"""Corpus input for sweeps: text lines, JSONL, a local Hugging Face dataset, or synthetic text.

A corpus is read as a *stream* of prompts, never held whole: the sweep reads it once to count
and hash it (so a resumed run can tell it is the same corpus) and once more to feed shards.
Every prompt keeps where it came from (``corpus.txt:12``) so an error names the line to fix.
Prompts longer than the context are truncated to their first ``context`` tokens with one
warning that counts them and names the first.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ..exceptions import ModelInputError, ScalarLensError, TruncationWarning

if TYPE_CHECKING:
    from .._model import ModelAdapter

Text = str | tuple[int, ...]
_JSON_TEXT_FIELDS = ("text", "prompt")
_JSON_TOKEN_FIELDS = ("tokens", "input_ids")


@attrs.frozen
class Prompt:
    """One corpus prompt as token ids, numbered in corpus order from 0."""

    id: int
    tokens: tuple[int, ...]
    where: str


@attrs.frozen
class Corpus:
    """A re-readable corpus: ``items()`` yields ``(text or token ids, where)`` each time.

    ``describe`` is what the manifest records as the source (the corpus *hash* is what a
    resumed run compares).
    """

    describe: str
    _items: Any = attrs.field(alias="items")

    def items(self) -> Iterator[tuple[Text, str]]:
        yield from self._items()


def as_corpus(corpus: Corpus | str | Path | Sequence[Text]) -> Corpus:
    """A file (``.jsonl``: JSON records; otherwise one prompt per line), a directory (a
    dataset saved with ``datasets``' ``save_to_disk``), or a list of prompts."""
    if isinstance(corpus, Corpus):
        return corpus
    if isinstance(corpus, (str, Path)):
        path = Path(corpus)
        if path.is_dir():
            return Corpus(f"datasets:{path}", lambda: _dataset_items(path))
        if not path.exists():
            raise ModelInputError(f"corpus {path}: no such file or directory; check the path")
        return Corpus(str(path), lambda: _file_items(path))
    prompts = list(corpus)
    return Corpus(
        f"list of {len(prompts)} prompts",
        lambda: (
            (p if isinstance(p, str) else tuple(p), f"prompt {i}") for i, p in enumerate(prompts)
        ),
    )


def _file_items(path: Path) -> Iterator[tuple[Text, str]]:
    jsonl = path.suffix == ".jsonl"
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ModelInputError(f"corpus {path}: cannot read it ({exc.strerror})") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            except UnicodeDecodeError as exc:
                raise ModelInputError(
                    f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                    f"{exc.start + 1}); save the corpus as UTF-8"
                ) from None
            if line:
                yield (_json_item(line, where) if jsonl else line), where


def _json_item(line: str, where: str) -> Text:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ModelInputError(f"{where}: bad JSON: {exc}") from None
    if isinstance(record, dict):
        for name in _JSON_TEXT_FIELDS:
            if isinstance(record.get(name), str):
                return str(record[name])
        for name in _JSON_TOKEN_FIELDS:
            value = record.get(name)
            if isinstance(value, list) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            ):
                return tuple(value)
    raise ModelInputError(
        f"{where}: expected a JSON object with a 'text' string or a 'tokens' list of ids, e.g. "
        '{"text": "the cat sat"}'
    )


def _dataset_items(path: Path) -> Iterator[tuple[Text, str]]:
    """Rows of a dataset saved by ``datasets`` (memory-mapped Arrow: read row by row)."""
    try:
        import datasets  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise ModelInputError(
            f"corpus {path} is a directory, read as a Hugging Face dataset, but `datasets` is "
            "not installed: pip install datasets (or give a .txt / .jsonl file)"
        ) from None
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ModelInputError(f"corpus {path}: a dataset dict without a 'train' split")
        data = data["train"]
    columns = set(data.column_names)
    for i, row in enumerate(data):
        where = f"{path}[{i}]"
        yield _json_item(json.dumps({k: row[k] for k in columns if k in _known()}), where), where


def _known() -> tuple[str, ...]:
    return (*_JSON_TEXT_FIELDS, *_JSON_TOKEN_FIELDS)


def tokenize(model: ModelAdapter, text: Text, where: str) -> tuple[int, ...]:
    """Text through the model's tokenizer, or ids checked against its vocabulary."""
    from .._inputs import located
    from .._prepare import prepare_tokens

    try:
        (ids,) = prepare_tokens(model, [text])
    except ScalarLensError as exc:
        raise located(exc, where) from None
    bad = [t for t in ids if not 0 <= t < model.dims.n_vocab]
    if bad:
        raise ModelInputError(
            f"{where}: token id {bad[0]} is outside the vocabulary of {model.name!r} "
            f"(valid: 0..{model.dims.n_vocab - 1})"
        )
    return tuple(ids)


def prompts(
    corpus: Corpus, model: ModelAdapter, context: int, *, warn: bool = False
) -> Iterator[Prompt]:
    """The corpus as numbered prompts of at most ``context`` tokens (empty ones skipped)."""
    truncated: list[tuple[str, int]] = []
    number = 0
    for text, where in corpus.items():
        ids = tokenize(model, text, where)
        if not ids:
            continue
        if len(ids) > context:
            truncated.append((where, len(ids)))
            ids = ids[:context]
        yield Prompt(number, ids, where)
        number += 1
    if warn and truncated:
        where, length = truncated[0]
        warnings.warn(
            f"{where}: {length} tokens, longer than the context ({context}); truncated to the "
            f"first {context} tokens ({len(truncated)} prompt(s) truncated in all)",
            TruncationWarning,
            stacklevel=3,
        )


@attrs.frozen
class CorpusSummary:
    """What a sweep knows of its corpus before running: size and content hash."""

    source: str
    n_prompts: int
    n_tokens: int
    sha256: str


def summarize(corpus: Corpus, model: ModelAdapter, context: int) -> CorpusSummary:
    """Count and hash the tokenized corpus (one streaming pass); empty corpora are refused."""
    digest = hashlib.sha256()
    n_prompts = n_tokens = 0
    for prompt in prompts(corpus, model, context, warn=True):
        digest.update(len(prompt.tokens).to_bytes(4, "little"))
        digest.update(b"".join(t.to_bytes(4, "little") for t in prompt.tokens))
        n_prompts += 1
        n_tokens += len(prompt.tokens)
    if n_prompts == 0:
        raise ModelInputError(
            f"corpus {corpus.describe} holds no prompts; give a file with one prompt per line "
            '(or JSONL records such as {"text": "the cat sat"})'
        )
    return CorpusSummary(corpus.describe, n_prompts, n_tokens, digest.hexdigest())


def shards(stream: Iterable[Prompt], size: int) -> Iterator[list[Prompt]]:
    """Consecutive groups of ``size`` prompts: shard ``i`` holds prompts ``i·size ..``."""
    group: list[Prompt] = []
    for prompt in stream:
        group.append(prompt)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def synthetic_corpus(
    n_prompts: int, *, words: Sequence[str] | None = None, length: int = 48, seed: int = 0
) -> Corpus:
    """Repeated word sequences for the bundled ``tiny-induction`` model: each prompt is
    ``R1 + A + R2 + A`` with distinct random words (``|A|`` in 4..12), the shape it was trained
    on, so its induction heads have something to find.  Deterministic in ``seed``."""
    if words is None:
        from .._bundled import bundled_vocab

        words = bundled_vocab("tiny-induction")
    vocab = list(words)

    def items() -> Iterator[tuple[Text, str]]:
        rng = random.Random(seed)
        for i in range(n_prompts):
            repeat = rng.randint(4, min(12, length // 2))
            body = rng.sample(vocab, length - repeat)
            start = rng.randint(0, len(body) - repeat)
            yield " ".join([*body, *body[start : start + repeat]]), f"synthetic[{i}]"

    return Corpus(f"synthetic:{n_prompts}x{length}:seed={seed}", items)
