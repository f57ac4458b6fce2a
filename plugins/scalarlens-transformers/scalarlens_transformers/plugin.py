"""Hook implementations of the ``transformers`` plugin (the contract: ``scalarlens.hookspecs``).

Loaders: ``hf:DIR`` for any supported family (GPT-2 included), and ``model_type:<type>`` keys,
through which ``scalarlens.load_model(DIR)`` routes a plain directory whose ``config.json``
names that ``model_type``.  GPT-2 directories keep going to the core's own GPT-2 adapter unless
asked for with ``hf:``.  A spec may end in ``?dtype=bfloat16&device=cuda``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from scalarlens import hookimpl

from ._families import FAMILIES

if TYPE_CHECKING:
    from scalarlens import ModelAdapter

SCALARLENS_PLUGIN_API = 1


def _load(spec: str) -> ModelAdapter:
    from ._loading import load_spec  # transformers is imported only when a model loads

    return load_spec(spec)


@hookimpl
def scalarlens_model_loaders() -> Mapping[str, Callable[[str], ModelAdapter]]:
    """``hf:`` plus one ``model_type:`` key per supported family except GPT-2."""
    keys = [f"model_type:{t}" for f in FAMILIES for t in f.model_types if t != "gpt2"]
    return {"hf:": _load, **dict.fromkeys(keys, _load)}
