"""The InfLLM engine: context memory, attention hook, sessions. Imports no LangChain."""

from langchain_infllm.engine.architectures import SUPPORTED_MODEL_TYPES, UnsupportedModelError
from langchain_infllm.engine.budget import DeviceMemoryError
from langchain_infllm.engine.engine import InfLLMEngine
from langchain_infllm.engine.persistence import SessionFileError
from langchain_infllm.engine.records import RetrievalRecord, StepResult
from langchain_infllm.engine.session import ContextLimitError, EngineOutOfMemoryError, Session

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ContextLimitError",
    "DeviceMemoryError",
    "EngineOutOfMemoryError",
    "InfLLMEngine",
    "RetrievalRecord",
    "Session",
    "SessionFileError",
    "StepResult",
    "UnsupportedModelError",
]
