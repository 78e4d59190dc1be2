"""A chat core with no LangChain import: OpenAI-shaped dicts in, typed events out.

Front ends (``ChatInfLLM``, the HTTP server) convert their own message types to plain
dicts, call :meth:`ChatCore.run` / :meth:`ChatCore.arun`, and map the events back.
"""

from langchain_infllm.chat_core.core import ChatCore, TooManySessionsError
from langchain_infllm.chat_core.events import (
    ChatEvent,
    FinishEvent,
    InvalidToolCallEvent,
    RetrievalEvent,
    TextDelta,
    ToolCallEvent,
    UsageEvent,
)
from langchain_infllm.chat_core.messages import ChatInputError, PromptError
from langchain_infllm.chat_core.params import GenerationParams

__all__ = [
    "ChatCore",
    "ChatEvent",
    "ChatInputError",
    "FinishEvent",
    "GenerationParams",
    "InvalidToolCallEvent",
    "PromptError",
    "RetrievalEvent",
    "TextDelta",
    "TooManySessionsError",
    "ToolCallEvent",
    "UsageEvent",
]
