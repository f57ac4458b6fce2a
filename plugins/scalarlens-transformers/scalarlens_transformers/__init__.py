"""``scalarlens-transformers``: Hugging Face ``transformers`` models as ScalarLens adapters.

Two lines::

    import scalarlens
    store = scalarlens.derive("hf:path/to/llama", "The capital of France is",
                              "attn.act_times_grad_per_token", target=" Paris", distractor=" Rome")

Families: Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, GPT-NeoX/Pythia and GPT-2; each is one
row of :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any

from ._families import FAMILIES, Family, family_for

__all__ = ["FAMILIES", "Family", "HFAdapter", "family_for", "load_hf_model"]


def __getattr__(name: str) -> Any:  # torch/transformers load only when an adapter is used
    if name == "HFAdapter":
        from ._adapter import HFAdapter

        return HFAdapter
    if name == "load_hf_model":
        from ._loading import load_hf_model

        return load_hf_model
    raise AttributeError(f"module 'scalarlens_transformers' has no attribute {name!r}")
