"""Tiny stock transformers models (random weights, vocabulary 40) for tests that must hold beyond thinkrl's own
scratch Llama: grouped-query attention, other architectures."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHS = ("llama-gqa", "qwen2", "mistral", "gpt2")
_DECODERS = {
    "llama-gqa": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def stock_model(arch: str, seed: int = 0) -> PreTrainedModel:
    """A 2-layer ``arch`` model in eval mode: 32 wide, 4 query heads (2 key/value heads where the class has them)."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
        )
    else:
        config_cls, model_cls = _DECODERS[arch]
        sizes = dict(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
        )
        model = model_cls(config_cls(**sizes))
    return model.eval()
