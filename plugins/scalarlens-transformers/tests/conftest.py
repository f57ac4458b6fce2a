"""Fixtures for the plugin's tests; the tiny models themselves are built in ``tiny_models``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import tiny_models


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``path_for(model_type)``: the tiny model of that family, saved once per session.

    Each directory holds ``config.json``, ``model.safetensors`` and the word-level tokenizer.
    Treat it as read-only; copy it (``shutil.copytree``) before damaging it in a test.
    """
    root = tmp_path_factory.mktemp("tiny-models")
    saved: dict[str, Path] = {}

    def path_for(model_type: str) -> Path:
        if model_type not in saved:
            saved[model_type] = tiny_models.save(model_type, root / model_type)
        return saved[model_type]

    return path_for
