"""Fixtures for the plugin's tests; helpers live in ``sae_testlib``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import scalarlens
from scalarlens.testing import tiny_model

import scalarlens_sae


@pytest.fixture
def model() -> scalarlens.ModelAdapter:
    return tiny_model()


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    scalarlens_sae.clear_cache()
    yield
    scalarlens_sae.clear_cache()
