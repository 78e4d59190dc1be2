"""Model loading: the offline embedded models and plain `from_pretrained` paths or hub ids."""

from langchain_infllm.models.embedded import (
    EMBEDDED_MODELS,
    EmbeddedModel,
    EmbeddedModelError,
    WheelPart,
    ensure_embedded_gguf,
    ensure_embedded_model,
    get_cache_dir,
    get_embedded_model,
    is_embedded_model,
    load_model_and_tokenizer,
)

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "EmbeddedModelError",
    "WheelPart",
    "ensure_embedded_gguf",
    "ensure_embedded_model",
    "get_cache_dir",
    "get_embedded_model",
    "is_embedded_model",
    "load_model_and_tokenizer",
]
