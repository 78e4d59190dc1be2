"""OpenAI-shaped message and tool dicts: validated and normalised before anything runs.

Everything here raises a :class:`ChatInputError` (a ``ValueError``) naming the message
or tool at fault, and touches no session: a bad request changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ChatInputError",
    "PromptError",
    "normalize_messages",
    "normalize_tool_choice",
    "normalize_tools",
    "template_message",
]


class ChatInputError(ValueError):
    """The request cannot be run; the message says what is wrong with it."""


class PromptError(ChatInputError):
    """The messages cannot be rendered; the message says which one and why."""


# Content-part types that carry text we render.
_TEXT_PARTS = {"text", "text-plain", "input_text", "output_text"}
# Parts of an assistant message that are represented elsewhere (``tool_calls``) or that a
# non-reasoning template cannot show; they are dropped from the rendered text.
_ASSISTANT_SKIPPED_PARTS = {
    "tool_use",
    "tool_call",
    "tool_call_chunk",
    "invalid_tool_call",
    "server_tool_call",
    "server_tool_call_chunk",
    "server_tool_result",
    "thinking",
    "reasoning",
    "redacted_thinking",
}
_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "system": "system",
    "developer": "system",
    "tool": "tool",
}


def content_text(content: Any, *, index: int, role: str) -> str:
    """Text of a message's content (a string or a list of parts); media raise."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise PromptError(
            f"message {index} ({role}): content must be a string or a list of parts, "
            f"got {type(content).__name__}"
        )
    parts: list[str] = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise PromptError(
                f"message {index} ({role}): content items must be strings or dicts, "
                f"got {type(part).__name__}"
            )
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            parts.append(str(part.get("text", "")))
        elif role == "assistant" and kind in _ASSISTANT_SKIPPED_PARTS:
            continue
        else:
            raise PromptError(
                f"message {index} ({role}): content block of type {kind!r} is not supported; "
                "ChatInfLLM accepts text only (no images, audio, files or other media)"
            )
    return "".join(parts)


def _arguments(raw: Any) -> dict[str, Any]:
    """Call arguments as the dict templates expect (a JSON string is decoded)."""
    if isinstance(raw, Mapping):
        return dict(raw)
    if isinstance(raw, str) and raw.strip():
        try:
            value = json.loads(raw)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    return {}


def _tool_calls(calls: Any, index: int) -> list[dict[str, Any]]:
    if calls is None:
        return []
    if isinstance(calls, Mapping | str) or not isinstance(calls, Sequence):
        raise PromptError(f"message {index} (assistant): tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise PromptError(
                f"message {index} (assistant): tool_calls[{j}] has no 'function' object"
            )
        name = function.get("name")
        if not isinstance(name, str):
            raise PromptError(f"message {index} (assistant): tool_calls[{j}] has no name")
        out.append(
            {
                "id": str(call.get("id") or ""),
                "type": "function",
                "function": {"name": name, "arguments": _arguments(function.get("arguments"))},
            }
        )
    return out


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated messages in one canonical shape: ``role`` (system/user/assistant/tool),
    ``content`` as text, assistant ``tool_calls`` with dict arguments, ``tool_call_id``.

    Optional keys kept: ``id`` (an assistant message's id, for the exact-token splice),
    ``name``, and ``invalid_tool_calls`` (ids a tool result may answer; not rendered).
    """
    if isinstance(messages, Mapping | str) or not isinstance(messages, Sequence):
        raise PromptError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise PromptError("no messages: ChatInfLLM needs at least one message")
    out: list[dict[str, Any]] = []
    asked: set[str] = set()
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise PromptError(f"message {index}: expected a dict, got {type(message).__name__}")
        raw_role = message.get("role")
        role = _ROLE_ALIASES.get(raw_role.lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise PromptError(
                f"message {index}: unknown role {raw_role!r}; supported roles are "
                "'system', 'user', 'assistant', 'tool'"
            )
        d: dict[str, Any] = {
            "role": role,
            "content": content_text(message.get("content"), index=index, role=role),
        }
        if role == "assistant":
            calls = _tool_calls(message.get("tool_calls"), index)
            if calls:
                d["tool_calls"] = calls
            invalid = [dict(c) for c in message.get("invalid_tool_calls") or []]
            if invalid:
                d["invalid_tool_calls"] = invalid
            for call in [*calls, *invalid]:
                if call.get("id"):
                    asked.add(str(call["id"]))
            if message.get("id"):
                d["id"] = str(message["id"])
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in asked:
                raise PromptError(
                    f"message {index} (tool): tool_call_id {call_id!r} answers no tool call "
                    "of an earlier assistant message"
                )
            d["tool_call_id"] = call_id
        if role != "assistant" and isinstance(message.get("name"), str) and message["name"]:
            d["name"] = message["name"]
        out.append(d)
    return out


def template_message(d: Mapping[str, Any]) -> dict[str, Any]:
    """A normalised message as the chat template sees it (bookkeeping keys dropped)."""
    return {k: v for k, v in d.items() if k not in ("id", "invalid_tool_calls")}


def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """OpenAI tool dicts (``{"type": "function", "function": {"name", ...}}``), each with
    a non-empty, unique name; a bare function dict is wrapped."""
    if tools is None:
        return []
    if isinstance(tools, Mapping | str) or not isinstance(tools, Sequence):
        raise ChatInputError(f"tools must be a list of tools, got {type(tools).__name__}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatInputError(f"tools[{i}] is not a tool: expected a dict")
        function = tool.get("function") if "function" in tool else tool
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name.strip():
            raise ChatInputError(f"tools[{i}] has no name (a tool needs a non-empty string name)")
        if name in seen:
            raise ChatInputError(f"tools[{i}]: the tool name {name!r} is used twice")
        seen.add(name)
        params = function.get("parameters") if isinstance(function, Mapping) else None
        if params is not None and not isinstance(params, Mapping):
            raise ChatInputError(f"tools[{i}] ({name}): parameters must be a JSON schema object")
        assert isinstance(function, Mapping)
        out.append({"type": "function", "function": dict(function)})
    return out


def normalize_tool_choice(choice: Any, names: Sequence[str]) -> str | None:
    """``None``/"auto", "none", "required" (alias "any", True) or a bound tool's name
    (also as OpenAI's ``{"type": "function", "function": {"name": ...}}``)."""
    if choice is None:
        return None
    if choice is True:
        choice = "required"
    elif choice is False:
        choice = "none"
    if isinstance(choice, Mapping):
        inner = choice.get("function") if isinstance(choice.get("function"), Mapping) else choice
        name = inner.get("name") if isinstance(inner, Mapping) else None
        if not isinstance(name, str):
            raise ChatInputError(f"tool_choice {choice!r} names no tool")
        choice = name
    if not isinstance(choice, str):
        raise ChatInputError(f"tool_choice must be a string, dict or bool, got {choice!r}")
    if choice in ("auto", "none"):
        return choice
    if choice in ("any", "required"):
        if not names:
            raise ChatInputError(f"tool_choice={choice!r} needs at least one tool")
        return "required"
    if not names:
        raise ChatInputError(f"tool_choice={choice!r} needs tools")
    if choice not in names:
        raise ChatInputError(f"tool_choice {choice!r} is not one of the bound tools {list(names)}")
    return choice
