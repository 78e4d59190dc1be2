"""``ChatCore``: OpenAI-shaped messages in, typed events out, on a persistent engine."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_infllm.chat_core.events import ChatEvent
from langchain_infllm.chat_core.params import GenerationParams

if TYPE_CHECKING:
    from langchain_infllm.config import InfLLMConfig
    from langchain_infllm.engine import InfLLMEngine

__all__ = ["ChatCore"]

DEFAULT_PARAMS = GenerationParams()
"""Frozen, so one shared default is safe."""


class ChatCore:
    """One engine, many sessions; renders, syncs, generates and parses a chat turn."""

    def __init__(self, engine: InfLLMEngine, *, max_sessions: int | None = None) -> None:
        raise NotImplementedError

    @classmethod
    def from_model(
        cls, model: str, config: str | Path | InfLLMConfig | None = None, **engine_kwargs: Any
    ) -> ChatCore:
        raise NotImplementedError

    @property
    def model_name(self) -> str:
        raise NotImplementedError

    def run(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        params: GenerationParams = DEFAULT_PARAMS,
        session_id: str | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[ChatEvent]:
        raise NotImplementedError

    async def arun(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        params: GenerationParams = DEFAULT_PARAMS,
        session_id: str | None = None,
        cancel: threading.Event | None = None,
    ) -> AsyncIterator[ChatEvent]:
        raise NotImplementedError
        yield

    def session_ids(self) -> list[str]:
        raise NotImplementedError

    def spill_all(self) -> None:
        raise NotImplementedError
