"""Tiny random-config models of every family, saved as safetensors with a word-level tokenizer.

Nothing is downloaded: each model is built from a config with a fixed seed.  Weights are
re-drawn with a larger scale than HF's initialisation (and norm gains perturbed) so attention
is not uniform and every term of every identity is non-trivial.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

VOCAB = 96
WORDS = ["<pad>", "<bos>", *[f"w{i}" for i in range(VOCAB - 4)], "Paris", "Rome"]
D, HEADS, KV, HEAD_DIM, FF, LAYERS, CTX = 32, 4, 2, 8, 48, 2, 64


def _common(**extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB,
        hidden_size=D,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        max_position_embeddings=CTX,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
        **extra,
    )


def _llama() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**_common(head_dim=HEAD_DIM))


def _mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(**_common(head_dim=HEAD_DIM, sliding_window=4))


def _qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**_common())


def _qwen3() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**_common(head_dim=HEAD_DIM))


def _gemma2() -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(
        **_common(
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=4,
            final_logit_softcapping=3.0,
            attn_logit_softcapping=5.0,
        )
    )


def _gemma3() -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **_common(
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=4,
            final_logit_softcapping=3.0,
            layer_types=["sliding_attention", "full_attention"],
        )
    )


def _neox() -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        num_attention_heads=HEADS,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        max_position_embeddings=CTX,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=None,
    )


def _gpt2() -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=D,
        n_head=HEADS,
        n_inner=FF,
        n_layer=LAYERS,
        n_positions=CTX,
        bos_token_id=None,
        eos_token_id=None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


CONFIGS: dict[str, Callable[[], Any]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3,
    "gpt_neox": _neox,
    "gpt2": _gpt2,
}
FAMILY_KEYS = tuple(CONFIGS)


def build(model_type: str, seed: int = 0) -> Any:
    """A random ``*ForCausalLM`` of ``model_type`` in float32 eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = CONFIGS[model_type]()
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.25)
            elif "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.2)
            else:  # biases
                p.normal_(0.0, 0.1)
    return model.eval()


def save_tokenizer(directory: Path) -> None:
    """A word-level ``tokenizer.json`` over ``WORDS`` (BOS added to prompts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>")
    fast.save_pretrained(directory)


def save(model_type: str, directory: Path, seed: int = 0, *, tokenizer: bool = True) -> Path:
    """Save a random model of ``model_type`` (safetensors) and a tokenizer to ``directory``."""
    model = build(model_type, seed)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer:
        save_tokenizer(directory)
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == model_type
    return directory
