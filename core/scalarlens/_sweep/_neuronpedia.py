"""Export a sweep in Neuronpedia's bulk layout, where researchers already browse features.

::

    OUT/features/batch-0.jsonl.gz      one record per component: modelId, layer, index,
                                       maxActApprox, frac_nonzero, the histogram
    OUT/activations/batch-0.jsonl.gz   one record per example: modelId, layer, index, tokens,
                                       values, maxValue, maxValueTokenIndex, minValue, and
                                       binMin/binMax for quantile samples

``layer`` is Neuronpedia's source id, ``"{layer}-{dst}"`` (``"1-mlp.post_act"``); ``index`` the
flat component index.  ``values`` are the component's values over the token window where the
sweep kept them (top records of token DSTs), otherwise the example's value at its token and 0
elsewhere.  Files are gzip with a zero timestamp, so the same sweep exports the same bytes.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ._results import SweepRecord, SweepResult, load_sweep
from ._stats import bin_edges

FEATURES_PER_BATCH = 1024


def _finite(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else value


def export_neuronpedia(
    directory: str | Path, out: str | Path, *, model_id: str | None = None
) -> list[Path]:
    """Write ``out/features`` and ``out/activations`` for every component; returns the files."""
    from .._output_files import atomic_write

    result = load_sweep(directory)
    model = model_id or str(result.manifest["model"].get("name", "model"))
    words = _words(result)
    root = Path(out)
    (root / "features").mkdir(parents=True, exist_ok=True)
    (root / "activations").mkdir(parents=True, exist_ok=True)
    written = []
    features: list[dict[str, Any]] = []
    activations: list[dict[str, Any]] = []
    batch = 0

    def flush() -> None:
        nonlocal batch, features, activations
        for kind, records in (("features", features), ("activations", activations)):
            data = _gzip_lines(records)
            path = root / kind / f"batch-{batch}.jsonl.gz"
            written.append(atomic_write(path, _writer(data), str(path)))
        batch, features, activations = batch + 1, [], []

    for feature, examples in _components(result, model, words):
        features.append(feature)
        activations.extend(examples)
        if len(features) == FEATURES_PER_BATCH:
            flush()
    if features:
        flush()
    return written


def _words(result: SweepResult) -> list[str] | None:
    from ._results import vocab_words

    return vocab_words(result)


def _components(
    result: SweepResult, model: str, words: list[str] | None
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    edges = bin_edges()
    centres = [
        (lo + hi) / 2
        if math.isfinite(lo) and math.isfinite(hi)
        else (hi if math.isfinite(hi) else lo)
        for lo, hi in itertools.pairwise(edges)
    ]
    for info in result.meta["components"].values():
        dst, pass_type, layer = info["dst"], info["pass"], info["layer"]
        source = f"{'none' if layer is None else layer}-{dst}" + (
            "" if pass_type == "forward" else f"-{pass_type}"
        )
        stats = result.stats(dst, layer, pass_type)
        n = math.prod(info["shape"])
        for c in range(n):
            heights = stats["hist"][c].tolist()
            feature = {
                "modelId": model,
                "layer": source,
                "index": str(c),
                "maxActApprox": _finite(float(stats["max"][c])),
                "frac_nonzero": _finite(float(stats["fraction_nonzero"][c])),
                "freq_hist_data_bar_heights": [h for h in heights if h],
                "freq_hist_data_bar_values": [
                    v for v, h in zip(centres, heights, strict=True) if h
                ],
            }
            examples = [
                _activation(result, model, source, c, r, words, None)
                for r in result.top(dst, layer, c, pass_type)
            ]
            boundaries = [float(b) for b in stats["quantile_boundaries"][c]]
            lows = [float("-inf"), *boundaries]
            highs = [*boundaries, float("inf")]
            for q, records in enumerate(result.quantile_samples(dst, layer, c, pass_type)):
                bin_range = (lows[q], highs[q])
                examples += [
                    _activation(result, model, source, c, r, words, bin_range) for r in records
                ]
            yield feature, examples


def _activation(
    result: SweepResult,
    model: str,
    source: str,
    index: int,
    record: SweepRecord,
    words: list[str] | None,
    bin_range: tuple[float, float] | None,
) -> dict[str, Any]:
    first, ids = result.window(record)
    at = record.token - first
    if record.context:
        offset = result.settings.window_before - at  # the window is cut at the prompt start
        values = [record.context[offset + i] for i in range(len(ids))]
        values = [0.0 if math.isnan(v) else v for v in values]
    else:
        values = [record.value if i == at else 0.0 for i in range(len(ids))]
    out: dict[str, Any] = {
        "modelId": model,
        "layer": source,
        "index": str(index),
        "tokens": [words[t] if words else str(t) for t in ids],
        "values": values,
        "maxValue": max(values),
        "maxValueTokenIndex": values.index(max(values)),
        "minValue": min(values),
        "dataIndex": record.prompt,
    }
    if bin_range is not None:
        out["binMin"], out["binMax"] = (_finite(b) for b in bin_range)
    return out


def _writer(data: bytes) -> Callable[[Path], int]:
    return lambda path: path.write_bytes(data)


def _gzip_lines(records: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as fh:
        for record in records:
            fh.write((json.dumps(record, sort_keys=True) + "\n").encode())
    return buffer.getvalue()
