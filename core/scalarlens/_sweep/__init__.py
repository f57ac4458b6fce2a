"""Corpus sweeps: each component's top examples, samples and statistics over a corpus.

One module per idea: ``_corpus`` (reading and hashing the corpus), ``_stats`` (mergeable
statistics), ``_shard`` (a model turning prompts into statistics), ``_storage`` (the directory
and its atomic files), ``_local`` and ``_ray`` (engines, and the final merge), ``_api``
(``sweep``), ``_results`` (``load_sweep``, ``show``), ``_neuronpedia`` (export).
"""

from __future__ import annotations

from ._api import RunInfo, sweep
from ._corpus import Corpus, synthetic_corpus
from ._neuronpedia import export_neuronpedia
from ._results import SweepRecord, SweepResult, load_sweep

__all__ = [
    "Corpus",
    "RunInfo",
    "SweepRecord",
    "SweepResult",
    "export_neuronpedia",
    "load_sweep",
    "sweep",
    "synthetic_corpus",
]
