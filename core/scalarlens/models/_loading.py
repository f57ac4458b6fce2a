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
    ``scheme:`` prefix; they are consulted before the builtin GPT-2 loader.
    """
    from .. import models

    text = str(spec)
    if registry is None:
        from .._registry import registry as default_registry

        registry = default_registry
    loader = registry.model_loader(text)  # a conflict with a bundled name raises here
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
