"""Bad checkpoints and bad inputs fail with messages that say what is wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from scalarlens._model import CaptureRequest, LogitDiffObjective, NodeObjective
from scalarlens._vocab import ActivationLocationType as ALT
from scalarlens._vocab import PassType, WeightLocationType
from scalarlens.exceptions import CheckpointError, ModelInputError, TokenizerError
from scalarlens.models import (
    GPT2Adapter,
    GPT2Config,
    GPT2Model,
    WordTokenizer,
    load_bundled_model,
    load_gpt2_checkpoint,
    save_gpt2_checkpoint,
)

CFG = GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=2, n_head=2, n_inner=16)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_gpt2_checkpoint(GPT2Model(CFG), tmp_path / "ckpt")


@pytest.fixture
def adapter(ckpt: Path) -> GPT2Adapter:
    return load_gpt2_checkpoint(ckpt)


def _rewrite(ckpt: Path, edit: dict[str, torch.Tensor | None]) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    for name, value in edit.items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, str(ckpt / "model.safetensors"))


def test_roundtrip_and_prefixless_names(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert all(k.startswith("transformer.") for k in tensors)
    save_file(
        {k.removeprefix("transformer."): v for k, v in tensors.items()},
        str(ckpt / "model.safetensors"),
    )
    # Old HF checkpoints carry causal-mask buffers; they are ignored.
    _rewrite(ckpt, {"h.0.attn.bias": torch.ones(1, 1, 8, 8), "h.0.attn.masked_bias": torch.ones(1)})
    assert load_gpt2_checkpoint(ckpt).dims.n_layers == 2


def test_missing_tensor(ckpt: Path) -> None:
    _rewrite(ckpt, {"transformer.h.1.mlp.c_fc.bias": None, "transformer.ln_f.weight": None})
    with pytest.raises(CheckpointError, match="missing tensor") as err:
        load_gpt2_checkpoint(ckpt)
    assert "h.1.mlp.c_fc.bias" in str(err.value) and "ln_f.weight" in str(err.value)


def test_missing_lm_head_when_untied(tmp_path: Path) -> None:
    untied = GPT2Config(
        vocab_size=20,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_inner=16,
        tie_word_embeddings=False,
    )
    ckpt = save_gpt2_checkpoint(GPT2Model(untied), tmp_path / "u")
    _rewrite(ckpt, {"lm_head.weight": None})
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): lm_head\.weight"):
        load_gpt2_checkpoint(ckpt)


def test_extra_tensor(ckpt: Path) -> None:
    _rewrite(ckpt, {"transformer.h.2.ln_1.weight": torch.ones(8), "foo.bar": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected tensor") as err:
        load_gpt2_checkpoint(ckpt)
    assert "h.2.ln_1.weight" in str(err.value) and "foo.bar" in str(err.value)


def test_misshaped_tensor(ckpt: Path) -> None:
    _rewrite(ckpt, {"transformer.h.0.attn.c_attn.weight": torch.zeros(8, 20)})
    with pytest.raises(CheckpointError) as err:
        load_gpt2_checkpoint(ckpt)
    msg = str(err.value)
    assert "'h.0.attn.c_attn.weight'" in msg
    assert "shape (8, 20)" in msg and "expected (8, 24)" in msg


def test_all_problems_reported_at_once(ckpt: Path) -> None:
    _rewrite(
        ckpt,
        {
            "transformer.wpe.weight": torch.zeros(9, 8),
            "transformer.ln_f.bias": None,
            "extra": torch.zeros(1),
        },
    )
    with pytest.raises(CheckpointError) as err:
        load_gpt2_checkpoint(ckpt)
    msg = str(err.value)
    assert "missing" in msg and "unexpected" in msg and "'wpe.weight' has shape (9, 8)" in msg


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "legacy"
    d.mkdir()
    (d / "config.json").write_text(
        '{"model_type": "gpt2", "vocab_size": 20, "n_embd": 8, "n_layer": 1, "n_head": 2}'
    )
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError) as err:
        load_gpt2_checkpoint(d)
    msg = str(err.value)
    assert "pytorch_model.bin" in msg and "safetensors" in msg
    assert "save_pretrained(" in msg and "safe_serialization=True" in msg


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gpt2_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_gpt2_checkpoint(tmp_path / "empty")


def test_unsupported_config(ckpt: Path) -> None:
    import json

    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["scale_attn_by_inverse_layer_idx"] = True
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        load_gpt2_checkpoint(ckpt)


def test_tokens_out_of_range(adapter: GPT2Adapter) -> None:
    with pytest.raises(ModelInputError) as err:
        adapter.run([[1, 2], [3, 20, -1]], [])
    msg = str(err.value)
    assert "prompt 1" in msg and "id 20 at position 1" in msg and "id -1 at position 2" in msg
    assert "0..19" in msg


def test_prompt_too_long(adapter: GPT2Adapter) -> None:
    with pytest.raises(ModelInputError) as err:
        adapter.run([list(range(9))], [])
    msg = str(err.value)
    assert "9 tokens" in msg and "n_ctx" in msg and "8" in msg


def test_empty_prompt_and_batch(adapter: GPT2Adapter) -> None:
    with pytest.raises(ModelInputError, match="prompt 1 is empty"):
        adapter.run([[1], []], [])
    with pytest.raises(ModelInputError, match="no prompts"):
        adapter.run([], [])
    with pytest.raises(ModelInputError, match=r"wrap a single prompt as \[ids\]"):
        adapter.run([1, 2, 3], [])  # type: ignore[list-item]


def test_bad_layer_index(adapter: GPT2Adapter) -> None:
    with pytest.raises(ModelInputError) as err:
        adapter.weight(WeightLocationType.MLP_TO_HIDDEN, 2)
    assert "layer 2" in str(err.value) and "0..1" in str(err.value)
    with pytest.raises(ModelInputError, match="layer None"):
        adapter.weight(WeightLocationType.ATTN_TO_QUERY)
    with pytest.raises(ModelInputError, match="has no layer"):
        adapter.weight(WeightLocationType.EMBEDDING, 0)
    with pytest.raises(ModelInputError) as err:
        adapter.run([[1, 2]], [CaptureRequest(ALT.MLP_POST_ACT, PassType.FORWARD, {5})])
    assert "mlp.post_act" in str(err.value) and "layer 5" in str(err.value)
    assert "0..1" in str(err.value)
    with pytest.raises(ModelInputError, match="has no layers"):
        adapter.run([[1, 2]], [CaptureRequest(ALT.LOGITS, PassType.FORWARD, {0})])


def test_objective_errors(adapter: GPT2Adapter) -> None:
    bwd = [CaptureRequest(ALT.MLP_POST_ACT, PassType.BACKWARD)]
    with pytest.raises(ModelInputError, match="need an objective"):
        adapter.run([[1, 2]], bwd)
    with pytest.raises(ModelInputError, match="distractor 99"):
        adapter.run([[1, 2]], bwd, LogitDiffObjective(1, 99))
    with pytest.raises(ModelInputError, match="position 5 is out of range for a 2-token"):
        adapter.run([[1, 2]], bwd, LogitDiffObjective(1, 2, position=5))
    with pytest.raises(ModelInputError, match="s <= t"):
        adapter.run([[1, 2, 3]], bwd, NodeObjective(ALT.ATTN_QK_PROBS, 0, (0, 2, 0)))
    with pytest.raises(ModelInputError, match="has 2 entries"):
        adapter.run([[1, 2, 3]], bwd, NodeObjective(ALT.ATTN_QK_PROBS, 0, (0, 0)))


def test_unknown_word_and_empty_text() -> None:
    tok = WordTokenizer(["the", "cat", "sat"])
    assert tok.encode("the cat  sat\n") == [0, 1, 2]
    assert tok.decode([2, 1]) == "sat cat"
    with pytest.raises(TokenizerError) as err:
        tok.encode("the dog sat on The mat dog")
    msg = str(err.value)
    assert "['dog', 'on', 'The', 'mat']" in msg
    assert "scalarlens vocab" in msg
    assert "load_bundled_model('tiny-induction').tokenizer.vocab" in msg
    assert "lowercase" in msg and "'The'" in msg
    with pytest.raises(TokenizerError, match="empty prompt"):
        tok.encode("   ")


def test_unknown_bundled_model() -> None:
    with pytest.raises(CheckpointError, match="tiny-induction"):
        load_bundled_model("gpt5")
