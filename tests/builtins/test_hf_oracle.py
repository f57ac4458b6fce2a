"""Oracle: act×grad and direct effects equal plain autograd on ``transformers.GPT2LMHeadModel``.

The HF model is built with random weights (biases and LayerNorms included), saved as a
safetensors checkpoint and loaded through ``scalarlens.models.load_gpt2_checkpoint``; the
reference values come from ``retain_grad`` on HF's own intermediate tensors, with no ScalarLens
code involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import scalarlens  # noqa: E402
from scalarlens import DstConfig  # noqa: E402
from scalarlens.models import load_gpt2_checkpoint  # noqa: E402

from ._tiny import REGISTRY, max_err  # noqa: E402

TOKENS = [5, 1, 8, 13, 2, 7, 7]
TARGET, DISTRACTOR = 3, 19
N_LAYER, N_HEAD, D = 2, 4, 16
DSTS = [
    "mlp.act_times_grad",
    "attn.act_times_grad",
    "mlp.write_to_final_residual_grad",
    "attn.write_to_final_residual_grad",
]


def _hf_model() -> Any:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=N_LAYER,
        n_embd=D,
        n_head=N_HEAD,
        vocab_size=23,
        n_positions=16,
        attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.mul_(10.0)
    return model.double()


def _hf_reference(hf: Any) -> dict[str, list[torch.Tensor]]:
    acts: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    final: list[torch.Tensor] = []
    handles = []
    for block in hf.transformer.h:
        handles.append(
            block.mlp.act.register_forward_hook(
                lambda _m, _i, out: (out.retain_grad(), acts.append(out))[1]
            )
        )
        handles.append(
            block.attn.c_attn.register_forward_hook(
                lambda _m, _i, out: values.append(
                    out[0, :, 2 * D :].reshape(-1, N_HEAD, D // N_HEAD)
                )
            )
        )
    handles.append(
        hf.transformer.ln_f.register_forward_pre_hook(
            lambda _m, args: (args[0].retain_grad(), final.append(args[0]))[1]
        )
    )
    out = hf(torch.tensor([TOKENS]), output_attentions=True)
    probs = list(out.attentions)
    for p in probs:
        p.retain_grad()
    (out.logits[0, -1, TARGET] - out.logits[0, -1, DISTRACTOR]).backward()
    for handle in handles:
        handle.remove()

    g = final[0].grad[0]  # T×D
    result: dict[str, list[torch.Tensor]] = {name: [] for name in DSTS}
    for layer, block in enumerate(hf.transformer.h):
        a = acts[layer][0]
        result["mlp.act_times_grad"].append(a * acts[layer].grad[0])
        result["mlp.write_to_final_residual_grad"].append(
            torch.einsum("tn,nd,td->tn", a, block.mlp.c_proj.weight, g)
        )
        p = probs[layer][0].permute(1, 2, 0)  # H×T×S → T×S×H
        grad_p = probs[layer].grad[0].permute(1, 2, 0)
        result["attn.act_times_grad"].append(p * grad_p)
        w_o = block.attn.c_proj.weight.reshape(N_HEAD, D // N_HEAD, D)
        c = torch.einsum("shv,hvd->shd", values[layer], w_o)
        result["attn.write_to_final_residual_grad"].append(torch.einsum("tsh,shd,td->tsh", p, c, g))
    return {k: [t.detach() for t in v] for k, v in result.items()}


def test_matches_hf_autograd(tmp_path: Path) -> None:
    hf = _hf_model()
    hf.float().save_pretrained(tmp_path, safe_serialization=True)
    hf.double()
    adapter = load_gpt2_checkpoint(tmp_path, dtype=torch.float64)
    expected = _hf_reference(hf)
    store = scalarlens.derive(
        adapter,
        [TOKENS],
        DSTS,
        objective=scalarlens.LogitDiffObjective(TARGET, DISTRACTOR),
        config=DstConfig(),
        registry=REGISTRY,
    )
    for name in DSTS:
        for layer in range(N_LAYER):
            ours = store.get(name, layer)
            assert ours.abs().max() > 1e-6, (name, layer)
            assert max_err(ours, expected[name][layer]) <= 1e-5, (name, layer)
