"""Reading a finished sweep: ``load_sweep(DIR)`` and the questions researchers ask of it.

"Top examples of component X" (``top``), "stats of layer L" (``stats``), samples (uniform and
per quantile bin), and the words around any example (read from the shard that holds its prompt,
so the corpus itself is not needed).  ``format_examples`` is what ``scalarlens show`` prints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from ..exceptions import MissingActivationError, ModelInputError, StoreError
from ._stats import KEY_SENTINEL, SweepSettings, split_key
from ._storage import RESULTS, load_tensors, read_manifest, shard_path

STAT_FIELDS = (
    "count",
    "mean",
    "variance",
    "skewness",
    "kurtosis",
    "min",
    "max",
    "fraction_nonzero",
    "nonfinite",
    "hist",
    "quantile_boundaries",
)


@attrs.frozen
class SweepRecord:
    """One example of one component: where it is and its value.

    ``token`` is the (query) position; ``attended`` the key position for token-pair DSTs;
    ``context`` the component's values at ``window`` positions around ``token`` (top records
    of token DSTs only; NaN where unknown).
    """

    prompt: int
    token: int
    attended: int | None
    value: float
    context: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["context"] = [None if math.isnan(v) else v for v in self.context]
        return out


@attrs.frozen
class SweepResult:
    """A sweep directory, loaded.  ``run`` says what the ``sweep`` call that returned it did."""

    directory: Path
    manifest: dict[str, Any]
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor] = attrs.field(repr=False)
    run: Any = None

    @property
    def settings(self) -> SweepSettings:
        config = self.manifest["config"]
        return SweepSettings(
            config["top_k"],
            config["samples"],
            config["bin_samples"],
            config["window_before"],
            config["window_after"],
        )

    def keys(self) -> list[str]:
        """Every ``"{dst}/{pass}/{layer}"`` the sweep holds."""
        return list(self.meta["components"])

    def _prefix(self, dst: str, layer: int | None, pass_type: str) -> str:
        prefix = f"{dst}/{pass_type}/{'none' if layer is None else layer}"
        if prefix not in self.meta["components"]:
            held = ", ".join(self.keys())
            raise MissingActivationError(
                f"sweep {self.directory} has no {dst} layer {layer} ({pass_type}); it holds: {held}"
            )
        return prefix

    def component_shape(self, dst: str, layer: int | None, pass_type: str = "forward") -> list[int]:
        shape: list[int] = self.meta["components"][self._prefix(dst, layer, pass_type)]["shape"]
        return shape

    def _flat(self, prefix: str, index: int | Sequence[int]) -> int:
        shape = self.meta["components"][prefix]["shape"]
        items = [index] if isinstance(index, int) else list(index)
        if len(items) == 1 and len(shape) > 1:
            total = math.prod(shape)
            flat = items[0]
        else:
            if len(items) != len(shape) or any(
                not 0 <= i < n for i, n in zip(items, shape, strict=True)
            ):
                raise ModelInputError(
                    f"component index {index!r} does not fit the component grid {shape} "
                    f"({', '.join(self.meta['components'][prefix]['axes'])})"
                )
            total, flat = math.prod(shape), 0
            for i, n in zip(items, shape, strict=True):
                flat = flat * n + i
        if not 0 <= flat < total:
            raise ModelInputError(
                f"component index {index!r} is out of range: {prefix} has {total} components "
                f"(valid: 0..{total - 1})"
            )
        return flat

    def stats(
        self, dst: str, layer: int | None = None, pass_type: str = "forward"
    ) -> dict[str, torch.Tensor]:
        """Per-component statistics of one layer (``hist`` is components × bins)."""
        prefix = self._prefix(dst, layer, pass_type)
        return {name: self.tensors[f"{prefix}/{name}"] for name in STAT_FIELDS}

    def _records(
        self, keys: torch.Tensor, values: torch.Tensor, pairs: bool, context: Any = None
    ) -> list[SweepRecord]:
        out = []
        for i in range(keys.numel()):
            if int(keys[i]) == KEY_SENTINEL:
                continue
            prompt, token, attended = (int(v) for v in split_key(keys[i]))
            around = () if context is None else tuple(float(v) for v in context[i])
            out.append(
                SweepRecord(prompt, token, attended if pairs else None, float(values[i]), around)
            )
        return out

    def top(
        self, dst: str, layer: int | None, index: int | Sequence[int], pass_type: str = "forward"
    ) -> list[SweepRecord]:
        """The largest values of one component, largest first (ties: earlier example first)."""
        prefix = self._prefix(dst, layer, pass_type)
        c = self._flat(prefix, index)
        t = self.tensors
        return self._records(
            t[f"{prefix}/top_key"][c],
            t[f"{prefix}/top_value"][c],
            self._pairs(prefix),
            t[f"{prefix}/top_context"][c],
        )

    def samples(
        self, dst: str, layer: int | None, index: int | Sequence[int], pass_type: str = "forward"
    ) -> list[SweepRecord]:
        """A uniform random sample of the component's examples (hash-chosen, so reproducible)."""
        prefix = self._prefix(dst, layer, pass_type)
        c = self._flat(prefix, index)
        t = self.tensors
        return self._records(
            t[f"{prefix}/sample_key"], t[f"{prefix}/sample_value"][:, c], self._pairs(prefix)
        )

    def quantile_samples(
        self, dst: str, layer: int | None, index: int | Sequence[int], pass_type: str = "forward"
    ) -> list[list[SweepRecord]]:
        """Samples per quantile bin: below the first quantile, between each pair, above the
        last (``meta["quantiles"]``; boundaries in ``stats(...)["quantile_boundaries"]``)."""
        prefix = self._prefix(dst, layer, pass_type)
        c = self._flat(prefix, index)
        keys, values = (
            self.tensors[f"{prefix}/quantile_key"][c],
            self.tensors[f"{prefix}/quantile_value"][c],
        )
        return [self._records(k, v, self._pairs(prefix)) for k, v in zip(keys, values, strict=True)]

    def _pairs(self, prefix: str) -> bool:
        return bool(self.meta["components"][prefix]["example"] == "token_pair")

    def tokens(self, prompt: int) -> tuple[int, ...]:
        """A prompt's token ids, read from the shard that swept it."""
        for index, (first, n) in enumerate(self.meta["shards"]):
            if first <= prompt < first + n:
                _, tensors = load_tensors(shard_path(self.directory, index))
                start, end = (
                    int(v) for v in tensors["offsets"][prompt - first : prompt - first + 2]
                )
                return tuple(int(t) for t in tensors["tokens"][start:end])
        n_prompts = self.manifest["corpus"]["n_prompts"]
        raise ModelInputError(f"prompt {prompt} is not in this sweep (0..{n_prompts - 1})")

    def window(self, record: SweepRecord) -> tuple[int, list[int]]:
        """``(first position, token ids)`` of the settings' window around ``record.token``."""
        ids = self.tokens(record.prompt)
        s = self.settings
        first = max(0, record.token - s.window_before)
        return first, list(ids[first : record.token + s.window_after + 1])


def vocab_words(result: SweepResult, registry: Any = None) -> list[str] | None:
    """The model's words for display: read from a bundled model's vocab (no torch), else from
    the tokenizer of the model the manifest names, if it loads; ``None`` shows token ids."""
    from .._bundled import BUNDLED_MODELS, bundled_vocab

    spec = str(result.manifest.get("model_spec"))
    if spec in BUNDLED_MODELS:
        return list(bundled_vocab(spec))
    try:
        from ..models._loading import load_model

        tokenizer = getattr(load_model(spec, registry), "tokenizer", None)
    except Exception:  # display only: ids are a fine fallback
        return None
    vocab = getattr(tokenizer, "vocab", None)
    return list(vocab) if vocab is not None else None


def load_sweep(directory: str | Path) -> SweepResult:
    """A finished sweep directory (``manifest.json`` + ``results.safetensors``)."""
    path = Path(directory)
    manifest = read_manifest(path)
    if manifest is None:
        raise StoreError(f"{path}: no sweep here (no manifest.json); run scalarlens sweep first")
    if not (path / RESULTS).is_file():
        raise StoreError(
            f"{path}: the sweep did not finish (no {RESULTS}); rerun the same sweep command to "
            "resume it"
        )
    meta, tensors = load_tensors(path / RESULTS)
    return SweepResult(path, manifest, meta, tensors)


def format_examples(
    result: SweepResult,
    records: Sequence[SweepRecord],
    words: Sequence[str] | None,
) -> list[str]:
    """One line per record: value, where, and the token window with the example's token in
    ``[[ ]]`` (and a token pair's key in ``<< >>``)."""
    lines = []
    for rank, record in enumerate(records, 1):
        first, ids = result.window(record)
        shown = []
        for offset, token in enumerate(ids):
            position = first + offset
            word = words[token] if words is not None and 0 <= token < len(words) else str(token)
            if position == record.token:
                word = f"[[{word}]]"
            elif position == record.attended:
                word = f"<<{word}>>"
            shown.append(word)
        where = f"prompt {record.prompt} token {record.token}"
        if record.attended is not None:
            where += f" → {record.attended}"
            if record.attended < first:
                prompt_ids = result.tokens(record.prompt)
                token = prompt_ids[record.attended]
                key = words[token] if words is not None else str(token)
                where += f" ({key})"
        lines.append(f"{rank:>3}. {record.value:+.4f}  {where}:  {' '.join(shown)}")
    return lines
