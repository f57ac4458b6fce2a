"""Prompts from the command line and from prompts files, checked before any model work.

Each prompt becomes a ``Job`` that remembers where it came from (``--prompt``,
``prompts.jsonl:4``), so an error found later — an unknown word, a target equal to its
distractor — still names the file and line to fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from .exceptions import ConfigError, ModelInputError, ScalarLensError

Token = str | int
_RECORD_FIELDS = ("prompt", "tokens", "target", "distractor", "baseline", "baseline_tokens")


@attrs.frozen
class Job:
    """One prompt to derive: text or token ids, an optional objective, and its origin."""

    prompt: str | tuple[int, ...]
    where: str
    target: Token | None = None
    distractor: Token | None = None
    baseline: str | tuple[int, ...] | None = None


def located(exc: ScalarLensError, where: str) -> ScalarLensError:
    """``exc`` with ``where: `` in front of its message, same class so callers still catch it.

    Rebuilding the exception would not work for classes with their own ``__init__``
    (``UnknownDstError(name, suggestions)``), so the message argument is replaced in place.
    """
    if not str(exc).startswith(f"{where}: "):
        exc.args = (f"{where}: {exc}",)
    return exc


def check_top_k(k: object, what: str = "topk: k") -> int:
    """``k`` for ``topk``/``--top``: a positive integer (shared so both fail the same way)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(
            f"{what}: expected a positive integer (how many records to show), got {k!r}"
        )
    return k


def parse_token_ids(text: str, flag: str = "--tokens") -> tuple[int, ...]:
    """``"1, 2 3"`` → ``(1, 2, 3)``; anything else names the offending item."""
    items = text.replace(",", " ").split()
    if not items:
        raise ModelInputError(f"{flag}: expected token ids such as '3 14 15', got nothing")
    ids = []
    for position, item in enumerate(items):
        try:
            ids.append(int(item))
        except ValueError:
            raise ModelInputError(
                f"{flag}: item {position} is {item!r}, expected an integer token id; separate "
                "ids with spaces or commas, e.g. '3 14 15' (use --prompt for words)"
            ) from None
    return tuple(ids)


def read_prompts_file(
    path: str | Path,
    target: Token | None = None,
    distractor: Token | None = None,
    baseline: str | None = None,
) -> list[Job]:
    """One job per non-empty line: plain text, or a JSON object with ``prompt`` or ``tokens``
    (and optionally ``baseline`` text or ``baseline_tokens`` ids, the corrupted prompt).

    ``target``/``distractor``/``baseline`` are defaults that a record's own fields override.
    The file is decoded line by line so a bad byte is reported with its line number.
    """
    name = str(path)
    data = _read_bytes(Path(path))
    jobs = []
    for number, raw in enumerate(data.splitlines(), 1):
        where = f"{name}:{number}"
        line = _decode(raw, where, first=number == 1).strip()
        if not line:
            continue
        if line.startswith("{"):
            jobs.append(_record(line, where, Job("", where, target, distractor, baseline)))
        else:
            jobs.append(Job(line, where, target, distractor, baseline))
    if not jobs:
        raise ModelInputError(
            f"{name}: holds no prompts; write one prompt per line, or JSON records such as "
            '{"prompt": "the cat sat", "target": "mat", "distractor": "cat"}'
        )
    return jobs


def _read_bytes(path: Path) -> bytes:
    if path.is_dir():
        raise ModelInputError(f"prompts file {path} is a directory; name a file of prompts")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelInputError(
            f"prompts file {path}: cannot read it ({exc.strerror}); check the path"
        ) from None


def _decode(raw: bytes, where: str, *, first: bool) -> str:
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        raise ModelInputError(
            f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
            "save the prompts file as UTF-8"
        ) from None


def _record(line: str, where: str, defaults: Job) -> Job:
    """A JSON record line → ``Job``, each field type-checked (``defaults`` from the flags)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ModelInputError(f"{where}: bad JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ModelInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(_RECORD_FIELDS))
    if unknown:
        raise ModelInputError(
            f"{where}: unknown field(s) {unknown}; valid fields: {', '.join(_RECORD_FIELDS)}"
        )
    if ("prompt" in record) == ("tokens" in record):
        raise ModelInputError(
            f"{where}: a JSON record needs exactly one of 'prompt' (text) or 'tokens' "
            '(a list of ids), e.g. {"prompt": "the cat sat"}'
        )
    prompt = _text(record["prompt"], where) if "prompt" in record else _ids(record["tokens"], where)
    if "baseline" in record and "baseline_tokens" in record:
        raise ModelInputError(
            f"{where}: give at most one of 'baseline' (text) or 'baseline_tokens' (ids)"
        )
    baseline = defaults.baseline
    if "baseline" in record:
        baseline = _text(record["baseline"], where, "baseline")
    elif "baseline_tokens" in record:
        baseline = _ids(record["baseline_tokens"], where, "baseline_tokens")
    return Job(
        prompt,
        where,
        _token(record.get("target", defaults.target), "target", where),
        _token(record.get("distractor", defaults.distractor), "distractor", where),
        baseline,
    )


def _text(value: Any, where: str, field: str = "prompt") -> str:
    if not isinstance(value, str):
        raise ModelInputError(
            f"{where}: field {field!r}: expected a string, got {type(value).__name__} {value!r}"
        )
    return value


def _ids(value: Any, where: str, field: str = "tokens") -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(_is_int(v) for v in value):
        raise ModelInputError(
            f"{where}: field {field!r}: expected a non-empty list of integer ids, got {value!r}"
        )
    return tuple(value)


def coerce_token(value: Token | None) -> Token | None:
    """Targets written as digits are token ids; anything else is a word."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


def _token(value: Any, field: str, where: str) -> Token | None:
    if value is None or _is_int(value) or isinstance(value, str):
        return coerce_token(value)
    raise ModelInputError(f"{where}: field {field!r}: expected a word or a token id, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
