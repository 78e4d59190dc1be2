"""langchain-infllm: a LangChain chat model on a persistent InfLLM engine.

The engine (`InfLLMEngine`, `Session`) imports no LangChain; `ChatInfLLM` and the
tracing handler are imported lazily so `import langchain_infllm` stays light.
"""

from typing import Any

from langchain_infllm.config import ConfigError, InfLLMConfig
from langchain_infllm.engine import (
    ContextLimitError,
    EngineOutOfMemoryError,
    InfLLMEngine,
    RetrievalRecord,
    Session,
    SessionFileError,
    StepResult,
    UnsupportedModelError,
)

__version__ = "0.1.0"

_LAZY = {
    "ChatInfLLM": "langchain_infllm.chat_models",
    "RetrievalTraceHandler": "langchain_infllm.tracing",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'langchain_infllm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "ChatInfLLM",
    "ConfigError",
    "ContextLimitError",
    "EngineOutOfMemoryError",
    "InfLLMConfig",
    "InfLLMEngine",
    "RetrievalRecord",
    "RetrievalTraceHandler",
    "Session",
    "SessionFileError",
    "StepResult",
    "UnsupportedModelError",
    "__version__",
]
