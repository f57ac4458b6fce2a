"""Raw twins: FORWARD is the captured value, BACKWARD its gradient, unchanged."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from scalarlens import CaptureRequest, DstConfig

from ._tiny import ALT, BWD, FWD, N_LAYERS, TOKENS, derive, logit_diff, tiny_adapter

# Every location but the gated MLP's up projection exists on GPT-2 (post-norm scales are ones).
GPT2_ALTS = [alt for alt in ALT if alt is not ALT.MLP_UP]
RAW = [alt.value for alt in GPT2_ALTS]
assert set(RAW) == {
    "resid.post_emb",
    "attn_ln.scale",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.qk_logits",
    "attn.qk_probs",
    "attn.v_out",
    "resid.delta_attn",
    "resid.post_attn",
    "mlp_ln.scale",
    "mlp.pre_act",
    "mlp.post_act",
    "attn_post_ln.scale",
    "mlp_post_ln.scale",
    "resid.delta_mlp",
    "resid.post_mlp",
    "resid.ln_f.scale",
    "logits",
}


@pytest.fixture(scope="module")
def adapter() -> Any:
    return tiny_adapter()


def test_raw_twins_equal_captures(adapter: Any) -> None:
    store = derive(adapter, RAW, config=DstConfig(derive_gradients=True))
    captures = [
        CaptureRequest(alt, p, None if alt.has_no_layers else range(N_LAYERS))
        for alt in GPT2_ALTS
        for p in (FWD, BWD)
    ]
    (run,) = adapter.run([TOKENS], captures, logit_diff())
    for alt in GPT2_ALTS:
        for pass_type in (FWD, BWD):
            for layer, tensor in run.captured[(alt, pass_type)].items():
                assert torch.equal(store.get(alt.value, layer, pass_type), tensor)
