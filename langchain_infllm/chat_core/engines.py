"""One engine per (model, config, device, dtype) in a process, loaded on first use."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch

from langchain_infllm.config import InfLLMConfig
from langchain_infllm.engine import InfLLMEngine

__all__ = ["clear_engine_registry", "resolve_config", "shared_engine", "torch_dtype"]

logger = logging.getLogger(__name__)

_ENGINES: dict[tuple[str, str, str, str], InfLLMEngine] = {}
_ENGINES_LOCK = threading.Lock()

_DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float": "float32",
    "float32": "float32",
}


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"``, ``"fp16"``... as a torch dtype; None/"auto": the device's best."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    key = _DTYPES.get(name.lower().removeprefix("torch."))
    if key is None:
        raise ValueError(f"dtype {name!r} is not one of bfloat16, float16, float32, auto")
    return getattr(torch, key)


def resolve_config(config: str | Path | InfLLMConfig | None) -> InfLLMConfig:
    """A config object from a YAML path, an object, or None (the defaults)."""
    if isinstance(config, InfLLMConfig):
        return config
    if isinstance(config, str | Path):
        return InfLLMConfig.from_yaml(config)
    return InfLLMConfig.create()


def shared_engine(
    model: str,
    config: InfLLMConfig,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    **kwargs: Any,
) -> InfLLMEngine:
    """The process-wide engine for this model and config, loaded on first use."""
    key = (model, config.model_dump_json(), device or "", str(dtype or ""))
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            logger.info("loading InfLLM engine for %s", model)
            engine = InfLLMEngine.from_pretrained(
                model, config, device=device, dtype=torch_dtype(dtype), **kwargs
            )
            _ENGINES[key] = engine
        return engine


def clear_engine_registry() -> None:
    """Forget the shared engines (they are freed once nothing else holds them)."""
    with _ENGINES_LOCK:
        _ENGINES.clear()
