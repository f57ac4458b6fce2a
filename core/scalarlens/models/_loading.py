"""``load_model``: a model spec → a ``ModelAdapter`` (bundled name, directory, plugin loader)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..exceptions import CheckpointError

if TYPE_CHECKING:
    from .._model import ModelAdapter
    from .._registry import Registry

DEFAULT_MODEL = "tiny-induction"


def load_model(spec: str | Path = DEFAULT_MODEL, registry: Registry | None = None) -> ModelAdapter:
    """Resolve a model spec: a bundled name, a checkpoint directory, or a plugin loader.

    Plugin loaders (hook ``scalarlens_model_loaders``) match a plain name exactly or a
    ``scheme:`` prefix; they are consulted before the builtin GPT-2 loader.  A directory whose
    ``config.json`` has a ``model_type`` goes to the loader registered as
    ``model_type:<that type>`` (e.g. ``scalarlens-transformers`` claims ``llama``).
    """
    from .. import models

    text = str(spec)
    if registry is None:
        from .._registry import registry as default_registry

        registry = default_registry
    loader = registry.model_loader(text)  # a conflict with a bundled name raises here
    model_type = read_model_type(Path(text)) if loader is None and Path(text).is_dir() else None
    if model_type is not None:
        # A directory whose config.json names a model_type a plugin claims ("model_type:llama").
        loader = registry.model_loader(f"model_type:{model_type}")
    if loader is not None:
        return loader(text)
    if text in models.BUNDLED_MODELS:
        return models.load_bundled_model(text)
    claimed = sorted(
        k.removeprefix("model_type:")
        for k in registry.model_loaders()
        if k.startswith("model_type:")
    )
    if model_type is not None and model_type != "gpt2":
        supported = ", ".join(["gpt2", *claimed])
        raise CheckpointError(
            f"{text}: config.json has model_type {model_type!r}, which neither the core (gpt2) "
            f"nor an installed plugin supports (supported here: {supported}); for Llama, "
            "Mistral, Qwen, Gemma and Pythia models install scalarlens-transformers, and see "
            "`scalarlens plugins` for what is installed"
        )
    if Path(text).exists():
        return models.load_gpt2_checkpoint(text)
    names = [*models.BUNDLED_MODELS, *(k for k in registry.model_loaders() if ":" not in k)]
    schemes = [k for k in registry.model_loaders() if k.endswith(":")]
    hub = (
        " If it is a Hugging Face Hub id, download it first (`hf download ID --local-dir DIR`)"
        " and pass DIR: ScalarLens never downloads models."
        if "/" in text
        else ""
    )
    raise CheckpointError(
        f"cannot resolve model {text!r}: not a bundled or plugin model name "
        f"({', '.join(names)}), not an existing checkpoint directory, and no loader scheme "
        f"({', '.join(schemes) or 'none installed'}) matches it.{hub}"
    )


def read_model_type(directory: Path) -> str | None:
    """``config.json``'s ``model_type``, or ``None`` (no file, not JSON, no such key)."""
    import json

    try:
        value = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_type = value.get("model_type") if isinstance(value, dict) else None
    return model_type if isinstance(model_type, str) else None
