"""Trace payloads as pure data: no LangChain, no callbacks.

Everything here is a pure function of its inputs and returns JSON-serialisable values
(schema version :data:`SCHEMA_VERSION`, reference ``docs/tracing.md``). The chat core
builds its retrieval summary from it without importing LangChain; ``tracing`` adds the
callback emitters and the collecting handler on top, and ``trace_report`` draws from it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

if TYPE_CHECKING:
    from langchain_infllm.engine.records import RetrievalRecord

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
                "head_block_ids": None
                if record.head_block_ids is None
                else [[int(b) for b in row] for row in record.head_block_ids],
                "scores": [_finite(s) for s in record.scores],
                "block_spans": spans,
                "hits": int(record.hits),
                "misses": int(record.misses),
                "bytes_copied": int(record.bytes_copied),
                "block_texts": [texts(s, e) for s, e in spans] if texts.available else None,
            }
        )
    return payloads


MessageLike = Any
"""A LangChain ``BaseMessage`` or an OpenAI-shaped message dict."""


def _dict_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(
            part if isinstance(part, str) else str(part.get("text", ""))
            for part in content
            if isinstance(part, str) or (isinstance(part, Mapping) and "text" in part)
        )
    return "" if content is None else str(content)


def _dict_calls(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            calls.append({"name": function.get("name"), "args": function.get("arguments")})
    return calls


def message_preview(message: MessageLike, limit: int = DEFAULT_TEXT_CHARS) -> str:
    """Short one-line text of a message; an AI message's tool calls are shown as calls."""
    if isinstance(message, Mapping):
        text = _dict_text(message.get("content"))
        calls: list[Any] = _dict_calls(message)
    else:
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


def _message_identity(message: MessageLike) -> dict[str, Any]:
    if isinstance(message, Mapping):
        role = str(message.get("role") or UNKNOWN_ROLE)
        return {
            "role": {"developer": "system"}.get(role, role),
            "name": message.get("name"),
            "tool_call_id": message.get("tool_call_id"),
        }
    return {
        "role": _ROLES.get(message.type, message.type),
        "name": message.name,
        "tool_call_id": getattr(message, "tool_call_id", None),
    }


def build_message_spans(
    messages: Sequence[MessageLike],
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
