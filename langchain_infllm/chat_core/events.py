"""Typed events a chat turn yields, in order: text, tool calls, usage, retrieval, finish."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ChatEvent",
    "FinishEvent",
    "InvalidToolCallEvent",
    "RetrievalEvent",
    "TextDelta",
    "ToolCallEvent",
    "UsageEvent",
]


@dataclass(frozen=True)
class TextDelta:
    """A piece of the assistant's visible text, as soon as it decodes to whole characters."""

    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """A tool call parsed from the output, arguments already decoded."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class InvalidToolCallEvent:
    """A tool call the model tried to make but whose name or arguments do not parse."""

    id: str
    name: str | None
    arguments: str
    error: str


@dataclass(frozen=True)
class UsageEvent:
    """Token counts of the turn: ``cached_tokens`` of the prompt were reused, not computed."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class RetrievalEvent:
    """What the context memory did during the turn (reuse, blocks, retrievals, cache)."""

    summary: dict[str, Any]
    records: tuple[Any, ...] = field(default=(), repr=False, compare=False)
    """The engine's ``RetrievalRecord``s of the turn (for trace events)."""
    token_ids: tuple[int, ...] = field(default=(), repr=False, compare=False)
    """The session's tokens after the turn, only when the engine traces (block texts)."""
    message_spans: tuple[dict[str, Any], ...] = field(default=(), repr=False, compare=False)
    """Where each input message sits in the prompt, with previews (when tracing)."""


@dataclass(frozen=True)
class FinishEvent:
    """Last event of a turn: ``"stop"``, ``"length"`` or ``"tool_calls"``."""

    reason: str


ChatEvent = (
    TextDelta | ToolCallEvent | InvalidToolCallEvent | UsageEvent | RetrievalEvent | FinishEvent
)
