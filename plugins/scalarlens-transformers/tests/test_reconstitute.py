"""Reconstitution (``scalarlens.Reconstitutable``) on every family: the core's oracle, negative
controls that show it catches a wrong norm, a dropped stop-gradient or collapsed q/k/v paths,
and queries, keys and values read from different prompts' residuals.

The oracle compares against the adapter's own run.  Reconstitution calls the same modules and
norm code a run does, so the numbers agree to the last bit today; ``ATOL`` leaves room only for
a kernel that sums in a different order (a float64 sum of a few hundred terms: ~1e-14).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import attrs
import pytest
import scalarlens
import tiny_models as tm
import torch
from scalarlens import ActivationLocationType as ALT
from scalarlens import CaptureRequest, PassType
from scalarlens.exceptions import ModelInputError
from scalarlens.testing import check_reconstitution

from scalarlens_transformers import load_hf_model
from scalarlens_transformers._reconstitute import Reconstitution

FWD = PassType.FORWARD
PROMPT = [1, 5, 9, 13, 2, 7, 11, 3]  # longer than the sliding windows (4) of the tiny models
OTHER = [1, 40, 41, 42, 43, 44, 45, 46]
ATOL = 1e-12


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("reconstitute"))


@cache
def _saved(model_type: str, root: str) -> Path:
    return tm.save(model_type, Path(root) / model_type)


def adapter_for(model_type: str, root: str, dtype: torch.dtype = torch.float64) -> Any:
    return load_hf_model(f"hf:{_saved(model_type, root)}", dtype=dtype)


@pytest.mark.parametrize("model_type", tm.FAMILY_KEYS)
def test_every_family_reconstitutes_its_own_run_and_backward(model_type: str, root: str) -> None:
    adapter = adapter_for(model_type, root)
    assert isinstance(adapter, scalarlens.Reconstitutable)
    check_reconstitution(adapter, PROMPT, atol=ATOL)
    # The oracle differentiates the last query's probability of key 0, which a sliding window
    # (4 in the tiny models) masks at 8 tokens: a zero gradient on both sides.  Within the
    # window it is live.
    check_reconstitution(adapter, PROMPT[:4], atol=ATOL)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt_neox"])
def test_half_precision_reconstitutes_in_the_accumulation_dtype(model_type: str, root: str) -> None:
    adapter = adapter_for(model_type, root, torch.bfloat16)
    check_reconstitution(adapter, PROMPT[:5], atol=ATOL, layers=[1])
    resid = torch.zeros(5, tm.D)
    assert adapter.reconstitute_mlp(resid, 0)[1].dtype == torch.float32


# --- negative controls: the oracle must catch what could go wrong here -----------------------


def test_the_wrong_norm_is_caught(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = adapter_for("llama", root)
    rec = adapter._reconstitution
    monkeypatch.setattr(rec, "family", attrs.evolve(rec.family, input_norm=rec.family.pre_mlp_norm))
    with pytest.raises(AssertionError, match="layer 0 attn.qk_logits"):
        check_reconstitution(adapter, PROMPT, atol=ATOL)


def test_a_scale_left_attached_is_caught(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = adapter_for("gemma2", root)
    live = Reconstitution.normed

    def ignores_detach(self: Any, resid: torch.Tensor, layer: int, sublayer: str, **_: Any) -> Any:
        return live(self, resid, layer, sublayer, detach_scale=False)

    monkeypatch.setattr(Reconstitution, "normed", ignores_detach)
    with pytest.raises(AssertionError, match=r"detach σ: True"):
        check_reconstitution(adapter, PROMPT, atol=ATOL)


def test_collapsed_attention_paths_are_caught(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = adapter_for("qwen3", root)
    real = adapter.reconstitute_attention

    def queries_only(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, **kw: Any
    ) -> Any:
        return real(q, q, q, layer, **kw)

    monkeypatch.setattr(adapter, "reconstitute_attention", queries_only)
    with pytest.raises(AssertionError, match="path q"):
        check_reconstitution(adapter, PROMPT, atol=ATOL)


# --- queries, keys and values from different residuals --------------------------------------


def _attention_run(adapter: Any, prompt: list[int]) -> Any:
    captures = [
        CaptureRequest(loc, FWD, [1])
        for loc in (ALT.ATTN_QK_LOGITS, ALT.ATTN_VALUE, ALT.ATTN_QK_PROBS)
    ]
    captures.append(CaptureRequest(ALT.RESID_POST_MLP, FWD, [0]))
    (run,) = adapter.run([prompt], captures, return_logits=False)
    return run


@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text", "gpt_neox", "gpt2"])
def test_keys_and_values_come_from_their_own_residuals(model_type: str, root: str) -> None:
    adapter = adapter_for(model_type, root)
    a, b = _attention_run(adapter, PROMPT), _attention_run(adapter, OTHER)
    ra = a.captured[(ALT.RESID_POST_MLP, FWD)][0]  # what layer 1 reads
    rb = b.captured[(ALT.RESID_POST_MLP, FWD)][0]

    def captured(run: Any, loc: ALT) -> torch.Tensor:
        tensor: torch.Tensor = run.captured[(loc, FWD)][1]
        return tensor

    values_from_b = adapter.reconstitute_attention(ra, ra, rb, 1)
    assert torch.equal(values_from_b.logits, captured(a, ALT.ATTN_QK_LOGITS))
    assert torch.equal(values_from_b.values, captured(b, ALT.ATTN_VALUE))
    mixed = torch.einsum("tsh,shd->thd", values_from_b.probs, values_from_b.values)
    torch.testing.assert_close(values_from_b.mixed, mixed, rtol=0, atol=1e-12)

    keys_from_b = adapter.reconstitute_attention(ra, rb, ra, 1)
    assert torch.equal(keys_from_b.values, captured(a, ALT.ATTN_VALUE))
    assert not torch.allclose(keys_from_b.probs, captured(a, ALT.ATTN_QK_PROBS))
    queries_and_keys_from_b = adapter.reconstitute_attention(rb, rb, ra, 1)
    assert torch.equal(queries_and_keys_from_b.probs, captured(b, ALT.ATTN_QK_PROBS))


def test_bad_arguments_are_refused_with_what_to_pass(root: str) -> None:
    adapter = adapter_for("llama", root)
    resid = torch.zeros(4, tm.D, dtype=torch.float64)
    with pytest.raises(ModelInputError, match="same T×D"):
        adapter.reconstitute_attention(resid, resid[:3], resid[:3], 0)
    with pytest.raises(ModelInputError, match="no batch axis"):
        adapter.reconstitute_mlp(resid[None], 0)
    with pytest.raises(ModelInputError, match=r"layers 0…1"):
        adapter.reconstitute_mlp(resid, 2)
    with pytest.raises(ModelInputError, match="'attn' or 'mlp'"):
        adapter.sublayer_input(resid, 0, "embed")
