"""Retrieval tracing: event payloads, callback emission and a collecting handler.

The engine records which memory blocks every layer attended for every execution chunk
(:class:`~langchain_infllm.engine.records.RetrievalRecord`). This module turns those
records into JSON-serialisable payloads, sends them as LangChain custom events tied to
the chat model's own run, and collects them again on the other side
(:class:`RetrievalTraceHandler`) so a user can ask which messages of the history the
model recalled at each agent step.

Two events exist (schema version :data:`SCHEMA_VERSION`; ``docs/tracing.md`` is the
reference):

* ``infllm.retrieval`` (trace level ``full``): one per retrieval record.
* ``infllm.step_summary`` (trace levels ``summary`` and ``full``): one per model call.

Everything here except the handler and the emitters is a pure function of its inputs;
no payload holds a tensor or any other non-JSON value.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import (
    AsyncCallbackManager,
    BaseCallbackHandler,
    CallbackManager,
)

from langchain_infllm.trace_data import (
    DEFAULT_TEXT_CHARS,
    EVENT_NAMES,
    RETRIEVAL_EVENT,
    SCHEMA_VERSION,
    STEP_SUMMARY_EVENT,
    TraceLevel,
    _message_identity,
    build_message_spans,
    build_trace_events,
    jsonable,
    map_blocks_to_messages,
    message_preview,
    retrieval_event_payloads,
    step_blocks,
    step_summary_payload,
    summarize_retrievals,
)
from langchain_infllm.trace_report import save_report

if TYPE_CHECKING:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
    )
    from langchain_core.messages import BaseMessage
    from langchain_core.outputs import LLMResult

__all__ = [
    "EVENT_NAMES",
    "RETRIEVAL_EVENT",
    "SCHEMA_VERSION",
    "STEP_SUMMARY_EVENT",
    "RetrievalTraceHandler",
    "TraceLevel",
    "TraceStep",
    "aemit_trace_events",
    "build_message_spans",
    "build_trace_events",
    "emit_trace_events",
    "jsonable",
    "map_blocks_to_messages",
    "message_preview",
    "retrieval_event_payloads",
    "step_blocks",
    "step_summary_payload",
    "summarize_retrievals",
]


# ============================================================================ emission


def _manager_kwargs(run_manager: Any) -> dict[str, Any]:
    return {
        "handlers": run_manager.handlers,
        "inheritable_handlers": run_manager.inheritable_handlers,
        "parent_run_id": run_manager.parent_run_id,
        "tags": run_manager.tags,
        "inheritable_tags": run_manager.inheritable_tags,
        "metadata": run_manager.metadata,
        "inheritable_metadata": run_manager.inheritable_metadata,
    }


def emit_trace_events(
    run_manager: CallbackManagerForLLMRun | None,
    payloads: Sequence[tuple[str, Mapping[str, Any]]],
) -> None:
    """Send custom events on the chat model's own run (``run_id=run_manager.run_id``).

    Unlike ``dispatch_custom_event`` (which attributes events to the *parent* run and
    raises without one) this builds a ``CallbackManager`` from the run manager's own
    handlers, tags and metadata. A ``None`` run manager or an empty list does nothing.
    """
    if run_manager is None or not payloads or not run_manager.handlers:
        return
    manager = CallbackManager(**_manager_kwargs(run_manager))
    for name, data in payloads:
        manager.on_custom_event(name, dict(data), run_id=run_manager.run_id)


async def aemit_trace_events(
    run_manager: AsyncCallbackManagerForLLMRun | None,
    payloads: Sequence[tuple[str, Mapping[str, Any]]],
) -> None:
    """Async twin of :func:`emit_trace_events` (uses an ``AsyncCallbackManager``)."""
    if run_manager is None or not payloads or not run_manager.handlers:
        return
    manager = AsyncCallbackManager(**_manager_kwargs(run_manager))
    for name, data in payloads:
        await manager.on_custom_event(name, dict(data), run_id=run_manager.run_id)


# ============================================================================ handler


@dataclass
class TraceStep:
    """One chat-model call seen by a :class:`RetrievalTraceHandler`."""

    index: int
    run_id: str
    parent_run_id: str | None = None
    tags: list[str] = field(default_factory=list)
    thread_id: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    summary_source: str | None = None  # "event" or "response_metadata"
    retrievals: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    started_at: float | None = None
    ended_at: float | None = None

    def blocks(self) -> list[dict[str, int]]:
        return step_blocks(self.to_dict(derived=False))

    def recalled_messages(self) -> list[dict[str, Any]]:
        summary = self.summary or {}
        return map_blocks_to_messages(
            self.blocks(),
            summary.get("message_spans"),
            prompt_tokens=summary.get("prompt_tokens"),
            messages=self.messages,
        )

    def to_dict(self, *, derived: bool = True) -> dict[str, Any]:
        data = {
            "index": self.index,
            "run_id": self.run_id,
            "parent_run_id": self.parent_run_id,
            "tags": list(self.tags),
            "thread_id": self.thread_id,
            "messages": [dict(m) for m in self.messages],
            "summary": None if self.summary is None else dict(self.summary),
            "summary_source": self.summary_source,
            "retrievals": [dict(r) for r in self.retrievals],
            "error": self.error,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
        }
        if derived:
            data["recalled_messages"] = self.recalled_messages()
        return data


class RetrievalTraceHandler(BaseCallbackHandler):
    """Collects InfLLM retrieval traces over a whole agent run, one step per model call.

    Pass it in ``config={"callbacks": [handler]}``. It listens to

    * ``on_chat_model_start``: opens a step and keeps a preview of each input message;
    * ``on_custom_event`` for ``infllm.retrieval`` / ``infllm.step_summary``;
    * ``on_llm_end``: reads ``response_metadata["infllm"]`` of the (possibly streamed,
      aggregated) message, so summaries arrive even where no custom event was sent.

    Steps are numbered in the order their runs were first seen.
    """

    def __init__(self, *, preview_chars: int = DEFAULT_TEXT_CHARS) -> None:
        super().__init__()
        self.preview_chars = preview_chars
        self._lock = threading.RLock()
        self._steps: list[TraceStep] = []
        self._by_run: dict[str, TraceStep] = {}

    # ------------------------------------------------------------------ access
    @property
    def steps(self) -> list[TraceStep]:
        with self._lock:
            return list(self._steps)

    def step(self, step: int) -> TraceStep:
        with self._lock:
            return self._steps[step]

    def recalled_messages(self, step: int) -> list[dict[str, Any]]:
        """Which messages were recalled at step ``step``, most selected first."""
        return self.step(step).recalled_messages()

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            steps = [s.to_dict() for s in self._steps]
        return {"schema_version": SCHEMA_VERSION, "kind": "infllm.trace", "steps": steps}

    def save_report(self, path: str | Path, markers: Sequence[tuple[str, int, int]] = ()) -> Path:
        """Write the HTML report (and ``<stem>.png``); returns the HTML path.

        ``markers``: ``(label, start, end)`` history spans to highlight (planted facts).
        """
        return save_report(self.to_dict(), path, markers=markers)

    def clear(self) -> None:
        with self._lock:
            self._steps.clear()
            self._by_run.clear()

    # --------------------------------------------------------------- internals
    def _step_for(self, run_id: UUID | str, parent_run_id: UUID | str | None = None) -> TraceStep:
        key = str(run_id)
        with self._lock:
            step = self._by_run.get(key)
            if step is None:
                step = TraceStep(
                    index=len(self._steps),
                    run_id=key,
                    parent_run_id=None if parent_run_id is None else str(parent_run_id),
                )
                self._steps.append(step)
                self._by_run[key] = step
            return step

    # --------------------------------------------------------------- callbacks
    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        captured = [
            {
                "index": i,
                **_message_identity(message),
                "preview": message_preview(message, self.preview_chars),
            }
            for i, message in enumerate(messages[0] if messages else [])
        ]
        thread = (metadata or {}).get("thread_id")
        with self._lock:
            step = self._step_for(run_id, parent_run_id)
            step.messages = captured
            step.tags = list(tags or [])
            step.thread_id = None if thread is None else str(thread)
            step.started_at = time.time()

    def on_custom_event(
        self,
        name: str,
        data: Any,
        *,
        run_id: UUID,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if name not in EVENT_NAMES or not isinstance(data, Mapping):
            return
        payload = jsonable(data)
        with self._lock:
            step = self._step_for(run_id)
            if name == RETRIEVAL_EVENT:
                step.retrievals.append(payload)
            else:
                step.summary = {**(step.summary or {}), **payload}
                step.summary_source = "event"

    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        found: Mapping[str, Any] | None = None
        for generations in response.generations:
            for generation in generations:
                message = getattr(generation, "message", None)
                meta = getattr(message, "response_metadata", None) or {}
                if isinstance(meta.get("infllm"), Mapping):
                    found = meta["infllm"]
                    break
            if found is not None:
                break
        with self._lock:
            if found is None and str(run_id) not in self._by_run:
                return  # not a run this handler has seen start, and nothing to record
            step = self._step_for(run_id, parent_run_id)
            step.ended_at = time.time()
            if found is None:
                return
            # An event's summary wins over the metadata copy; the metadata fills gaps.
            if step.summary_source == "event" and step.summary is not None:
                step.summary = {**jsonable(found), **step.summary}
            else:
                step.summary = jsonable(found)
                step.summary_source = "response_metadata"

    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        with self._lock:
            step = self._step_for(run_id, parent_run_id)
            step.error = f"{type(error).__name__}: {error}"
            step.ended_at = time.time()
