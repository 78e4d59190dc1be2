"""Retrieval tracing: payload functions, callback emission, the collecting handler, report."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid4

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.callbacks.manager import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult

from langchain_infllm.engine.records import RetrievalRecord
from langchain_infllm.tracing import (
    RETRIEVAL_EVENT,
    SCHEMA_VERSION,
    STEP_SUMMARY_EVENT,
    RetrievalTraceHandler,
    TraceLevel,
    aemit_trace_events,
    build_message_spans,
    build_trace_events,
    emit_trace_events,
    map_blocks_to_messages,
    retrieval_event_payloads,
    step_blocks,
    step_summary_payload,
    summarize_retrievals,
)


def rec(
    layer: int,
    q: tuple[int, int],
    blocks: dict[int, tuple[int, int]],
    scores: list[float],
    hits: int,
    misses: int,
    copied: int,
) -> RetrievalRecord:
    return RetrievalRecord(
        layer=layer,
        query_start=q[0],
        query_end=q[1],
        block_ids=tuple(blocks),
        scores=tuple(scores),
        block_spans=tuple(blocks.values()),
        hits=hits,
        misses=misses,
        bytes_copied=copied,
    )


RECORDS = [
    rec(0, (16, 20), {0: (0, 4), 2: (8, 12)}, [1.0, 3.0], 1, 1, 100),
    rec(0, (20, 24), {2: (8, 12), 3: (12, 16)}, [5.0, 2.0], 2, 0, 0),
    rec(1, (16, 20), {0: (0, 4), 2: (8, 12)}, [0.5, 0.25], 0, 2, 200),
]


def decode(ids: Any) -> str:
    return " ".join(f"t{i}" for i in ids)


# ============================================================================ payloads


def test_summarize_retrievals_hand_computed() -> None:
    s = summarize_retrievals(RECORDS, token_ids=list(range(24)), decode=decode)
    assert (s["retrievals"], s["layers_seen"], s["blocks_selected"], s["unique_blocks"]) == (
        3,
        2,
        6,
        3,
    )
    assert (s["cache_hits"], s["cache_misses"], s["bytes_copied"]) == (3, 3, 300)
    assert s["top_blocks"] == [
        {"block": 2, "start": 8, "end": 12, "count": 3, "layers": 2, "text": "t8 t9 t10 t11"},
        {"block": 0, "start": 0, "end": 4, "count": 2, "layers": 2, "text": "t0 t1 t2 t3"},
        {"block": 3, "start": 12, "end": 16, "count": 1, "layers": 1, "text": "t12 t13 t14 t15"},
    ]
    layer0, layer1 = s["layers"]
    assert layer0 == {
        "layer": 0,
        "retrievals": 2,
        "blocks_selected": 4,
        "cache_hits": 3,
        "cache_misses": 1,
        "bytes_copied": 100,
        "top_blocks": [
            {"block": 2, "start": 8, "end": 12, "count": 2, "mean_score": 4.0},
            {"block": 0, "start": 0, "end": 4, "count": 1, "mean_score": 1.0},
            {"block": 3, "start": 12, "end": 16, "count": 1, "mean_score": 2.0},
        ],
    }
    assert layer1["top_blocks"] == [
        {"block": 0, "start": 0, "end": 4, "count": 1, "mean_score": 0.5},
        {"block": 2, "start": 8, "end": 12, "count": 1, "mean_score": 0.25},
    ]
    assert (layer1["cache_misses"], layer1["bytes_copied"]) == (2, 200)
    json.dumps(s, allow_nan=False)


def test_summarize_limits_and_no_text_without_tokenizer() -> None:
    s = summarize_retrievals(RECORDS, top_n=1, max_blocks=2)
    assert [b["block"] for b in s["top_blocks"]] == [2, 0]
    assert all("text" not in b for b in s["top_blocks"])
    assert [len(layer["top_blocks"]) for layer in s["layers"]] == [1, 1]
    empty = summarize_retrievals([])
    assert empty["retrievals"] == 0 and empty["top_blocks"] == [] and empty["layers"] == []


def test_summarize_survives_a_failing_decoder() -> None:
    def broken(ids: Any) -> str:
        raise RuntimeError("tokenizer exploded")

    s = summarize_retrievals(RECORDS, token_ids=list(range(24)), decode=broken)
    assert all("text" not in b for b in s["top_blocks"])
    # spans past the known tokens are not decoded either
    short = summarize_retrievals(RECORDS, token_ids=list(range(10)), decode=decode)
    assert [("text" in b) for b in short["top_blocks"]] == [False, True, False]


def test_retrieval_event_payloads() -> None:
    records = [*RECORDS, rec(2, (24, 25), {5: (20, 24)}, [math.nan], 1, 0, 0)]
    payloads = retrieval_event_payloads(
        records, token_ids=list(range(24)), decode=decode, session_id="s1", step=7
    )
    assert len(payloads) == 4
    assert payloads[0] == {
        "schema_version": SCHEMA_VERSION,
        "session_id": "s1",
        "step": 7,
        "layer": 0,
        "query_start": 16,
        "query_end": 20,
        "block_ids": [0, 2],
        "head_block_ids": None,
        "scores": [1.0, 3.0],
        "block_spans": [[0, 4], [8, 12]],
        "hits": 1,
        "misses": 1,
        "bytes_copied": 100,
        "block_texts": ["t0 t1 t2 t3", "t8 t9 t10 t11"],
    }
    assert payloads[3]["scores"] == [None]
    json.dumps(payloads, allow_nan=False)
    plain = retrieval_event_payloads(RECORDS)
    assert all(p["block_texts"] is None and p["session_id"] is None for p in plain)


def test_block_texts_are_shortened() -> None:
    (p,) = retrieval_event_payloads(
        [RECORDS[0]],
        token_ids=list(range(24)),
        decode=lambda ids: "word  \n" * 50,
        max_text_chars=12,
    )
    assert p["block_texts"] == ["word word w…"] * 2


def messages_fixture() -> list[BaseMessage]:
    return [
        SystemMessage("You are terse."),
        HumanMessage("Find the <b>invoice</b> total"),
        AIMessage("", tool_calls=[{"name": "search", "args": {"q": "invoice"}, "id": "c1"}]),
        ToolMessage("total = 42 EUR", tool_call_id="c1", name="search"),
    ]


def test_build_message_spans_and_step_summary() -> None:
    spans = build_message_spans(messages_fixture(), [(0, 10), (10, 40), (42, 50), (50, 90)])
    assert [(s["index"], s["role"], s["start"], s["end"]) for s in spans] == [
        (0, "system", 0, 10),
        (1, "user", 10, 40),
        (2, "assistant", 42, 50),
        (3, "tool", 50, 90),
    ]
    assert spans[2]["preview"] == "search(q='invoice')"
    assert (spans[3]["tool_call_id"], spans[3]["name"]) == ("c1", "search")
    with pytest.raises(ValueError):
        build_message_spans(messages_fixture(), [(0, 1)])

    payload = step_summary_payload(
        RECORDS,
        session_id="s1",
        step=3,
        prompt_tokens=90,
        tokens_reused=80,
        tokens_computed=10,
        generated_tokens=5,
        blocks_in_memory=4,
        seconds=0.25,
        message_spans=spans,
        extra={"model_name": "m", "step": "ignored"},
    )
    assert payload["schema_version"] == SCHEMA_VERSION
    assert (payload["step"], payload["model_name"], payload["tokens_reused"]) == (3, "m", 80)
    assert payload["cache_misses"] == 3 and payload["message_spans"] == spans
    json.dumps(payload, allow_nan=False)

    assert build_trace_events("off", RECORDS, payload) == []
    assert [n for n, _ in build_trace_events("summary", RECORDS, payload)] == [STEP_SUMMARY_EVENT]
    full = build_trace_events("full", RECORDS, payload)
    assert [n for n, _ in full] == [RETRIEVAL_EVENT] * 3 + [STEP_SUMMARY_EVENT]
    assert full[0][1]["session_id"] == "s1" and full[0][1]["step"] == 3


# ============================================================================ emission


class SyncCollector(BaseCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any, UUID, list[str] | None, dict[str, Any] | None]] = []

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
        self.events.append((name, data, run_id, tags, metadata))


class AsyncCollector(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any, UUID]] = []

    async def on_custom_event(
        self,
        name: str,
        data: Any,
        *,
        run_id: UUID,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        await asyncio.sleep(0)
        self.events.append((name, data, run_id))


def fake_run_manager(handlers: list[BaseCallbackHandler]) -> Any:
    return SimpleNamespace(
        run_id=uuid4(),
        handlers=handlers,
        inheritable_handlers=handlers,
        parent_run_id=uuid4(),
        tags=["agent"],
        inheritable_tags=["agent"],
        metadata={"thread_id": "t1"},
        inheritable_metadata={"thread_id": "t1"},
    )


EVENTS = [(RETRIEVAL_EVENT, {"layer": 0}), (STEP_SUMMARY_EVENT, {"step": 1})]


def test_emit_trace_events_reaches_sync_and_async_handlers() -> None:
    sync, asy = SyncCollector(), AsyncCollector()
    rm = fake_run_manager([sync, asy])
    emit_trace_events(rm, EVENTS)
    assert [(n, d, r) for n, d, r, _, _ in sync.events] == [(n, d, rm.run_id) for n, d in EVENTS]
    assert sync.events[0][3] == ["agent"] and sync.events[0][4] == {"thread_id": "t1"}
    assert asy.events == [(n, d, rm.run_id) for n, d in EVENTS]
    emit_trace_events(None, EVENTS)  # no run manager: nothing happens


async def test_aemit_trace_events_reaches_sync_and_async_handlers() -> None:
    sync, asy = SyncCollector(), AsyncCollector()
    rm = fake_run_manager([sync, asy])
    await aemit_trace_events(rm, EVENTS)
    assert [(n, d, r) for n, d, r, _, _ in sync.events] == [(n, d, rm.run_id) for n, d in EVENTS]
    assert asy.events == [(n, d, rm.run_id) for n, d in EVENTS]
    await aemit_trace_events(None, EVENTS)


class TracingFakeChat(BaseChatModel):
    """Emits trace events the way ChatInfLLM is meant to (10 prompt tokens per message)."""

    level: TraceLevel = "full"

    @property
    def _llm_type(self) -> str:
        return "tracing-fake"

    def _payload(self, messages: list[BaseMessage]) -> tuple[dict[str, Any], list[RetrievalRecord]]:
        offsets = [(10 * i, 10 * i + 10) for i in range(len(messages))]
        records = [
            rec(
                0,
                (10 * len(messages) - 4, 10 * len(messages)),
                {0: (0, 4), 1: (12, 16)},
                [1.0, 2.0],
                1,
                1,
                64,
            )
        ]
        summary = step_summary_payload(
            records,
            session_id="s",
            step=len(messages),
            prompt_tokens=10 * len(messages),
            tokens_reused=0,
            tokens_computed=10 * len(messages),
            generated_tokens=2,
            blocks_in_memory=2,
            seconds=0.01,
            message_spans=build_message_spans(messages, offsets),
        )
        return summary, records

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        summary, records = self._payload(messages)
        emit_trace_events(run_manager, build_trace_events(self.level, records, summary))
        message = AIMessage("ok", response_metadata={"infllm": summary})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        summary, _ = self._payload(messages)
        yield ChatGenerationChunk(message=AIMessageChunk(content="o"))
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="k", response_metadata={"infllm": summary}, chunk_position="last"
            )
        )


def test_handler_through_a_real_chat_model_invoke_and_stream() -> None:
    handler = RetrievalTraceHandler()
    model = TracingFakeChat()
    model.invoke(messages_fixture()[:2], config={"callbacks": [handler]})
    list(model.stream(messages_fixture(), config={"callbacks": [handler]}))
    first, second = handler.steps
    assert first.summary_source == "event" and len(first.retrievals) == 1
    assert second.summary_source == "response_metadata" and second.retrievals == []
    assert second.summary is not None and second.summary["prompt_tokens"] == 40
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "tool"]
    # block (0,4) lies in message 0, block (12,16) in message 1
    assert [(r["index"], r["count"]) for r in handler.recalled_messages(1)] == [(0, 1), (1, 1)]


async def test_astream_events_carry_custom_events_on_the_model_run() -> None:
    # Not streaming: the base class hands _generate a run manager, so the event is sent
    # on the model's own run (no parent run needed, unlike dispatch_custom_event).
    model = TracingFakeChat(level="summary", disable_streaming=True)
    events = [e async for e in model.astream_events(messages_fixture()[:2], version="v2")]
    assert [e["event"] for e in events] == [
        "on_chat_model_start",
        "on_custom_event",
        "on_chat_model_end",
    ]
    assert events[1]["name"] == STEP_SUMMARY_EVENT
    assert events[1]["run_id"] == events[0]["run_id"]
    data: Any = events[1]["data"]
    assert data["message_spans"][1]["role"] == "user"
    # Streaming: _stream gets no run manager, so only the last chunk's metadata carries it.
    streaming = TracingFakeChat(level="summary")
    events = [e async for e in streaming.astream_events(messages_fixture()[:2], version="v2")]
    assert "on_custom_event" not in [e["event"] for e in events]
    end = events[-1]
    assert end["event"] == "on_chat_model_end"
    assert end["data"]["output"].response_metadata["infllm"]["prompt_tokens"] == 20
    handler = RetrievalTraceHandler()
    await model.ainvoke(messages_fixture()[:2], config={"callbacks": [handler]})
    (step,) = handler.steps
    assert step.summary_source == "event" and step.summary is not None


# ============================================================================ mapping


SPANS = [
    {"index": 0, "role": "system", "start": 0, "end": 10},
    {"index": 1, "role": "user", "start": 10, "end": 40, "preview": "question"},
    {"index": 2, "role": "assistant", "start": 42, "end": 50},
    {"index": 3, "role": "tool", "tool_call_id": "c1", "name": "search", "start": 50, "end": 90},
]
BLOCKS = [
    {"start": 0, "end": 16, "count": 4},  # system 10 tokens, user 6 tokens
    {"start": 16, "end": 32, "count": 2},  # user
    {"start": 32, "end": 48, "count": 1},  # user 8, template gap 2, assistant 6
    {"start": 80, "end": 96, "count": 3},  # tool 10, this call's output 6
]


def test_map_blocks_to_messages_hand_computed() -> None:
    got = map_blocks_to_messages(BLOCKS, SPANS, prompt_tokens=90)
    assert [(g["role"], g["index"], g["count"], g["tokens"]) for g in got] == [
        ("user", 1, 7, 30),
        ("system", 0, 4, 10),
        ("tool", 3, 3, 10),
        ("generated", None, 3, 6),
        ("assistant", 2, 1, 6),
        ("unknown", None, 1, 2),
    ]
    assert got[0]["blocks"] == [[0, 16], [16, 32], [32, 48]]
    assert got[2]["tool_call_id"] == "c1" and got[0]["preview"] == "question"


def test_map_blocks_without_spans_falls_back_to_unknown() -> None:
    got = map_blocks_to_messages(BLOCKS, None)
    assert [(g["role"], g["count"], g["tokens"]) for g in got] == [("unknown", 10, 64)]
    split = map_blocks_to_messages(BLOCKS, [], prompt_tokens=90)
    assert [(g["role"], g["count"]) for g in split] == [("unknown", 10), ("generated", 3)]


def test_handler_maps_spans_to_captured_messages() -> None:
    handler = RetrievalTraceHandler()
    run = uuid4()
    handler.on_chat_model_start({}, [messages_fixture()], run_id=run, metadata={"thread_id": "th"})
    retrieval = {"schema_version": 1, "block_spans": [[0, 16], [16, 32]], "block_ids": [0, 1]}
    for _ in range(2):
        handler.on_custom_event(RETRIEVAL_EVENT, retrieval, run_id=run)
    handler.on_custom_event(RETRIEVAL_EVENT, {"block_spans": [[80, 96]]}, run_id=run)
    handler.on_custom_event("something.else", {"x": 1}, run_id=run)
    handler.on_custom_event(
        STEP_SUMMARY_EVENT,
        {"schema_version": 1, "prompt_tokens": 90, "message_spans": SPANS},
        run_id=run,
    )
    (step,) = handler.steps
    assert step.thread_id == "th" and len(step.retrievals) == 3
    assert step_blocks(step.to_dict()) == [
        {"start": 0, "end": 16, "count": 2},
        {"start": 16, "end": 32, "count": 2},
        {"start": 80, "end": 96, "count": 1},
    ]
    recalled = handler.recalled_messages(0)
    assert [(r["role"], r["count"]) for r in recalled] == [
        ("user", 4),
        ("system", 2),
        ("tool", 1),
        ("generated", 1),
    ]
    # preview missing from the span comes from on_chat_model_start's message
    assert recalled[1]["preview"] == "You are terse."
    assert recalled[0]["preview"] == "question"

    # a second, streamed step: only response_metadata, no message_spans -> "unknown"
    run2 = uuid4()
    handler.on_chat_model_start({}, [messages_fixture()], run_id=run2)
    meta = {"prompt_tokens": 90, "top_blocks": [{"start": 0, "end": 16, "count": 5}]}
    handler.on_llm_end(
        LLMResult(
            generations=[
                [
                    ChatGenerationChunk(
                        message=AIMessageChunk(content="x", response_metadata={"infllm": meta})
                    )
                ]
            ]
        ),
        run_id=run2,
    )
    assert [(r["role"], r["count"]) for r in handler.recalled_messages(1)] == [("unknown", 5)]
    # an unknown run ending with no infllm metadata does not create a step
    handler.on_llm_end(
        LLMResult(generations=[[ChatGeneration(message=AIMessage("y"))]]), run_id=uuid4()
    )
    assert len(handler.steps) == 2
    data = handler.to_dict()
    assert data["schema_version"] == 1 and len(data["steps"]) == 2
    assert data["steps"][0]["recalled_messages"][0]["role"] == "user"
    json.dumps(data, allow_nan=False)


def test_event_summary_wins_over_metadata_and_errors_are_kept() -> None:
    handler = RetrievalTraceHandler()
    run = uuid4()
    handler.on_chat_model_start({}, [messages_fixture()], run_id=run)
    handler.on_custom_event(STEP_SUMMARY_EVENT, {"prompt_tokens": 90, "step": 1}, run_id=run)
    handler.on_llm_end(
        LLMResult(
            generations=[
                [
                    ChatGeneration(
                        message=AIMessage(
                            "x", response_metadata={"infllm": {"prompt_tokens": 1, "extra": True}}
                        )
                    )
                ]
            ]
        ),
        run_id=run,
    )
    (step,) = handler.steps
    assert step.summary == {"prompt_tokens": 90, "step": 1, "extra": True}
    run2 = uuid4()
    handler.on_chat_model_start({}, [messages_fixture()], run_id=run2)
    handler.on_llm_error(RuntimeError("boom"), run_id=run2)
    assert handler.steps[1].error == "RuntimeError: boom"


# ============================================================================ report


def synthetic_agent_trace(n_steps: int = 12, seed: int = 0) -> RetrievalTraceHandler:
    """A handler fed through its callbacks as an agent run of growing history would."""
    rng = random.Random(seed)
    handler = RetrievalTraceHandler()
    messages: list[BaseMessage] = [
        SystemMessage("You are an agent. <system & rules>"),
        HumanMessage("Summarise the <report> & cite sources"),
    ]
    tokens_per_message, block = 96, 32
    for step in range(n_steps):
        run = uuid4()
        handler.on_chat_model_start({}, [list(messages)], run_id=run)
        prompt = tokens_per_message * len(messages)
        n_blocks = prompt // block
        records = []
        hot = {0, 1, n_blocks // 3, n_blocks - 2}  # sinks-adjacent and a favourite
        for layer in range(4):
            for chunk in range(3):
                chosen = sorted(
                    {
                        *rng.sample(range(n_blocks), min(3, n_blocks)),
                        *(b for b in hot if 0 <= b < n_blocks),
                    }
                )
                records.append(
                    rec(
                        layer,
                        (prompt - 3 + chunk, prompt - 2 + chunk),
                        {b: (b * block, b * block + block) for b in chosen},
                        [rng.random() for _ in chosen],
                        rng.randint(0, 3),
                        rng.randint(0, 2),
                        rng.randint(0, 4) << 16,
                    )
                )
        offsets = [
            (tokens_per_message * i, tokens_per_message * (i + 1)) for i in range(len(messages))
        ]
        summary = step_summary_payload(
            records,
            session_id="thread-1",
            step=step,
            prompt_tokens=prompt,
            tokens_reused=max(0, prompt - 2 * tokens_per_message),
            tokens_computed=min(prompt, 2 * tokens_per_message),
            generated_tokens=24,
            blocks_in_memory=n_blocks,
            seconds=0.05 * (step + 1),
            message_spans=build_message_spans(messages, offsets),
            token_ids=list(range(prompt)),
            decode=lambda ids: f"<tok {ids[0]}..{ids[-1]}>",
        )
        for name, data in build_trace_events("full" if step % 2 else "summary", records, summary):
            handler.on_custom_event(name, data, run_id=run)
        call_id = f"call_{step}"
        messages.append(
            AIMessage("", tool_calls=[{"name": "lookup", "args": {"page": step}, "id": call_id}])
        )
        messages.append(
            ToolMessage(
                f"page {step}: <script>alert({step})</script>", tool_call_id=call_id, name="lookup"
            )
        )
    return handler


def test_save_report_writes_html_and_png(tmp_path: Path) -> None:
    handler = synthetic_agent_trace(6)
    out = handler.save_report(tmp_path / "sub" / "trace.html")
    assert out == tmp_path / "sub" / "trace.html"
    png = (tmp_path / "sub" / "trace.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    page = out.read_text(encoding="utf-8")
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded is not None and base64.b64decode(embedded.group(1)) == png
    assert "<script>alert(" not in page  # user text is escaped everywhere
    assert "&lt;script&gt;alert(" in page and "&lt;system &amp; rules&gt;" in page
    assert "http://" not in page and "https://" not in page  # self-contained
    assert page.count("<tr>") >= 6 + 1
    data = re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page, re.S)
    assert data is not None and len(json.loads(data.group(1))["steps"]) == 6


def test_report_marks_planted_facts(tmp_path: Path) -> None:
    """Fact markers are listed (escaped) and drawn: the picture changes where they sit."""
    handler = synthetic_agent_trace(6)
    plain = handler.save_report(tmp_path / "plain.html")
    marked = handler.save_report(tmp_path / "marked.html",
                                 markers=[("cat -> <Juniper>", 40, 90), ("code -> 1234", 200, 230)])
    page = marked.read_text(encoding="utf-8")
    assert "F1: tokens 40-90: cat -&gt; &lt;Juniper&gt;" in page
    assert "F2: tokens 200-230" in page and 'id="markers"' in page
    assert 'id="markers"' not in plain.read_text(encoding="utf-8")
    assert (tmp_path / "plain.png").read_bytes() != (tmp_path / "marked.png").read_bytes()


def test_report_with_no_steps(tmp_path: Path) -> None:
    from langchain_infllm.trace_report import save_report

    out = save_report({"steps": []}, tmp_path / "empty.html")
    assert out.exists() and (tmp_path / "empty.png").stat().st_size > 1000
    assert "no retrievals recorded" in out.read_text(encoding="utf-8")


def test_heat_matrix_counts() -> None:
    from langchain_infllm.trace_report import heat_matrix, hottest_blocks

    steps = [
        {
            "index": 0,
            "summary": {"prompt_tokens": 8, "top_blocks": [{"start": 0, "end": 4, "count": 2}]},
        },
        {
            "index": 1,
            "summary": {"prompt_tokens": 16, "message_spans": SPANS[:2]},
            "retrievals": [{"block_spans": [[0, 4], [8, 12]]}, {"block_spans": [[0, 4]]}],
        },
    ]
    matrix, width, total = heat_matrix(steps, max_bins=4)
    assert (width, total) == (4.0, 16)
    assert matrix[0, :2].tolist() == [2.0, 0.0] and all(math.isnan(v) for v in matrix[0, 2:])
    assert matrix[1].tolist() == [2.0, 0.0, 1.0, 0.0]
    hot = hottest_blocks({"steps": steps})
    assert [(h["start"], h["count"], h["steps"]) for h in hot] == [(0, 4, [0, 1]), (8, 1, [1])]
    assert hot[0]["messages"][0]["role"] == "system"
