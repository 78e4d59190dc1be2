"""LangChain messages to the chat core's OpenAI-shaped dicts, and a renderer taking them.

The rendering itself (chat template, content escaping, exact-token splices) lives in
``chat_core.prompt``; this module only converts, with
``langchain_core.messages.convert_to_openai_messages``, adding what that conversion
drops and the core needs: the message id (for splices), invalid tool calls (a tool
result may answer one) and a failed tool's status.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    convert_to_openai_messages,
)

from langchain_infllm.chat_core.messages import PromptError, content_text
from langchain_infllm.chat_core.prompt import CODE_BASE, ESC, RenderedPrompt, TokenLookup
from langchain_infllm.chat_core.prompt import PromptRenderer as _CorePromptRenderer

__all__ = [
    "CODE_BASE",
    "ESC",
    "PromptError",
    "PromptRenderer",
    "RenderedPrompt",
    "TokenLookup",
    "message_to_dict",
    "messages_to_dicts",
]

_SUPPORTED = (SystemMessage, HumanMessage, AIMessage, ToolMessage, ChatMessage)
_CHAT_ROLES = {"user", "human", "assistant", "ai", "system", "developer"}


def _role(message: BaseMessage) -> str:
    if isinstance(message, ChatMessage):
        role = message.role.lower()
        return {"human": "user", "ai": "assistant", "developer": "system"}.get(role, role)
    return {"human": "user", "ai": "assistant"}.get(message.type, message.type)


def message_to_dict(message: BaseMessage, index: int = 0) -> dict[str, Any]:
    """One LangChain message as an OpenAI-shaped dict the chat core accepts."""
    if not isinstance(message, _SUPPORTED):
        raise PromptError(
            f"message {index}: {type(message).__name__} (type {message.type!r}) is not "
            "supported; use SystemMessage, HumanMessage, AIMessage or ToolMessage"
        )
    if isinstance(message, ChatMessage) and message.role.lower() not in _CHAT_ROLES:
        raise PromptError(
            f"message {index}: unknown role {message.role!r}; supported roles are "
            "'system', 'user', 'assistant' (use ToolMessage for tool results)"
        )
    # Checked on the original blocks: the conversion renames some (image -> image_url).
    content_text(message.content, index=index, role=_role(message))
    try:
        converted = convert_to_openai_messages(message)
    except Exception as error:  # content blocks of a shape LangChain cannot convert
        raise PromptError(f"message {index}: {error}") from error
    d = dict(converted) if isinstance(converted, Mapping) else {}
    if isinstance(message, AIMessage):
        if message.id:
            d["id"] = message.id
        if message.invalid_tool_calls:
            d["invalid_tool_calls"] = [dict(call) for call in message.invalid_tool_calls]
    elif isinstance(message, ToolMessage) and message.status == "error":
        text = d.get("content")
        if isinstance(text, str) and not text.lstrip().lower().startswith("error"):
            d["content"] = f"Error: {text}"
    return d


def messages_to_dicts(messages: Sequence[BaseMessage | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Convert a conversation (dicts pass through); raises ``PromptError`` naming the
    message at fault."""
    if not messages:
        raise PromptError("no messages: ChatInfLLM needs at least one message")
    return [
        dict(m) if isinstance(m, Mapping) else message_to_dict(m, i) for i, m in enumerate(messages)
    ]


class PromptRenderer(_CorePromptRenderer):
    """The core renderer, also taking LangChain messages (converted first)."""

    def normalize(self, messages: Sequence[Any]) -> list[dict[str, Any]]:
        if isinstance(messages, Sequence) and any(isinstance(m, BaseMessage) for m in messages):
            messages = messages_to_dicts(messages)
        return super().normalize(messages)
