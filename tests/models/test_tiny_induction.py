"""The bundled ``tiny-induction`` model loads offline and actually does induction."""

from __future__ import annotations

import pytest
import torch
from scalarlens._model import CaptureRequest
from scalarlens._vocab import ActivationLocationType as ALT
from scalarlens._vocab import PassType
from scalarlens.models import BUNDLED_MODELS, GPT2Adapter, load_bundled_model

MIN_L, MAX_L, N_CTX, MAX_FILLER = 4, 24, 64, 16


@pytest.fixture(scope="module")
def model() -> GPT2Adapter:
    return load_bundled_model("tiny-induction")


def _heldout(
    generator: torch.Generator, batch: int, length: int, total: int, n_vocab: int
) -> torch.Tensor:
    """Same recipe as scripts/train_tiny_induction.py: ``R1 + A + R2 + A``, all distinct but
    the copy, random offsets, the copy filling the last ``length`` positions."""
    body = torch.argsort(torch.rand(batch, n_vocab, generator=generator), dim=1)
    body = body[:, : total - length]
    start = torch.randint(0, total - 2 * length + 1, (batch, 1), generator=generator)
    copy = torch.gather(body, 1, start + torch.arange(length))
    return torch.cat([body, copy], dim=1)


def test_bundled_model_metadata(model: GPT2Adapter) -> None:
    assert "tiny-induction" in BUNDLED_MODELS
    assert model.name == "tiny-induction"
    assert model.dims.n_layers == 2
    assert model.tokenizer is not None
    assert len(model.tokenizer.vocab) == model.dims.n_vocab
    assert model.config_dict()["source"] == "bundled:tiny-induction"


def test_repeated_copy_accuracy(model: GPT2Adapter) -> None:
    g = torch.Generator().manual_seed(20240601)  # not the training or training-eval seeds
    correct = total_predictions = 0
    for length in range(MIN_L, MAX_L + 1):
        total = int(
            torch.randint(2 * length, min(N_CTX, 2 * length + MAX_FILLER) + 1, (1,), generator=g)
        )
        seqs = _heldout(g, 16, length, total, model.dims.n_vocab)
        with torch.no_grad():
            logits = model.model(seqs)
        pred = logits[:, total - length : total - 1].argmax(-1)
        target = seqs[:, total - length + 1 :]
        correct += int((pred == target).sum())
        total_predictions += target.numel()
    accuracy = correct / total_predictions
    assert accuracy >= 0.90, f"repeated-copy accuracy {accuracy:.3f}"


def test_word_prompt_completes_by_copying(model: GPT2Adapter) -> None:
    assert model.tokenizer is not None
    ids = model.tokenizer.encode("red fox ran over the hill to a big farm red fox ran over the")
    res = model.run([ids], [])[0]
    assert model.tokenizer.decode([int(res.logits[-1].argmax())]) == "hill"
    model.tokenizer.encode("the cat sat on the mat the cat sat on the mat")  # tokenizes


def test_has_previous_token_and_induction_heads(model: GPT2Adapter) -> None:
    length, total = 12, 40
    seqs = _heldout(torch.Generator().manual_seed(7), 8, length, total, model.dims.n_vocab)
    results = model.run(seqs.tolist(), [CaptureRequest(ALT.ATTN_QK_PROBS, PassType.FORWARD)])
    key = (ALT.ATTN_QK_PROBS, PassType.FORWARD)
    probs0 = torch.stack([r.captured[key][0] for r in results])  # B×T×S×H
    probs1 = torch.stack([r.captured[key][1] for r in results])
    # Over the distinct-word body (inside the copy, layer 0 also does other work) each of the
    # four layer-0 heads puts about half its attention on the previous token; uniform
    # attention would give ~1/14.
    t = torch.arange(1, total - length)
    prev_token = probs0[:, t, t - 1, :].mean(dim=(0, 1))  # per head
    assert prev_token.max() > 0.4, prev_token
    # Query t in the copy attends to the position right after t's first occurrence.
    starts = [int((seqs[b, : total - length] == seqs[b, -length]).nonzero()) for b in range(8)]
    q = torch.arange(total - length, total)
    induction = torch.stack(
        [probs1[b, q, starts[b] + q - (total - length) + 1, :] for b in range(8)]
    ).mean(dim=(0, 1))
    assert induction.max() > 0.8, induction
