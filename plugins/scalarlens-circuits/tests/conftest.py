"""Fixtures: the tiny random float64 GPT-2 of the core tests' shape, and the bundled model."""

from __future__ import annotations

import pytest
import scalarlens
import torch
from scalarlens.models import GPT2Adapter, GPT2Config, GPT2Model

TOKENS = [3, 17, 5, 9, 9, 21, 4]
TARGET, DISTRACTOR = 4, 11


def random_gpt2(seed: int = 0, n_layers: int = 3) -> GPT2Adapter:
    """Every parameter random (norm gains near 1, biases nonzero), float64."""
    cfg = GPT2Config(
        vocab_size=23, n_positions=16, n_embd=16, n_layer=n_layers, n_head=4, n_inner=32
    )
    model = GPT2Model(cfg)
    adapter = GPT2Adapter(model, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if "ln" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.3 * noise)
    return adapter


@pytest.fixture
def tiny() -> GPT2Adapter:
    return random_gpt2()


@pytest.fixture
def bundled() -> scalarlens.ModelAdapter:
    return scalarlens.load_model("tiny-induction")
