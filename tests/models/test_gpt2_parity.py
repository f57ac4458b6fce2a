"""Our GPT-2 reproduces ``transformers.GPT2LMHeadModel`` exactly (fp32, ≤ 1e-5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scalarlens._model import CaptureRequest  # noqa: E402
from scalarlens._vocab import ActivationLocationType as ALT  # noqa: E402
from scalarlens._vocab import PassType  # noqa: E402
from scalarlens.models import load_gpt2_checkpoint, save_gpt2_checkpoint  # noqa: E402

TOL = 1e-5


def _hf_model(tied: bool, seed: int = 0) -> object:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=50,
        n_positions=32,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF initialises biases to 0 and LN to 1; make every term count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_hf(tmp_path: Path, tied: bool) -> None:
    hf = _hf_model(tied)
    hf.save_pretrained(tmp_path, safe_serialization=True)  # type: ignore[attr-defined]
    adapter = load_gpt2_checkpoint(tmp_path)
    assert adapter.dtype == torch.float32
    tokens = torch.randint(0, 50, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits  # type: ignore[operator]
        ours = adapter.model(tokens)
    assert (ours - expected).abs().max().item() <= TOL

    results = adapter.run(tokens.tolist(), [CaptureRequest(ALT.LOGITS, PassType.FORWARD)])
    for b, res in enumerate(results):
        assert (res.logits - expected[b]).abs().max().item() <= TOL


def test_padded_batch_matches_hf_attention_mask(tmp_path: Path) -> None:
    hf = _hf_model(tied=True, seed=3)
    hf.save_pretrained(tmp_path, safe_serialization=True)  # type: ignore[attr-defined]
    adapter = load_gpt2_checkpoint(tmp_path)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    results = adapter.run(prompts, [])
    for ids, res in zip(prompts, results, strict=True):
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0]  # type: ignore[operator]
        assert res.logits.shape == expected.shape
        assert (res.logits - expected).abs().max().item() <= TOL


def test_our_checkpoint_loads_in_transformers(tmp_path: Path) -> None:
    hf = _hf_model(tied=False, seed=5)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)  # type: ignore[attr-defined]
    adapter = load_gpt2_checkpoint(tmp_path / "hf")
    save_gpt2_checkpoint(adapter.model, tmp_path / "ours")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "ours", attn_implementation="eager"
    ).eval()
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (reloaded(tokens).logits - hf(tokens).logits).abs().max().item()  # type: ignore[operator]
    assert diff <= TOL
    again = load_gpt2_checkpoint(tmp_path / "ours")
    for a, b in zip(
        again.model.state_dict().values(), adapter.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
