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
    if loader is None and Path(text).is_dir():
        # A directory whose config.json names a model_type a plugin claims ("model_type:llama").
        model_type = _model_type(Path(text))
        if model_type is not None:
            loader = registry.model_loader(f"model_type:{model_type}")
    if loader is not None:
        return loader(text)
    loaders = registry.model_loaders()
    if text in models.BUNDLED_MODELS:
        return models.load_bundled_model(text)
    if Path(text).exists():
        return models.load_gpt2_checkpoint(text)
    known = [*models.BUNDLED_MODELS, *loaders]
    raise CheckpointError(
        f"cannot resolve model {text!r}: not a bundled model ({', '.join(known)}), not an "
        "existing checkpoint directory, and no plugin loader claims it"
    )


def _model_type(directory: Path) -> str | None:
    """``config.json``'s ``model_type``, or ``None`` (no file, not JSON, no such key)."""
    import json

    try:
        value = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_type = value.get("model_type") if isinstance(value, dict) else None
    return model_type if isinstance(model_type, str) else None
