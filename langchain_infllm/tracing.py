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

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

from langchain_core.callbacks import (
    AsyncCallbackManager,
    BaseCallbackHandler,
    CallbackManager,
)

if TYPE_CHECKING:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
    )
    from langchain_core.messages import BaseMessage
    from langchain_core.outputs import LLMResult

    from langchain_infllm.engine.records import RetrievalRecord

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

SCHEMA_VERSION = 1
"""Version of the payload schema; bumped on any incompatible change (see docs/tracing.md)."""
RETRIEVAL_EVENT = "infllm.retrieval"
"""Custom event sent once per retrieval record at trace level ``full``."""
STEP_SUMMARY_EVENT = "infllm.step_summary"
"""Custom event sent once per model call at trace levels ``summary`` and ``full``."""
EVENT_NAMES = (RETRIEVAL_EVENT, STEP_SUMMARY_EVENT)

TraceLevel = Literal["off", "summary", "full"]
Decode = Callable[[Sequence[int]], str]
"""Turns token ids into text, e.g. ``lambda ids: tokenizer.decode(ids)``."""

DEFAULT_TOP_N = 5
DEFAULT_MAX_BLOCKS = 32
DEFAULT_TEXT_CHARS = 80
UNKNOWN_ROLE = "unknown"
GENERATED_ROLE = "generated"

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


# ============================================================================ helpers


def _shorten(text: str, limit: int) -> str:
    """Collapse whitespace and cut to ``limit`` characters (an ellipsis marks the cut)."""
    flat = " ".join(text.split())
    if limit <= 0:
        return ""
    return flat if len(flat) <= limit else flat[: max(0, limit - 1)] + "…"


def _finite(value: float) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


class _BlockTexts:
    """Decodes each distinct token span once per call; silent when it cannot decode."""

    def __init__(self, token_ids: Sequence[int] | None, decode: Decode | None, limit: int) -> None:
        self.token_ids = token_ids
        self.decode = decode
        self.limit = limit
        self._memo: dict[tuple[int, int], str | None] = {}

    @property
    def available(self) -> bool:
        return self.token_ids is not None and self.decode is not None

    def __call__(self, start: int, end: int) -> str | None:
        if self.token_ids is None or self.decode is None:
            return None
        key = (start, end)
        if key not in self._memo:
            text: str | None = None
            if 0 <= start <= end <= len(self.token_ids):
                try:
                    ids = [int(t) for t in self.token_ids[start:end]]
                    text = _shorten(str(self.decode(ids)), self.limit)
                except Exception:  # a tokenizer quirk must never break a model call
                    text = None
            self._memo[key] = text
        return self._memo[key]


def _block_entry(block: int, span: tuple[int, int], count: int) -> dict[str, Any]:
    return {"block": block, "start": span[0], "end": span[1], "count": count}


def _ranked(counts: Counter[int]) -> list[tuple[int, int]]:
    """(block, count) by count descending, then block id ascending (deterministic)."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


# ============================================================================ payloads


def summarize_retrievals(
    records: Sequence[RetrievalRecord],
    *,
    token_ids: Sequence[int] | None = None,
    decode: Decode | None = None,
    top_n: int = DEFAULT_TOP_N,
    max_blocks: int = DEFAULT_MAX_BLOCKS,
    max_text_chars: int = DEFAULT_TEXT_CHARS,
) -> dict[str, Any]:
    """Digest of one call's retrieval records (the retrieval part of a step summary).

    A *selection* is one block chosen by one record (one layer, one execution chunk);
    counts below are selections. Returns::

        {"retrievals", "layers_seen", "blocks_selected", "unique_blocks",
         "cache_hits", "cache_misses", "bytes_copied",
         "top_blocks": [{"block", "start", "end", "count", "layers", "text"?}],
         "layers": [{"layer", "retrievals", "blocks_selected", "cache_hits",
                     "cache_misses", "bytes_copied",
                     "top_blocks": [{"block", "start", "end", "count", "mean_score"}]}]}

    ``top_blocks`` holds the ``max_blocks`` most selected blocks over all layers; each
    layer lists its ``top_n``. ``text`` (a short decoded excerpt) is present only when
    both ``token_ids`` (the session's tokens) and ``decode`` are given.
    """
    texts = _BlockTexts(token_ids, decode, max_text_chars)
    overall: Counter[int] = Counter()
    spans: dict[int, tuple[int, int]] = {}
    block_layers: dict[int, set[int]] = {}
    per_layer: dict[int, dict[str, Any]] = {}
    hits = misses = copied = 0
    for record in records:
        layer = int(record.layer)
        entry = per_layer.setdefault(
            layer,
            {
                "retrievals": 0,
                "hits": 0,
                "misses": 0,
                "bytes": 0,
                "counts": Counter(),
                "scores": {},
                "spans": {},
            },
        )
        entry["retrievals"] += 1
        entry["hits"] += int(record.hits)
        entry["misses"] += int(record.misses)
        entry["bytes"] += int(record.bytes_copied)
        hits += int(record.hits)
        misses += int(record.misses)
        copied += int(record.bytes_copied)
        scores = [*record.scores, *[math.nan] * (len(record.block_ids) - len(record.scores))]
        selected = zip(record.block_ids, record.block_spans, scores, strict=False)
        for block_id, span, score in selected:
            block = int(block_id)
            pair = (int(span[0]), int(span[1]))
            overall[block] += 1
            spans[block] = pair
            block_layers.setdefault(block, set()).add(layer)
            entry["counts"][block] += 1
            entry["spans"][block] = pair
            if math.isfinite(float(score)):
                entry["scores"].setdefault(block, []).append(float(score))

    top_blocks = []
    for block, count in _ranked(overall)[: max(0, max_blocks)]:
        item = _block_entry(block, spans[block], count)
        item["layers"] = len(block_layers[block])
        text = texts(*spans[block])
        if text is not None:
            item["text"] = text
        top_blocks.append(item)

    layers = []
    for layer in sorted(per_layer):
        entry = per_layer[layer]
        tops = []
        for block, count in _ranked(entry["counts"])[: max(0, top_n)]:
            item = _block_entry(block, entry["spans"][block], count)
            scores_seen = entry["scores"].get(block)
            item["mean_score"] = (
                _finite(sum(scores_seen) / len(scores_seen)) if scores_seen else None
            )
            tops.append(item)
        layers.append(
            {
                "layer": layer,
                "retrievals": entry["retrievals"],
                "blocks_selected": sum(entry["counts"].values()),
                "cache_hits": entry["hits"],
                "cache_misses": entry["misses"],
                "bytes_copied": entry["bytes"],
                "top_blocks": tops,
            }
        )

    return {
        "retrievals": len(records),
        "layers_seen": len(per_layer),
        "blocks_selected": sum(overall.values()),
        "unique_blocks": len(overall),
        "cache_hits": hits,
        "cache_misses": misses,
        "bytes_copied": copied,
        "top_blocks": top_blocks,
        "layers": layers,
    }


def retrieval_event_payloads(
    records: Sequence[RetrievalRecord],
    *,
    token_ids: Sequence[int] | None = None,
    decode: Decode | None = None,
    session_id: str | None = None,
    step: int | None = None,
    max_text_chars: int = DEFAULT_TEXT_CHARS,
) -> list[dict[str, Any]]:
    """One ``infllm.retrieval`` payload per record, in record order.

    ``block_texts`` is a list (one short decoded excerpt per block, ``null`` where a span
    cannot be decoded) when ``token_ids`` and ``decode`` are given, else ``null``.
    Non-finite scores become ``null`` so the payload is strict JSON.
    """
    texts = _BlockTexts(token_ids, decode, max_text_chars)
    payloads = []
    for record in records:
        spans = [[int(s), int(e)] for s, e in record.block_spans]
        payloads.append(
            {
                "schema_version": SCHEMA_VERSION,
                "session_id": session_id,
                "step": step,
                "layer": int(record.layer),
                "query_start": int(record.query_start),
                "query_end": int(record.query_end),
                "block_ids": [int(b) for b in record.block_ids],
                "head_block_ids": None if record.head_block_ids is None else [
                    [int(b) for b in row] for row in record.head_block_ids],
                "scores": [_finite(s) for s in record.scores],
                "block_spans": spans,
                "hits": int(record.hits),
                "misses": int(record.misses),
                "bytes_copied": int(record.bytes_copied),
                "block_texts": [texts(s, e) for s, e in spans] if texts.available else None,
            }
        )
    return payloads


def message_preview(message: BaseMessage, limit: int = DEFAULT_TEXT_CHARS) -> str:
    """Short one-line text of a message; an AI message's tool calls are shown as calls."""
    try:
        text = str(message.text)
    except Exception:  # content blocks of an unexpected shape
        text = str(message.content)
    calls = getattr(message, "tool_calls", None) or []
    rendered = [f"{c.get('name', '?')}({_compact_args(c.get('args'))})" for c in calls]
    if rendered:
        text = (text + " " if text else "") + " ".join(rendered)
    return _shorten(text, limit)


def _compact_args(args: Any) -> str:
    if isinstance(args, Mapping):
        return ", ".join(f"{k}={v!r}" for k, v in args.items())
    return "" if args is None else repr(args)


def _message_identity(message: BaseMessage) -> dict[str, Any]:
    return {
        "role": _ROLES.get(message.type, message.type),
        "name": message.name,
        "tool_call_id": getattr(message, "tool_call_id", None),
    }


def build_message_spans(
    messages: Sequence[BaseMessage],
    offsets: Sequence[tuple[int, int] | None],
    *,
    preview_chars: int = DEFAULT_TEXT_CHARS,
) -> list[dict[str, Any]]:
    """``message_spans`` for a step summary: where each input message sits in the prompt.

    ``offsets[i]`` is the token range ``[start, end)`` that message ``i`` occupies in the
    rendered prompt (template tokens of the turn included or not, as the chat model
    prefers; be consistent), or ``None`` for a message that rendered to nothing.
    """
    if len(offsets) != len(messages):
        raise ValueError(f"{len(offsets)} offsets for {len(messages)} messages")
    spans = []
    for index, (message, offset) in enumerate(zip(messages, offsets, strict=True)):
        if offset is None:
            continue
        start, end = int(offset[0]), int(offset[1])
        if not 0 <= start <= end:
            raise ValueError(f"message {index}: bad token range [{start}, {end})")
        spans.append(
            {
                "index": index,
                **_message_identity(message),
                "start": start,
                "end": end,
                "preview": message_preview(message, preview_chars),
            }
        )
    return spans


def _normalise_spans(spans: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for span in spans:
        index = span.get("index")
        out.append(
            {
                "index": None if index is None else int(index),
                "role": str(span.get("role") or UNKNOWN_ROLE),
                "name": span.get("name"),
                "tool_call_id": span.get("tool_call_id"),
                "start": int(span["start"]),
                "end": int(span["end"]),
                "preview": str(span.get("preview") or ""),
            }
        )
    return out


def step_summary_payload(
    records: Sequence[RetrievalRecord],
    *,
    session_id: str | None,
    step: int | None,
    prompt_tokens: int,
    tokens_reused: int,
    tokens_computed: int,
    generated_tokens: int,
    blocks_in_memory: int,
    seconds: float,
    message_spans: Iterable[Mapping[str, Any]] | None = None,
    token_ids: Sequence[int] | None = None,
    decode: Decode | None = None,
    top_n: int = DEFAULT_TOP_N,
    max_blocks: int = DEFAULT_MAX_BLOCKS,
    max_text_chars: int = DEFAULT_TEXT_CHARS,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``infllm.step_summary`` payload of one model call.

    ``step`` is the session's own call counter (the handler numbers steps itself);
    ``message_spans`` (see :func:`build_message_spans`) lets a handler map recalled
    blocks back to messages. ``extra`` (e.g. ``model_name``) is copied in first, so it
    cannot override the schema's own keys.
    """
    payload: dict[str, Any] = dict(extra or {})
    payload.update(
        {
            "schema_version": SCHEMA_VERSION,
            "session_id": session_id,
            "step": step,
            "prompt_tokens": int(prompt_tokens),
            "tokens_reused": int(tokens_reused),
            "tokens_computed": int(tokens_computed),
            "generated_tokens": int(generated_tokens),
            "blocks_in_memory": int(blocks_in_memory),
            "seconds": round(float(seconds), 6),
        }
    )
    payload.update(
        summarize_retrievals(
            records,
            token_ids=token_ids,
            decode=decode,
            top_n=top_n,
            max_blocks=max_blocks,
            max_text_chars=max_text_chars,
        )
    )
    if message_spans is not None:
        payload["message_spans"] = _normalise_spans(message_spans)
    return payload


def build_trace_events(
    level: TraceLevel,
    records: Sequence[RetrievalRecord],
    summary: Mapping[str, Any],
    *,
    token_ids: Sequence[int] | None = None,
    decode: Decode | None = None,
    max_text_chars: int = DEFAULT_TEXT_CHARS,
) -> list[tuple[str, dict[str, Any]]]:
    """The (name, payload) pairs one call emits at ``level``; the summary comes last."""
    if level == "off":
        return []
    events: list[tuple[str, dict[str, Any]]] = []
    if level == "full":
        events.extend(
            (RETRIEVAL_EVENT, payload)
            for payload in retrieval_event_payloads(
                records,
                token_ids=token_ids,
                decode=decode,
                session_id=summary.get("session_id"),
                step=summary.get("step"),
                max_text_chars=max_text_chars,
            )
        )
    elif level != "summary":
        raise ValueError(f"unknown trace level {level!r}")
    events.append((STEP_SUMMARY_EVENT, dict(summary)))
    return events


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


# ============================================================================ mapping


def step_blocks(step: Mapping[str, Any]) -> list[dict[str, int]]:
    """Blocks recalled at one step as ``{"start", "end", "count"}``, merged by span.

    Uses the step's ``infllm.retrieval`` payloads when it has any (every block), else its
    summary's ``top_blocks`` (the most selected ones only). ``step`` is a
    :meth:`TraceStep.to_dict` result or anything with the same keys.
    """
    counts: Counter[tuple[int, int]] = Counter()
    retrievals = step.get("retrievals") or []
    if retrievals:
        for payload in retrievals:
            for span in payload.get("block_spans") or []:
                counts[(int(span[0]), int(span[1]))] += 1
    else:
        summary = step.get("summary") or {}
        for block in summary.get("top_blocks") or []:
            counts[(int(block["start"]), int(block["end"]))] += int(block.get("count", 0))
    return [
        {"start": s, "end": e, "count": c}
        for (s, e), c in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    ]


def map_blocks_to_messages(
    blocks: Sequence[Mapping[str, Any]],
    message_spans: Sequence[Mapping[str, Any]] | None,
    *,
    prompt_tokens: int | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Attribute recalled blocks to the messages whose token ranges they overlap.

    A block adds its ``count`` to every message it overlaps. Tokens of a block outside
    every span go to a ``"generated"`` entry when they lie at or after ``prompt_tokens``
    (the call's own output), else to an ``"unknown"`` entry (template tokens, or no
    ``message_spans`` at all). Previews missing from the spans are taken from
    ``messages`` (as captured from ``on_chat_model_start``) by index. Result is sorted
    by count (descending), then by position.
    """
    spans = _normalise_spans(message_spans or [])
    spans.sort(key=lambda s: (s["start"], s["end"]))
    by_index = {m.get("index"): m for m in messages or []}
    found: dict[Any, dict[str, Any]] = {}

    def bucket(key: Any, template: Mapping[str, Any]) -> dict[str, Any]:
        if key not in found:
            found[key] = {**template, "count": 0, "tokens": 0, "blocks": []}
        return found[key]

    for block in blocks:
        start, end, count = int(block["start"]), int(block["end"]), int(block.get("count", 1))
        covered = 0
        for span in spans:
            lo, hi = max(start, span["start"]), min(end, span["end"])
            if lo >= hi:
                continue
            covered += hi - lo
            template = dict(span)
            if not template["preview"] and span["index"] in by_index:
                template["preview"] = str(by_index[span["index"]].get("preview") or "")
            entry = bucket(("span", span["index"], span["start"]), template)
            entry["count"] += count
            entry["tokens"] += hi - lo
            entry["blocks"].append([start, end])
        rest = (end - start) - covered
        if rest <= 0:
            continue
        generated = 0
        if prompt_tokens is not None and end > prompt_tokens:
            generated = min(rest, end - max(start, prompt_tokens))
        for role, tokens in ((GENERATED_ROLE, generated), (UNKNOWN_ROLE, rest - generated)):
            if tokens <= 0:
                continue
            entry = bucket(
                role,
                {
                    "index": None,
                    "role": role,
                    "name": None,
                    "tool_call_id": None,
                    "start": None,
                    "end": None,
                    "preview": "",
                },
            )
            entry["count"] += count
            entry["tokens"] += tokens
            entry["blocks"].append([start, end])
    return sorted(
        found.values(),
        key=lambda e: (-e["count"], e["start"] if e["start"] is not None else math.inf),
    )


# ============================================================================ handler


def jsonable(value: Any) -> Any:
    """A JSON-safe copy: UUIDs and unknown objects as strings, non-finite floats as None."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return str(value)


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

    def save_report(
        self, path: str | Path, markers: Sequence[tuple[str, int, int]] = ()
    ) -> Path:
        """Write the HTML report (and ``<stem>.png``); returns the HTML path.

        ``markers``: ``(label, start, end)`` history spans to highlight (planted facts).
        """
        from langchain_infllm.trace_report import save_report

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
