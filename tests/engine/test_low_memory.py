"""``memory="low"``: per-layer recomputation gives the default mode's results bit for bit.

Every registered DST (the builtins and the SAE plugin's online DSTs, which splice an
intervention inside the recomputed layers) is derived in both modes on a float64 model, forward
and backward, with a logit-difference objective and with a node objective inside a layer (whose
gradient must come from the first forward's graph, not the recomputation).
"""

from __future__ import annotations

import pytest
import scalarlens
import torch
from scalarlens import DstConfig, ModelInputError, NodeObjective, PassType

from tests.builtins._tiny import ALT, TOKENS, corrupted, tiny_adapter

REGISTRY = scalarlens.registry


def _derive_everything(
    adapter: object,
    memory: str,
    objective: object,
    prompts: list[list[int]] | None = None,
    *,
    two_prompt_dsts: bool = True,
) -> dict:  # type: ignore[type-arg]
    """Every registered DST (both passes) on ``prompts``, keyed by (DST/pass, prompt, layer);
    DSTs comparing two prompts get a corrupted baseline unless ``two_prompt_dsts`` is false."""
    prompts = prompts or [TOKENS]
    examples = REGISTRY.dst_examples()
    out = {}
    for name in sorted(REGISTRY.names()):
        options = examples[name].options.to_dict() if name in examples else {}
        config = DstConfig(derive_gradients=True, options=options, memory=memory)
        deriver = REGISTRY.get(name, config)
        if scalarlens.unsupported_reason(deriver, adapter) is not None:
            continue  # mlp.up: GPT-2 has no gated MLP
        baseline = None
        if deriver.reads_baseline():
            if not two_prompt_dsts:
                continue
            baseline = [corrupted(p) for p in prompts]
        store = scalarlens.derive(
            adapter, prompts, name, objective=objective, config=config, baseline=baseline
        )
        for b in range(len(prompts)):
            for key in store.keys():
                entry = store.activations(key.dst, key.pass_type, prompt=b)
                for layer, tensor in entry.activations_by_layer_index.items():
                    out[(str(key), b, layer)] = tensor
    return out


@pytest.mark.parametrize(
    "objective",
    [
        scalarlens.LogitDiffObjective(4, 11),
        NodeObjective(ALT.MLP_POST_ACT, 1, (4, 7)),
    ],
    ids=["logit_diff", "node_in_layer_1"],
)
def test_low_memory_is_bit_identical_for_every_dst(objective: object) -> None:
    adapter = tiny_adapter()
    default = _derive_everything(adapter, "default", objective)
    low = _derive_everything(adapter, "low", objective)
    assert default.keys() == low.keys() and len(default) > 100
    backward = [key for key in default if "/backward" in key[0]]
    assert backward and any(float(default[k].abs().max()) > 0 for k in backward)
    for key, value in default.items():
        assert torch.equal(value, low[key]), key


def test_low_memory_with_an_intervention_inside_a_recomputed_layer() -> None:
    """An ablation runs in the first forward and again in the recomputation, identically."""
    adapter = tiny_adapter()

    def halve(x: torch.Tensor, layer: int | None) -> torch.Tensor:
        return x * 0.5

    ablate = scalarlens.Intervention(ALT.ATTN_QK_PROBS, halve, layers={1})
    stores = [
        scalarlens.derive(
            adapter,
            [TOKENS],
            ["mlp.act_times_grad", "attn.act_times_grad"],
            target=4,
            distractor=11,
            interventions=[ablate],
            config=DstConfig(memory=memory),
        )
        for memory in ("default", "low")
    ]
    for name in ("mlp.act_times_grad", "attn.act_times_grad"):
        for layer in range(3):
            assert torch.equal(stores[0].get(name, layer), stores[1].get(name, layer))


def test_memory_mode_is_validated() -> None:
    with pytest.raises(scalarlens.ConfigError, match="memory must be one of"):
        DstConfig(memory="tiny")
    adapter = tiny_adapter()
    with pytest.raises(ModelInputError, match="memory must be 'default' or 'low'"):
        adapter.run([TOKENS], [], memory="none")
    adapter.recomputes_layers = False  # an adapter that cannot recompute layer by layer
    with pytest.raises(ModelInputError, match="cannot recompute layer by layer"):
        adapter.run(
            [TOKENS],
            [scalarlens.CaptureRequest(ALT.MLP_POST_ACT, PassType.BACKWARD)],
            scalarlens.LogitDiffObjective(4, 11),
            memory="low",
        )
