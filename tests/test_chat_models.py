"""ChatInfLLM behaviour on the real engine with a tiny random Qwen2 and the real Qwen tokenizer.

The tiny model's output is noise, so tests that need particular output (tool calls,
structured output) script the sampled tokens: the engine session still consumes them
through its real ``append``, only the choice of token is fixed.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from pydantic import BaseModel

from langchain_infllm import InfLLMConfig, InfLLMEngine
from langchain_infllm.chat_models import ChatInfLLM, clear_engine_registry
from langchain_infllm.chat_prompt import PromptError, PromptRenderer
from langchain_infllm.chat_sessions import (
    DEFAULT_SESSION_ID,
    GeneratedTokenStore,
    message_fingerprint,
    thread_session_key,
)
from langchain_infllm.tracing import STEP_SUMMARY_EVENT
from tests.shared_configs import TINY_CHAT_CONFIG
from tests.tiny_models import tiny_chat_qwen2

pytestmark = pytest.mark.real_model  # the Qwen tokenizer comes with the embedded model

EMBEDDED = "qwen2.5-coder-0.5b-instruct"
LONG_TEXT = " ".join(f"fact {i}: the box number {i} holds {i * 7 % 13} apples." for i in range(40))


def make_engine(
    tokenizer: Any, config: InfLLMConfig = TINY_CHAT_CONFIG, seed: int = 0
) -> InfLLMEngine:
    model = tiny_chat_qwen2(len(tokenizer), seed)
    return InfLLMEngine(model, tokenizer, config, model_name="tiny-qwen2")


@pytest.fixture
def engine(qwen_tokenizer: Any) -> InfLLMEngine:
    return make_engine(qwen_tokenizer)


@pytest.fixture
def llm(engine: InfLLMEngine) -> ChatInfLLM:
    return ChatInfLLM(engine=engine, model="tiny-qwen2", max_tokens=12)


@pytest.fixture
def sllm(engine: InfLLMEngine) -> ChatInfLLM:
    """A chat model with room for the scripted replies."""
    return ChatInfLLM(engine=engine, model="tiny-qwen2", max_tokens=64)


def usage(message: BaseMessage) -> dict[str, Any]:
    assert isinstance(message, AIMessage)
    assert message.usage_metadata is not None
    return dict(message.usage_metadata)


def cache_read(message: BaseMessage) -> int:
    return int(usage(message)["input_token_details"]["cache_read"])


def session_of(message: AIMessage | AIMessageChunk) -> str:
    return str(message.response_metadata["infllm"]["session_id"])


# ----------------------------------------------------------------------------- construction


def test_construction_is_lazy_and_engines_are_shared(
    monkeypatch: pytest.MonkeyPatch, engine: InfLLMEngine
) -> None:
    loads: list[str] = []

    def fake_from_pretrained(name: str, config: Any, device: Any = None, dtype: Any = None) -> Any:
        loads.append(name)
        return engine

    monkeypatch.setattr(InfLLMEngine, "from_pretrained", staticmethod(fake_from_pretrained))
    clear_engine_registry()
    a = ChatInfLLM(model="some-model", infllm_config=TINY_CHAT_CONFIG)
    b = ChatInfLLM(model="some-model", infllm_config=TINY_CHAT_CONFIG, temperature=0.5)
    assert loads == []
    assert a.get_engine() is b.get_engine() is engine
    assert loads == ["some-model"]
    ChatInfLLM(model="other", infllm_config=TINY_CHAT_CONFIG).get_engine()
    assert loads == ["some-model", "other"]
    clear_engine_registry()


def test_yaml_config_names_the_model() -> None:
    llm = ChatInfLLM(infllm_config="config/cpu-small.yaml")
    assert llm.model == EMBEDDED
    assert llm.resolved_config.n_local == 1024


def test_construction_errors(engine: InfLLMEngine) -> None:
    with pytest.raises(ValueError, match="needs `model`"):
        ChatInfLLM()
    with pytest.raises(ValueError, match="differs"):
        ChatInfLLM(engine=engine, infllm_config=InfLLMConfig.create(n_local=2048))
    with pytest.raises(ValueError, match="stop sequences must be strings"):
        ChatInfLLM(engine=engine, stop=[1])
    with pytest.raises(ValueError, match="temperature"):
        ChatInfLLM(engine=engine, temperature=-1)


def test_identity_and_profile(engine: InfLLMEngine) -> None:
    llm = ChatInfLLM(engine=engine, model="tiny-qwen2", max_tokens=5, stop=["x"])
    params = llm._get_ls_params()
    assert params["ls_provider"] == "infllm"
    assert params["ls_model_name"] == "tiny-qwen2"
    assert params["ls_max_tokens"] == 5
    assert params["ls_stop"] == ["x"]
    assert llm._get_ls_params(model="override")["ls_model_name"] == "override"
    assert llm._llm_type == "infllm-chat"
    assert llm._identifying_params["infllm_config"]["n_local"] == 64
    profile = llm.profile or {}
    assert profile["tool_calling"] and profile["tool_choice"]
    assert profile["structured_output"] is False
    assert profile["image_inputs"] is False
    assert "max_input_tokens" not in profile
    limited = ChatInfLLM(model="m", infllm_config=InfLLMConfig.create(max_context=4000))
    assert (limited.profile or {})["max_input_tokens"] == 4000
    assert ChatInfLLM(engine=engine).model_name == "tiny-qwen2"


# ----------------------------------------------------------------------------- generation


def test_invoke_reports_usage_and_metadata(llm: ChatInfLLM) -> None:
    result = llm.invoke([SystemMessage("be brief"), HumanMessage("hello")])
    assert isinstance(result, AIMessage)
    assert result.id
    usage = result.usage_metadata
    assert usage is not None
    details = usage["input_token_details"]
    assert details["cache_read"] + details["cache_creation"] == usage["input_tokens"]
    assert usage["output_tokens"] <= 12
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    meta = result.response_metadata
    assert meta["model_name"] == "tiny-qwen2"
    assert meta["model_provider"] == "infllm"
    assert meta["finish_reason"] in ("stop", "length")
    summary = meta["infllm"]
    assert summary["session_id"] == DEFAULT_SESSION_ID
    assert summary["tokens_generated"] == usage["output_tokens"]
    assert summary["context_tokens"] == usage["total_tokens"]
    json.dumps(summary)


def test_agent_history_is_never_recomputed(llm: ChatInfLLM, engine: InfLLMEngine) -> None:
    history: list[Any] = [SystemMessage("You answer briefly."), HumanMessage("first question")]
    previous_total = 0
    for step in range(4):
        reply = llm.invoke(history, session_id="agent")
        usage = reply.usage_metadata
        assert usage is not None
        if step:
            # Everything the session held after the previous call is reused.
            assert usage["input_token_details"]["cache_read"] == previous_total
            assert reply.response_metadata["infllm"]["tokens_spliced"] > 0
        previous_total = usage["total_tokens"]
        history += [reply, HumanMessage(f"follow-up {step}")]
    assert len(engine.session("agent")) == previous_total


def test_spliced_tokens_are_the_generated_ones(llm: ChatInfLLM, engine: InfLLMEngine) -> None:
    prompt = [HumanMessage("tell me something")]
    reply = llm.invoke(prompt, session_id="s")
    generated = engine.session("s").token_ids
    llm.invoke([*prompt, reply, HumanMessage("and?")], session_id="s")
    assert engine.session("s").token_ids[: len(generated)] == generated


def test_edited_message_is_rendered_not_spliced(llm: ChatInfLLM) -> None:
    prompt = [HumanMessage("tell me something")]
    reply = llm.invoke(prompt, session_id="e")
    total = usage(reply)["total_tokens"]
    edited = AIMessage(content="an edited answer", id=reply.id)
    again = llm.invoke([*prompt, edited, HumanMessage("and?")], session_id="e")
    assert again.response_metadata["infllm"]["tokens_spliced"] == 0
    assert cache_read(again) < total


def test_message_without_id_is_spliced_by_content(llm: ChatInfLLM) -> None:
    prompt = [HumanMessage("tell me something")]
    reply = llm.invoke(prompt, session_id="c")
    copy_without_id = AIMessage(content=reply.content)
    again = llm.invoke([*prompt, copy_without_id, HumanMessage("and?")], session_id="c")
    assert cache_read(again) == (usage(reply)["total_tokens"])


def test_stream_matches_invoke_and_puts_metadata_last(
    qwen_tokenizer: Any,
) -> None:
    prompt = [HumanMessage("count with me")]
    invoked = ChatInfLLM(engine=make_engine(qwen_tokenizer), max_tokens=12).invoke(prompt)
    llm = ChatInfLLM(engine=make_engine(qwen_tokenizer), max_tokens=12)
    chunks = list(llm.stream(prompt))
    assert chunks[-1].chunk_position == "last"
    assert all(c.usage_metadata is None for c in chunks[:-1])
    assert all("infllm" not in c.response_metadata for c in chunks[:-1])
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.text == invoked.text
    assert full.usage_metadata is not None
    assert usage(full)["output_tokens"] == usage(invoked)["output_tokens"]
    assert full.response_metadata["finish_reason"] == invoked.response_metadata["finish_reason"]
    assert len({c.id for c in chunks}) == 1


def test_streaming_flag_routes_invoke_through_stream(llm: ChatInfLLM) -> None:
    streaming = llm.model_copy(update={"streaming": True})
    tokens: list[str] = []

    class Collect(BaseCallbackHandler):
        def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
            tokens.append(str(token))

    result = streaming.invoke("hi", config={"callbacks": [Collect()]})
    assert result.usage_metadata is not None
    assert "".join(tokens) == result.text


def test_stream_closed_early_leaves_session_consistent(
    llm: ChatInfLLM, engine: InfLLMEngine
) -> None:
    stream: Any = llm.stream("go on", session_id="early", max_tokens=30)
    next(stream)
    stream.close()
    session = engine.session("early")
    assert len(session) == len(session.token_ids)
    again = llm.invoke("go on", session_id="early")
    assert cache_read(again) > 0


def test_max_tokens_and_finish_reason(llm: ChatInfLLM) -> None:
    result = llm.invoke("hi", max_tokens=3)
    assert usage(result)["output_tokens"] <= 3
    if usage(result)["output_tokens"] == 3:
        assert result.response_metadata["finish_reason"] == "length"


def test_stop_sequences(sllm: ChatInfLLM, scripted: list[str]) -> None:
    scripted.extend(["Hello there, friend. Bye."] * 3)
    stopped = sllm.invoke("hi", stop=["friend", "zzz"])
    assert stopped.text == "Hello there, "
    assert stopped.response_metadata["finish_reason"] == "stop"
    chunks = list(sllm.stream("hi", stop=["friend"]))
    assert "".join(c.text for c in chunks) == "Hello there, "
    field_stop = sllm.model_copy(update={"stop": ["Bye"]}).invoke("hi")
    assert field_stop.text == "Hello there, friend. "


def test_sampling_is_seeded(llm: ChatInfLLM) -> None:
    a = llm.invoke("hi", temperature=1.0, seed=7, session_id="a").text
    b = llm.invoke("hi", temperature=1.0, seed=7, session_id="b").text
    assert a == b


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("messages", "kwargs", "match"),
    [
        ([], {}, "at least one message"),
        ([ChatMessage(role="wizard", content="hi")], {}, "unknown role 'wizard'"),
        (
            [HumanMessage([{"type": "image", "base64": "AAAA", "mime_type": "image/png"}])],
            {},
            "type 'image' is not supported",
        ),
        (
            [
                HumanMessage(
                    [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]
                )
            ],
            {},
            "text only",
        ),
        ([HumanMessage("hi")], {"stop": [3]}, "stop sequences must be strings"),
        ([HumanMessage("hi")], {"stop": 3}, "stop must be a list"),
        ([HumanMessage("hi")], {"temperature": -0.5}, "temperature"),
        ([HumanMessage("hi")], {"tool_choice": "any"}, "at least one tool"),
    ],
)
def test_bad_input_is_refused_and_session_untouched(
    llm: ChatInfLLM, engine: InfLLMEngine, messages: list[Any], kwargs: dict[str, Any], match: str
) -> None:
    llm.invoke("warm up", session_id="bad")
    before = engine.session("bad").token_ids
    with pytest.raises(ValueError, match=match):
        llm.invoke(messages, session_id="bad", **kwargs)
    assert engine.session("bad").token_ids == before


def test_prompt_over_max_context_is_refused(qwen_tokenizer: Any, engine: InfLLMEngine) -> None:
    limited = make_engine(qwen_tokenizer, TINY_CHAT_CONFIG.model_copy(update={"max_context": 200}))
    llm = ChatInfLLM(engine=limited, max_tokens=4)
    llm.invoke("short", session_id="m")
    before = limited.session("m").token_ids
    with pytest.raises(ValueError, match="max_context is 200"):
        llm.invoke(LONG_TEXT, session_id="m")
    assert limited.session("m").token_ids == before
    # Generation stops at the limit instead of overflowing it.
    result = ChatInfLLM(engine=limited, max_tokens=500).invoke("short", session_id="n")
    assert usage(result)["total_tokens"] <= 200


def test_unsupported_message_class(llm: ChatInfLLM) -> None:
    from langchain_core.messages import FunctionMessage

    with pytest.raises(ValueError, match="FunctionMessage"):
        llm.invoke([FunctionMessage(content="x", name="f")])


# ----------------------------------------------------------------------------- sessions


def test_session_choice_precedence(llm: ChatInfLLM) -> None:
    assert session_of(llm.invoke("hi")) == DEFAULT_SESSION_ID
    assert session_of(llm.invoke("hi", session_id="kw")) == "kw"
    configured: Any = {"configurable": {"session_id": "cfg"}}
    assert session_of(llm.invoke("hi", config=configured)) == "cfg"
    assert session_of(llm.model_copy(update={"session_id": "field"}).invoke("hi")) == "field"
    assert (
        session_of(llm.model_copy(update={"session_id": "field"}).invoke("hi", config=configured))
        == "cfg"
    )
    thread: Any = {"configurable": {"thread_id": "t1", "checkpoint_ns": "model:1f2e3d"}}
    assert session_of(llm.invoke("hi", config=thread)) == "thread:t1|model"
    chunks = list(llm.stream("hi", config=thread))
    assert session_of(chunks[-1]) == "thread:t1|model"


def test_thread_session_key_drops_task_ids() -> None:
    assert thread_session_key({"thread_id": "t"}) == "thread:t"
    assert thread_session_key({"thread_id": "t", "checkpoint_ns": "agent:abc|model:def"}) == (
        "thread:t|agent|model"
    )
    assert thread_session_key({"checkpoint_ns": "model:1"}) is None


def test_langgraph_thread_selects_session(llm: ChatInfLLM) -> None:
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import END, START, MessagesState, StateGraph

    def call_model(state: MessagesState) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("model", call_model)
    builder.add_edge(START, "model")
    builder.add_edge("model", END)
    graph = builder.compile(checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "th"}}
    first = graph.invoke({"messages": [HumanMessage("hi")]}, config)["messages"][-1]
    second = graph.invoke({"messages": [HumanMessage("again")]}, config)["messages"][-1]
    assert session_of(first) == session_of(second) == "thread:th|model"
    assert cache_read(second) == (usage(first)["total_tokens"])


def test_token_store_lru_and_fingerprints() -> None:
    store = GeneratedTokenStore(max_messages=2)
    messages = [AIMessage(content=f"m{i}", id=f"id{i}") for i in range(3)]
    for i, message in enumerate(messages):
        store.remember(message, [i])
    assert store.lookup(messages[0]) is None
    assert store.lookup(messages[2]) == (2,)
    assert store.lookup(AIMessage(content="m1")) == (1,)  # by content, without id
    assert store.lookup(AIMessage(content="changed", id="id1")) is None
    assert message_fingerprint(AIMessage(content=" x ")) == message_fingerprint(
        AIMessage(content="x")
    )


def test_concurrent_calls_on_one_session(llm: ChatInfLLM, engine: InfLLMEngine) -> None:
    results: list[AIMessage] = []
    errors: list[BaseException] = []

    def work(text: str) -> None:
        try:
            results.append(llm.invoke(text, session_id="shared"))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(f"question {i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 3
    session = engine.session("shared")
    assert len(session) == len(session.token_ids)


def test_batch(llm: ChatInfLLM) -> None:
    results = llm.batch(["Hello", "Hey"])
    assert len(results) == 2
    assert all(isinstance(r, AIMessage) for r in results)


# ----------------------------------------------------------------------------- async


async def test_ainvoke_and_astream_match_sync(qwen_tokenizer: Any) -> None:
    prompt = [HumanMessage("count with me")]
    expected = ChatInfLLM(engine=make_engine(qwen_tokenizer), max_tokens=10).invoke(prompt)
    result = await ChatInfLLM(engine=make_engine(qwen_tokenizer), max_tokens=10).ainvoke(prompt)
    assert result.text == expected.text
    assert result.usage_metadata == expected.usage_metadata
    chunks = [
        c
        async for c in ChatInfLLM(engine=make_engine(qwen_tokenizer), max_tokens=10).astream(prompt)
    ]
    assert chunks[-1].chunk_position == "last"
    assert "".join(c.text for c in chunks) == expected.text


async def test_async_generation_does_not_block_the_event_loop(llm: ChatInfLLM) -> None:
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await llm.ainvoke(LONG_TEXT, max_tokens=10)
    async for _ in llm.astream("more", max_tokens=10):
        pass
    done.set()
    await task
    assert ticks > 10


async def test_astream_abandoned_leaves_session_consistent(
    llm: ChatInfLLM, engine: InfLLMEngine
) -> None:
    stream: Any = llm.astream("go", session_id="abandon", max_tokens=40)
    await stream.__anext__()
    await stream.aclose()
    result = await llm.ainvoke("go", session_id="abandon")  # waits for the worker's lock
    assert isinstance(result, AIMessage)
    session = engine.session("abandon")
    assert len(session) == len(session.token_ids)


# ----------------------------------------------------------------------------- events


class _EventCollector(BaseCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any, UUID]] = []
        self.llm_runs: list[UUID] = []

    def on_chat_model_start(
        self, serialized: Any, messages: Any, *, run_id: UUID, **kw: Any
    ) -> None:
        self.llm_runs.append(run_id)

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.events.append((name, data, run_id))


def test_retrieval_summary_event_on_the_model_run(llm: ChatInfLLM) -> None:
    handler = _EventCollector()
    result = llm.invoke(LONG_TEXT, config={"callbacks": [handler]})
    assert [name for name, _, _ in handler.events] == [STEP_SUMMARY_EVENT]
    _, payload, run_id = handler.events[0]
    assert run_id == handler.llm_runs[0]
    assert payload["retrievals"] > 0 and payload["blocks_selected"] > 0
    assert payload["session_id"] == DEFAULT_SESSION_ID
    assert payload["tokens_computed"] == usage(result)["input_tokens"]
    top = payload["top_blocks"][0]
    assert top["end"] > top["start"] and top["text"]
    # One message (the user turn) covering its tokens inside the prompt.
    (span,) = payload["message_spans"]
    assert span["role"] == "user" and 0 <= span["start"] < span["end"] <= payload["prompt_tokens"]
    json.dumps(payload)
    summary = result.response_metadata["infllm"]
    assert summary["retrievals"] == payload["retrievals"]
    assert summary["blocks_in_memory"] > 0
    assert summary["message_spans"][0]["end"] == span["end"]


async def test_retrieval_summary_event_async(llm: ChatInfLLM) -> None:
    handler = _EventCollector()
    await llm.ainvoke(LONG_TEXT, config={"callbacks": [handler]})
    assert [name for name, _, _ in handler.events] == [STEP_SUMMARY_EVENT]
    assert handler.events[0][2] == handler.llm_runs[0]


# ----------------------------------------------------------------------------- tools


@tool
def get_weather(location: str) -> str:
    """Get the weather at a location."""
    return f"It is sunny in {location}."


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>'


def test_tool_calls_are_parsed(sllm: ChatInfLLM, scripted: list[str]) -> None:
    scripted.append(CALL)
    result = sllm.bind_tools([get_weather, add]).invoke("weather in Paris?")
    assert result.tool_calls == [
        {
            "name": "get_weather",
            "args": {"location": "Paris"},
            "id": result.tool_calls[0]["id"],
            "type": "tool_call",
        }
    ]
    assert len(result.tool_calls[0]["id"] or "") == 9
    assert result.response_metadata["finish_reason"] == "tool_calls"
    assert result.content == ""


def test_tool_calls_stream_as_chunks(sllm: ChatInfLLM, scripted: list[str]) -> None:
    scripted.append("Let me check.\n" + CALL)
    chunks: list[Any] = list(sllm.bind_tools([get_weather]).stream("weather in Paris?"))
    assert any(c.tool_call_chunks for c in chunks)
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.text.strip() == "Let me check."
    assert [c["args"] for c in full.tool_calls] == [{"location": "Paris"}]
    assert full.response_metadata["finish_reason"] == "tool_calls"


def test_malformed_tool_call_becomes_invalid(sllm: ChatInfLLM, scripted: list[str]) -> None:
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"location": }\n</tool_call>'
    scripted.extend([bad, bad])
    result = sllm.bind_tools([get_weather]).invoke("weather?")
    assert result.tool_calls == []
    assert result.invalid_tool_calls and result.invalid_tool_calls[0]["name"] == "get_weather"
    chunks: list[Any] = list(sllm.bind_tools([get_weather]).stream("weather?"))
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.tool_calls == [] and full.invalid_tool_calls


def test_forced_tool_prefills_the_turn(
    sllm: ChatInfLLM, engine: InfLLMEngine, scripted: list[str], qwen_tokenizer: Any
) -> None:
    scripted.append('location": "Paris"}}\n</tool_call>')
    result = sllm.bind_tools([get_weather, add], tool_choice="get_weather").invoke(
        "hello", session_id="forced"
    )
    assert result.tool_calls[0]["name"] == "get_weather"
    assert result.tool_calls[0]["args"] == {"location": "Paris"}
    text = qwen_tokenizer.decode(engine.session("forced").token_ids)
    assert text.endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"location": '
        '"Paris"}}\n</tool_call><|im_end|>'
    )


def test_any_tool_choice_scores_the_tool_names(sllm: ChatInfLLM, scripted: list[str]) -> None:
    scripted.append('x": 1}}\n</tool_call>')
    result = sllm.bind_tools([get_weather, add], tool_choice="any").invoke("hello")
    # Whichever name the model prefers, it is one of the bound tools.
    assert result.tool_calls and result.tool_calls[0]["name"] in {"get_weather", "add"}
    assert result.response_metadata["infllm"]["tokens_scored"] > 0


def test_tool_choice_validation(llm: ChatInfLLM) -> None:
    with pytest.raises(ValueError, match="not one of the bound tools"):
        llm.bind_tools([get_weather], tool_choice="nope")
    with pytest.raises(ValueError, match="at least one tool"):
        llm.bind_tools([], tool_choice="any")
    binding: Any = llm.bind_tools(
        [get_weather], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert binding.kwargs["tool_choice"] == "get_weather"
    assert llm.bind_tools([get_weather], tool_choice=True).kwargs["tool_choice"] == "any"  # type: ignore[attr-defined]


def test_tool_choice_none_returns_text(sllm: ChatInfLLM, scripted: list[str]) -> None:
    scripted.append(CALL)
    result = sllm.bind_tools([get_weather], tool_choice="none").invoke("weather?")
    assert result.tool_calls == []
    assert "<tool_call>" in result.text


def test_tool_results_render(qwen_tokenizer: Any) -> None:
    renderer = PromptRenderer(qwen_tokenizer, [qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")])
    call = {"name": "add", "args": {"a": 1}, "id": "abc123", "type": "tool_call"}
    messages = [
        HumanMessage("What is 1 + 2"),
        AIMessage(
            [
                {"type": "text", "text": "some text"},
                {"type": "tool_use", "id": "abc123", "name": "add", "input": {"a": 1}},
            ],
            tool_calls=[call],
        ),
        ToolMessage("Missing required argument 'b'.", tool_call_id="abc123", status="error"),
        ToolMessage([{"type": "text", "text": '{"result": 3}'}], tool_call_id="abc123"),
    ]
    from langchain_core.utils.function_calling import convert_to_openai_tool

    text = renderer.render(messages, [convert_to_openai_tool(add)]).text
    assert '"name": "add", "arguments": {"a": 1}' in text
    assert "some text" in text
    assert "<tool_response>\nError: Missing required argument 'b'.\n</tool_response>" in text
    assert '<tool_response>\n{"result": 3}\n</tool_response>' in text


def test_template_without_tools_gets_a_tool_prompt(qwen_tokenizer: Any) -> None:
    plain = copy.deepcopy(qwen_tokenizer)
    plain.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    renderer = PromptRenderer(plain, [plain.convert_tokens_to_ids("<|im_end|>")])
    from langchain_core.utils.function_calling import convert_to_openai_tool

    text = renderer.render(
        [
            HumanMessage("hi"),
            AIMessage("", tool_calls=[{"name": "add", "args": {}, "id": "1"}]),
            ToolMessage("3", tool_call_id="1"),
        ],
        [convert_to_openai_tool(add)],
    ).text
    assert text.startswith("<|im_start|>system\n# Tools")
    assert '"name": "add"' in text
    assert "<tool_response>\n3\n</tool_response>" in text
    assert renderer.tool_format == "hermes"


def test_renderer_needs_a_chat_template(qwen_tokenizer: Any) -> None:
    plain = copy.deepcopy(qwen_tokenizer)
    plain.chat_template = None
    with pytest.raises(PromptError, match="no chat template"):
        PromptRenderer(plain)


def test_tool_call_history_is_spliced(sllm: ChatInfLLM, scripted: list[str]) -> None:
    scripted.extend([CALL, "It is sunny."])
    model = sllm.bind_tools([get_weather])
    question = HumanMessage("weather in Paris?")
    call = model.invoke([question], session_id="tools")
    result = ToolMessage("It is sunny in Paris.", tool_call_id=call.tool_calls[0]["id"])
    answer = model.invoke([question, call, result], session_id="tools")
    assert cache_read(answer) == (usage(call)["total_tokens"])
    assert answer.text == "It is sunny."


# ----------------------------------------------------------------------------- structured


class Person(BaseModel):
    """A person."""

    name: str
    age: int


def test_structured_output_retries_until_valid(sllm: ChatInfLLM, scripted: list[str]) -> None:
    scripted.extend(['name": "Ann"}}\n</tool_call>', 'name": "Ann", "age": 31}}\n</tool_call>'])
    person = sllm.with_structured_output(Person).invoke("Ann is 31")
    assert person == Person(name="Ann", age=31)
    assert scripted == []


def test_structured_output_dict_schema_checks_required_keys(
    sllm: ChatInfLLM, scripted: list[str]
) -> None:
    scripted.extend(['name": "Ann"}}\n</tool_call>', 'name": "Ann", "age": 31}}\n</tool_call>'])
    result = sllm.with_structured_output(Person.model_json_schema()).invoke("Ann is 31")
    assert result == {"name": "Ann", "age": 31}


def test_structured_output_gives_up_after_bounded_retries(
    sllm: ChatInfLLM, scripted: list[str]
) -> None:
    scripted.extend(['name": "Ann"}}\n</tool_call>'] * 2)
    bounded = sllm.model_copy(update={"structured_output_retries": 1})
    with pytest.raises(Exception, match="age"):
        bounded.with_structured_output(Person).invoke("Ann")
    assert scripted == []


async def test_structured_output_async_and_include_raw(
    sllm: ChatInfLLM, scripted: list[str]
) -> None:
    scripted.extend(['name": "Bo", "age": 5}}\n</tool_call>'])
    raw: Any = await sllm.with_structured_output(Person, include_raw=True).ainvoke("Bo is 5")
    assert raw["parsed"] == Person(name="Bo", age=5)
    assert isinstance(raw["raw"], AIMessage)


# ----------------------------------------------------------------------------- tokens


def test_token_counts_use_the_model_tokenizer(llm: ChatInfLLM, qwen_tokenizer: Any) -> None:
    assert llm.get_num_tokens("hello world") == len(qwen_tokenizer.encode("hello world"))
    messages = [SystemMessage("s"), HumanMessage("hello")]
    counted = llm.get_num_tokens_from_messages(messages)
    result = llm.invoke(messages)
    assert counted == usage(result)["input_tokens"]
    with_tools = llm.get_num_tokens_from_messages(messages, tools=[get_weather])
    assert with_tools > counted


def test_renderer_boundary_cache_matches_fresh_renders(qwen_tokenizer: Any) -> None:
    from langchain_core.utils.function_calling import convert_to_openai_tool

    end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    store = GeneratedTokenStore()
    messages: list[Any] = [SystemMessage("system"), HumanMessage("go")]
    for i in range(6):
        call = AIMessage(
            "", tool_calls=[{"name": "add", "args": {"a": i, "b": 1}, "id": f"c{i}"}], id=f"m{i}"
        )
        store.remember(call, [*qwen_tokenizer.encode(f"call {i}"), end])
        messages += [call, ToolMessage(str(i + 1), tool_call_id=f"c{i}")]
    tools = [convert_to_openai_tool(add)]
    cached = PromptRenderer(qwen_tokenizer, [end])
    first = cached.render(messages, tools, store.lookup)
    second = cached.render(messages, tools, store.lookup)
    fresh = PromptRenderer(qwen_tokenizer, [end]).render(messages, tools, store.lookup)
    assert first.token_ids == second.token_ids == fresh.token_ids
    assert second.spliced_messages == 6
    # A history edited in the middle misses the cache for later turns and still renders right.
    edited = [*messages[:3], ToolMessage("changed", tool_call_id="c0"), *messages[4:]]
    again = cached.render(edited, tools, store.lookup)
    assert (
        again.token_ids
        == PromptRenderer(qwen_tokenizer, [end]).render(edited, tools, store.lookup).token_ids
    )
    assert "changed" in again.text
