"""Which Hugging Face architectures the engine runs, and their attention layout."""

from __future__ import annotations

from typing import Any

from torch import nn

from langchain_infllm.engine.memory import LayerShape

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    """The model's architecture is not one InfLLM was validated on here."""


def check_supported(model: nn.Module) -> Any:
    """Return the model's config, or raise naming the supported architectures."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama incl. 3.x rope scaling, Mistral, "
            "Qwen2, Qwen3)"
        )
    inner = getattr(model, "model", None)
    if getattr(inner, "rotary_emb", None) is None or getattr(inner, "layers", None) is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `model.rotary_emb` / `model.layers`; load it with "
            "AutoModelForCausalLM"
        )
    return config


def layer_shape(config: Any) -> LayerShape:
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return LayerShape(heads=heads, kv_heads=kv_heads, head_dim=int(head_dim))
