"""The LangChain-free chat core on a tiny random Qwen2 with the real Qwen tokenizer.

The tiny model's output is noise, so tests that need particular output (tool calls)
script the sampled tokens: the session still consumes them through its real
``append``; only the choice of token is fixed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from typing import Any

import pytest
import torch

from langchain_infllm import InfLLMEngine
from langchain_infllm.chat_core import (
    ChatCore,
    ChatEvent,
    ChatInputError,
    FinishEvent,
    GenerationParams,
    InvalidToolCallEvent,
    RetrievalEvent,
    TextDelta,
    ToolCallEvent,
    UsageEvent,
)
from langchain_infllm.engine.sampling import apply_repetition_penalty, sample_token
from tests.shared_configs import TINY_CHAT_CONFIG
from tests.tiny_models import tiny_chat_qwen2

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_torch_thread")]

HELLO = [{"role": "user", "content": "hello there"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


@pytest.fixture
def core(qwen_tokenizer: Any) -> ChatCore:
    model = tiny_chat_qwen2(len(qwen_tokenizer), 0)
    return ChatCore(InfLLMEngine(model, qwen_tokenizer, TINY_CHAT_CONFIG, model_name="tiny"))


def of(events: list[ChatEvent], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def text(events: list[ChatEvent]) -> str:
    return "".join(e.text for e in of(events, TextDelta))


def usage(events: list[ChatEvent]) -> UsageEvent:
    (event,) = of(events, UsageEvent)
    return event  # type: ignore[no-any-return]


ORDER = [TextDelta, ToolCallEvent, UsageEvent, RetrievalEvent, FinishEvent]


def check_order(events: list[ChatEvent]) -> None:
    """TextDelta*, then (Invalid)ToolCallEvent*, Usage, Retrieval, Finish last."""
    ranks = [
        ORDER.index(ToolCallEvent if isinstance(e, InvalidToolCallEvent) else type(e))
        for e in events
    ]
    assert ranks == sorted(ranks)
    assert [type(e) for e in events[-3:]] == [UsageEvent, RetrievalEvent, FinishEvent]


def test_events_come_in_order_with_text_and_usage(core: ChatCore) -> None:
    events = list(core.run(HELLO, params=GenerationParams(max_tokens=6), session_id="s"))
    check_order(events)
    u = usage(events)
    assert u.completion_tokens == 6 and u.cached_tokens == 0 and u.prompt_tokens > 0
    assert of(events, FinishEvent)[0].reason == "length"
    summary = of(events, RetrievalEvent)[0].summary
    assert summary["session_id"] == "s" and summary["tokens_computed"] == u.prompt_tokens
    assert core.session_ids() == ["s"]


def test_prefix_is_reused_across_calls(core: ChatCore) -> None:
    first = list(core.run(HELLO, params=GenerationParams(max_tokens=5), session_id="p"))
    history = [*HELLO, {"role": "assistant", "content": text(first)}]
    second = list(
        core.run(
            [*history, {"role": "user", "content": "and then?"}],
            params=GenerationParams(max_tokens=5),
            session_id="p",
        )
    )
    # The whole first turn, its generated tokens included, is reused.
    assert usage(second).cached_tokens >= usage(first).prompt_tokens + 5
    # With no session named, the best prefix match continues the same session...
    history = [
        *history,
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": text(second)},
    ]
    third = list(
        core.run(
            [*history, {"role": "user", "content": "ok"}], params=GenerationParams(max_tokens=5)
        )
    )
    assert of(third, RetrievalEvent)[0].summary["session_id"] == "p"
    assert usage(third).cached_tokens > usage(second).prompt_tokens
    # ... and a request that diverges inside it forks it: prefix reused, "p" untouched.
    held = core.engine.session("p").token_ids
    fork = list(core.run(HELLO, params=GenerationParams(max_tokens=5)))
    assert of(fork, RetrievalEvent)[0].summary["session_id"] != "p"
    assert usage(fork).cached_tokens >= 16
    assert core.engine.session("p").token_ids == held


def test_unrelated_conversation_without_session_id_gets_a_new_session(core: ChatCore) -> None:
    list(core.run(HELLO, params=GenerationParams(max_tokens=3), session_id="a"))
    events = list(
        core.run(
            [{"role": "system", "content": "Other."}, *HELLO], params=GenerationParams(max_tokens=3)
        )
    )
    assert of(events, RetrievalEvent)[0].summary["session_id"] != "a"


def test_stop_strings_cut_the_text(core: ChatCore, scripted: list[str]) -> None:
    scripted.append("one two STOP three")
    events = list(core.run(HELLO, params=GenerationParams(stop=("STOP",)), session_id="st"))
    assert text(events) == "one two "
    assert of(events, FinishEvent)[0].reason == "stop"


def test_tool_calls_are_parsed_from_the_output(core: ChatCore, scripted: list[str]) -> None:
    scripted.append(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    events = list(core.run(HELLO, tools=[WEATHER], session_id="t"))
    check_order(events)
    (call,) = of(events, ToolCallEvent)
    assert call.name == "get_weather" and call.arguments == {"city": "Paris"}
    assert of(events, FinishEvent)[0].reason == "tool_calls"


def test_malformed_tool_call_is_an_invalid_event(core: ChatCore, scripted: list[str]) -> None:
    scripted.append('<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>')
    events = list(core.run(HELLO, tools=[WEATHER], session_id="t"))
    (bad,) = of(events, InvalidToolCallEvent)
    assert bad.name == "get_weather" and bad.error


def test_forced_tool_choice_prefills_the_call(core: ChatCore, scripted: list[str]) -> None:
    scripted.append('city": "Paris"}}\n</tool_call>')
    params = GenerationParams(tool_choice="get_weather")
    events = list(core.run(HELLO, tools=[WEATHER, ADD], params=params, session_id="f"))
    (call,) = of(events, ToolCallEvent)
    assert call.name == "get_weather" and call.arguments == {"city": "Paris"}


def test_required_tool_choice_scores_the_names(core: ChatCore, scripted: list[str]) -> None:
    scripted.append('x": 1}}\n</tool_call>')
    params = GenerationParams(tool_choice="required")
    events = list(core.run(HELLO, tools=[WEATHER, ADD], params=params, session_id="r"))
    (call,) = of(events, ToolCallEvent)
    assert call.name in {"get_weather", "add"}
    assert of(events, RetrievalEvent)[0].summary["tokens_scored"] > 0


def test_tool_choice_none_leaves_markup_as_text(core: ChatCore, scripted: list[str]) -> None:
    scripted.append('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    events = list(
        core.run(HELLO, tools=[ADD], params=GenerationParams(tool_choice="none"), session_id="n")
    )
    assert not of(events, ToolCallEvent) and "<tool_call>" in text(events)


def test_json_schema_response_format_yields_valid_json(core: ChatCore) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    params = GenerationParams(
        max_tokens=12,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    events = list(core.run(HELLO, params=params, session_id="j"))
    check_order(events)
    assert isinstance(json.loads(text(events)), dict)


def test_json_response_is_repaired(core: ChatCore, scripted: list[str]) -> None:
    scripted.append('"answer": "yes", "n": [1, 2')  # after the "{" prefill; truncated
    params = GenerationParams(response_format={"type": "json_object"})
    events = list(core.run(HELLO, params=params, session_id="j"))
    assert json.loads(text(events)) == {"answer": "yes", "n": [1, 2]}


BAD: list[tuple[dict[str, Any], str]] = [
    ({"messages": []}, "no messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "tool", "content": "4", "tool_call_id": "c9"}]}, "answers no tool"),
    ({"params": GenerationParams(temperature=-1.0)}, "temperature"),
    ({"params": GenerationParams(top_p=0.0)}, "top_p"),
    ({"params": GenerationParams(max_tokens=0)}, "max_tokens"),
    ({"params": GenerationParams(stop=("",))}, "non-empty"),
    ({"params": GenerationParams(repetition_penalty=0.0)}, "repetition_penalty"),
    ({"params": GenerationParams(tool_choice="required")}, "at least one tool"),
    ({"params": GenerationParams(tool_choice="nope"), "tools": [ADD]}, "not one of the bound"),
    ({"params": GenerationParams(response_format={"type": "xml"})}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "no name"),
    ({"tools": [ADD, ADD]}, "used twice"),
    ({"session_id": ""}, "session_id"),
]


@pytest.mark.parametrize(("change", "match"), BAD)
def test_bad_input_raises_before_any_session_changes(
    core: ChatCore, change: dict[str, Any], match: str
) -> None:
    list(core.run(HELLO, params=GenerationParams(max_tokens=3), session_id="b"))
    before = core.engine.session("b").token_ids
    kwargs: dict[str, Any] = {"messages": HELLO, "session_id": "b", **change}
    messages = kwargs.pop("messages")
    with pytest.raises(ValueError, match=match) as info:
        core.run(messages, **kwargs)  # raised at the call, before iterating
    assert isinstance(info.value, ChatInputError)
    assert core.engine.session("b").token_ids == before
    assert core.session_ids() == ["b"]


def test_closing_early_leaves_the_session_usable(core: ChatCore) -> None:
    events = core.run(HELLO, params=GenerationParams(max_tokens=20), session_id="c")
    next(events)
    events.close()
    held = core.engine.session("c").token_ids
    again = list(core.run(HELLO, params=GenerationParams(max_tokens=2), session_id="c"))
    assert usage(again).cached_tokens > 0 and len(held) > 0


def test_cancel_stops_the_turn(core: ChatCore) -> None:
    cancel = threading.Event()
    cancel.set()
    events = list(
        core.run(HELLO, params=GenerationParams(max_tokens=50), session_id="x", cancel=cancel)
    )
    assert usage(events).completion_tokens < 50


def test_arun_interleaves_sessions_and_matches_run(core: ChatCore) -> None:
    params = GenerationParams(max_tokens=6)
    expected = text(list(core.run(HELLO, params=params, session_id="sync")))

    async def one(sid: str) -> list[ChatEvent]:
        return [e async for e in core.arun(HELLO, params=params, session_id=sid)]

    async def both() -> list[list[ChatEvent]]:
        return list(await asyncio.gather(one("a1"), one("a2")))

    results = asyncio.run(both())
    for events in results:
        check_order(events)
        assert text(events) == expected  # greedy: same prompt, same text


def test_many_aruns_on_one_session_run_one_after_another(core: ChatCore) -> None:
    """More waiting turns than worker threads: none starves the turn holding the lock."""
    params = GenerationParams(max_tokens=2)

    async def one() -> list[ChatEvent]:
        return [e async for e in core.arun(HELLO, params=params, session_id="same")]

    async def many() -> list[list[ChatEvent]]:
        return list(await asyncio.wait_for(asyncio.gather(*(one() for _ in range(12))), 120))

    results = asyncio.run(many())
    assert all(usage(events).completion_tokens == 2 for events in results)
    assert core.session_ids() == ["same"]


def test_repetition_penalty_changes_greedy_decoding(core: ChatCore) -> None:
    plain = list(core.run(HELLO, params=GenerationParams(max_tokens=12), session_id="r1"))
    penalized = list(
        core.run(
            HELLO,
            params=GenerationParams(max_tokens=12, repetition_penalty=50.0),
            session_id="r2",
        )
    )
    ids_plain = core.engine.session("r1").token_ids[-12:]
    ids_pen = core.engine.session("r2").token_ids[-12:]
    assert usage(penalized).completion_tokens == usage(plain).completion_tokens == 12
    # A huge penalty never picks a token twice (the tiny model repeats without it).
    assert len(set(ids_pen)) == len(ids_pen)
    assert len(set(ids_plain)) < len(ids_plain)


def brute_force_penalty(logits: list[float], previous: list[int], penalty: float) -> list[float]:
    out = list(logits)
    for token in set(previous):
        out[token] = out[token] / penalty if out[token] > 0 else out[token] * penalty
    return out


@pytest.mark.parametrize("seed", range(5))
def test_repetition_penalty_matches_a_brute_force_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(50, generator=gen) * 3
    previous = torch.randint(0, 50, (30,), generator=gen).tolist()
    penalty = 1.0 + float(torch.rand(1, generator=gen)) * 2
    got = apply_repetition_penalty(logits, previous, penalty)
    want = brute_force_penalty(logits.tolist(), previous, penalty)
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    assert torch.equal(apply_repetition_penalty(logits, previous, 1.0), logits)
    best = max(range(50), key=lambda i: want[i])
    assert sample_token(logits, repetition_penalty=penalty, previous=previous) == best


def test_chat_core_imports_no_langchain() -> None:
    code = (
        "import sys\n"
        "for name in ('langchain_core', 'langchain', 'langgraph'):\n"
        "    sys.modules[name] = None\n"
        "import langchain_infllm.chat_core\n"
        "import langchain_infllm.chat_core.core\n"
        "bad = [m for m in sys.modules if m.startswith('langchain_core') and sys.modules[m]]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
