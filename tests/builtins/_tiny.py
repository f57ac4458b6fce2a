"""A tiny float64 GPT-2 with every parameter random, and one-call derive helpers.

Random LayerNorm gains/biases and nonzero biases everywhere keep the identities non-trivial
(a zero ``b_out`` would let a missing bias term pass unnoticed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import scalarlens
import torch
from scalarlens import ActivationLocationType, DstConfig, PassType
from scalarlens.models import GPT2Adapter, GPT2Config, GPT2Model

ALT = ActivationLocationType
FWD, BWD = PassType.FORWARD, PassType.BACKWARD
N_LAYERS, D_MODEL, N_HEADS, D_MLP, VOCAB = 3, 16, 4, 32, 23
TOKENS = [3, 17, 5, 9, 9, 21]
T = len(TOKENS)
TARGET, DISTRACTOR = 4, 11
TOL = 1e-6
REGISTRY = scalarlens.Registry()


def tiny_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=D_MODEL,
        n_layer=N_LAYERS,
        n_head=N_HEADS,
        n_inner=D_MLP,
    )


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or "ln_f" in name:
                p.copy_(1.0 + 0.3 * noise if name.endswith("weight") else 0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.3 * noise)


def tiny_adapter(seed: int = 0) -> GPT2Adapter:
    model = GPT2Model(tiny_config())
    adapter = GPT2Adapter(model, dtype=torch.float64)
    randomize(model, seed)
    return adapter


def logit_diff() -> scalarlens.LogitDiffObjective:
    return scalarlens.LogitDiffObjective(TARGET, DISTRACTOR)


def derive(
    adapter: GPT2Adapter,
    dsts: str | Sequence[str],
    *,
    objective: Any = None,
    config: DstConfig | None = None,
    options: Mapping[str, Any] | None = None,
    detach: bool = False,
    tokens: Sequence[int] = TOKENS,
    baseline: Sequence[int] | None = None,
) -> scalarlens.DerivedScalarStore:
    """``scalarlens.derive`` on the tiny model with a logit-difference objective by default.

    DSTs that compare two prompts get ``baseline`` (default: ``tokens`` with one token changed).
    """
    config = config or DstConfig(detach_final_ln_scale=detach, options=dict(options or {}))
    names = [dsts] if isinstance(dsts, str) else list(dsts)
    if baseline is None and any(REGISTRY.get(d, config).reads_baseline() for d in names):
        baseline = corrupted(tokens)
    return scalarlens.derive(
        adapter,
        [list(tokens)],
        dsts,
        objective=objective or logit_diff(),
        config=config,
        registry=REGISTRY,
        baseline=None if baseline is None else [list(baseline)],
    )


def corrupted(tokens: Sequence[int]) -> list[int]:
    """``tokens`` with the token at position 2 replaced (a fixed, aligned corruption)."""
    out = list(tokens)
    out[2] = (out[2] + 5) % tiny_config().vocab_size
    return out


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())
