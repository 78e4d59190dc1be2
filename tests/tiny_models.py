"""Tiny randomly initialised models of every supported architecture, for oracle tests."""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON: dict[str, Any] = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def _llama31_rope() -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    }


ARCHS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "llama31": (LlamaConfig, LlamaForCausalLM, {"rope_parameters": _llama31_rope()}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen2_yarn": (
        Qwen2Config,
        Qwen2ForCausalLM,
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 256,
            }
        },
    ),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
}


def tiny_pair(
    arch: str, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedModel]:
    """Two identical tiny models: one for the engine, one left as the vanilla reference."""
    config_cls, model_cls, extra = ARCHS[arch]
    config = config_cls(**COMMON, **extra)
    torch.manual_seed(seed)
    reference = model_cls(copy.deepcopy(config)).eval().to(dtype)
    engine_model = model_cls(copy.deepcopy(config)).eval().to(dtype)
    engine_model.load_state_dict(reference.state_dict())
    reference.set_attn_implementation("eager")
    return engine_model, reference


def tiny_chat_qwen2(vocab_size: int, seed: int = 0) -> Qwen2ForCausalLM:
    """A tiny random Qwen2 sized to a real chat tokenizer's vocabulary (chat-model tests)."""
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()
