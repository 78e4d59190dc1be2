"""The OpenAI-compatible server, driven by clients no one here wrote: the `openai` SDK,
`langchain_openai.ChatOpenAI` and plain httpx.

Part 1 runs the real app and uvicorn over a scripted backend (no model): HTTP shapes,
SSE framing, auth, limits and error bodies. Part 2 runs the real chat core (a tiny
random Qwen2 on the Qwen tokenizer): reuse reported as ``cached_tokens``, the
``infllm`` extension, streaming, spill at shutdown. Part 3 runs the embedded
Qwen2.5-Coder-0.5B: tools, structured output and a ``create_agent`` loop of 10+ steps
in which each step reuses the whole previous history.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from langchain_infllm.serve import ServeSettings, create_app
from langchain_infllm.serve.background import BackgroundServer
from langchain_infllm.serve.errors import APIError
from langchain_infllm.serve.schemas import ChatCompletionRequest, generation_kwargs
from langchain_infllm.serve.sse import DONE, parse_sse, sse

ROOT = Path(__file__).resolve().parent.parent
HELLO: Any = [{"role": "user", "content": "hi"}]


# ============================================================== part 1: scripted backend
class ScriptedBackend:
    """Answers every job with the same events; records the jobs it got."""

    model_name = "scripted"

    def __init__(self, events: list[dict[str, Any]] | None = None) -> None:
        self.events = events if events is not None else text_reply("Hello there", 7, 3)
        self.jobs: list[Mapping[str, Any]] = []
        self.closed = False
        self.gate: threading.Event | None = None  # when set, jobs wait on it
        self.started = threading.Event()
        self.fail: Exception | None = None
        self.delay = 0.0
        self.completed = 0
        self.closed_streams = 0

    async def stream(self, job: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.jobs.append(job)
        if self.fail is not None:
            raise self.fail
        self.started.set()
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait, 30)
        try:
            for event in self.events:
                if self.delay:
                    await asyncio.sleep(self.delay)
                yield dict(event)
            self.completed += 1
        finally:
            self.closed_streams += 1

    async def aclose(self) -> None:
        self.closed = True

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name}


def text_reply(text: str, prompt: int, cached: int) -> list[dict[str, Any]]:
    words = text.split(" ")
    deltas = [{"type": "text", "text": w if i == 0 else " " + w} for i, w in enumerate(words)]
    return [
        *deltas,
        {
            "type": "usage",
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "completion_tokens": len(words),
        },
        {"type": "retrieval", "summary": {"tokens_reused": cached, "retrievals": 2}},
        {"type": "finish", "reason": "stop"},
    ]


TOOL_REPLY: list[dict[str, Any]] = [
    {"type": "tool_call", "id": "call_1", "name": "add", "arguments": {"a": 2, "b": 3}},
    {"type": "usage", "prompt_tokens": 20, "cached_tokens": 0, "completion_tokens": 9},
    {"type": "retrieval", "summary": {}},
    {"type": "finish", "reason": "tool_calls"},
]


@pytest.fixture
def scripted() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture
def server(scripted: ScriptedBackend) -> Iterator[BackgroundServer]:
    settings = ServeSettings(max_request_bytes=20_000, max_tokens_cap=64, max_concurrent_sessions=1)
    with BackgroundServer(create_app(scripted, settings)) as running:
        yield running


def client(server: BackgroundServer, **kwargs: Any) -> Any:
    return openai.OpenAI(
        base_url=server.base_url, api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs
    )


def test_sse_framing() -> None:
    frame = sse({"a": "line\nbreak", "b": [1, 2]})
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n") and frame.count(b"\n") == 2
    assert parse_sse(frame + DONE) == [{"a": "line\nbreak", "b": [1, 2]}, "[DONE]"]


def test_request_mapping_to_generation_params() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "messages": HELLO,
            "max_completion_tokens": 9,
            "temperature": 0.5,
            "stop": "END",
            "seed": 3,
            "tool_choice": {"type": "function", "function": {"name": "add"}},
            "response_format": {"type": "text"},
        }
    )
    kwargs = generation_kwargs(request, max_tokens_cap=64)
    assert kwargs == {
        "max_tokens": 9,
        "temperature": 0.5,
        "stop": ("END",),
        "seed": 3,
        "tool_choice": "add",
        "response_format": None,
    }
    # No max_tokens: the server's cap; penalties/logprobs it cannot honour: 400 with param.
    assert generation_kwargs(ChatCompletionRequest(messages=HELLO), 64)["max_tokens"] == 64
    cases: list[tuple[dict[str, Any], str]] = [
        ({"n": 2}, "n"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"max_tokens": 65}, "max_tokens"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
    ]
    for bad, param in cases:
        with pytest.raises(APIError) as info:
            generation_kwargs(ChatCompletionRequest.model_validate({"messages": HELLO, **bad}), 64)
        assert info.value.status == 400 and info.value.param == param


def test_invoke_with_the_openai_sdk(server: BackgroundServer, scripted: ScriptedBackend) -> None:
    reply = client(server).chat.completions.create(
        model="scripted", messages=HELLO, max_tokens=8, extra_headers={"X-Session-Id": "s1"}
    )
    assert reply.choices[0].message.content == "Hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.prompt_tokens == 7
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 3
    assert (reply.model_extra or {})["infllm"] == {"tokens_reused": 3, "retrievals": 2}
    job = scripted.jobs[-1]
    assert job["session_id"] == "s1" and job["params"]["max_tokens"] == 8
    # The `user` field names the session when no header does.
    client(server).chat.completions.create(model="scripted", messages=HELLO, user="u7")
    assert scripted.jobs[-1]["session_id"] == "u7"
    client(server).chat.completions.create(model="scripted", messages=HELLO)
    assert scripted.jobs[-1]["session_id"] is None  # best prefix match in the core


def test_stream_with_usage(server: BackgroundServer) -> None:
    chunks = list(
        client(server).chat.completions.create(
            model="scripted", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there"
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.total_tokens == 9
    assert (last.model_extra or {})["infllm"]["retrievals"] == 2
    # Raw framing: every event is `data: {...}` and the stream ends with [DONE].
    raw = httpx.post(
        f"{server.base_url}/chat/completions", json={"messages": HELLO, "stream": True}
    ).content
    events = parse_sse(raw)
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])
    assert "infllm" in events[-2]  # without include_usage it rides on the finish chunk


def test_tool_calls(server: BackgroundServer, scripted: ScriptedBackend) -> None:
    scripted.events = TOOL_REPLY
    tools = [
        {
            "type": "function",
            "function": {"name": "add", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    reply = client(server).chat.completions.create(
        model="scripted",
        messages=HELLO,
        tools=tools,
        tool_choice="required",
    )
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.content is None
    assert message.tool_calls is not None
    call = message.tool_calls[0]
    assert call.function.name == "add"
    assert json.loads(call.function.arguments) == {"a": 2, "b": 3}
    assert scripted.jobs[-1]["params"]["tool_choice"] == "required"
    assert scripted.jobs[-1]["tools"] == tools
    chunks = list(
        client(server).chat.completions.create(
            model="scripted",
            messages=HELLO,
            tools=tools,
            stream=True,
        )
    )
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices]
    (streamed,) = [d for d in deltas if d]
    assert streamed[0].index == 0 and streamed[0].function.name == "add"


def test_chat_openai_invoke_stream_and_tools(
    server: BackgroundServer, scripted: ScriptedBackend
) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="scripted",
        base_url=server.base_url,
        api_key="unused",
        max_retries=0,
        default_headers={"X-Session-Id": "lc"},
    )
    reply = llm.invoke("hi")
    assert reply.content == "Hello there"
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_token_details"]["cache_read"] == 3
    assert scripted.jobs[-1]["session_id"] == "lc"
    streamed = list(llm.stream("hi"))
    assert "".join(str(c.content) for c in streamed) == "Hello there"

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    scripted.events = TOOL_REPLY
    called = llm.bind_tools([add]).invoke("2+3?")
    assert called.tool_calls == [
        {"name": "add", "args": {"a": 2, "b": 3}, "id": "call_1", "type": "tool_call"}
    ]
    sent = scripted.jobs[-1]["tools"][0]["function"]
    assert sent["name"] == "add" and set(sent["parameters"]["properties"]) == {"a", "b"}


def test_auth() -> None:
    backend = ScriptedBackend()
    with BackgroundServer(create_app(backend, ServeSettings(api_key="s3cret"))) as running:
        with pytest.raises(openai.AuthenticationError) as info:
            client(running, api_key="wrong").chat.completions.create(
                model="scripted", messages=HELLO
            )
        assert info.value.status_code == 401
        body = httpx.get(f"{running.base_url}/models").json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "invalid_api_key"
        ok = client(running, api_key="s3cret").models.list()
        assert [m.id for m in ok.data] == ["scripted"]
        assert httpx.get(f"{running.url}/health").json()["status"] == "ok"  # no auth
    assert backend.jobs == []


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_limits_and_error_shapes(server: BackgroundServer, scripted: ScriptedBackend) -> None:
    url = f"{server.base_url}/chat/completions"
    # max_tokens above the cap: 400 naming the parameter (the SDK raises BadRequestError).
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(model="scripted", messages=HELLO, max_tokens=65)
    assert info.value.param == "max_tokens"
    # A body over the size limit: 413 before anything is parsed.
    big = {"messages": [{"role": "user", "content": "x" * 30_000}]}
    response = httpx.post(url, json=big)
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"
    # Malformed bodies and schema violations: 400 with the parameter.
    response = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in error_of(response)["message"]
    response = httpx.post(url, json={"messages": []})
    assert response.status_code == 400 and error_of(response)["param"] == "messages"
    response = httpx.post(url, json={"messages": [{"role": "robot", "content": "x"}]})
    assert response.status_code == 400 and error_of(response)["param"] == "messages"
    response = httpx.post(url, json={"messages": HELLO, "temperature": -1})
    assert response.status_code == 400 and error_of(response)["param"] == "temperature"
    response = httpx.post(url, json={"messages": HELLO}, headers={"X-Session-Id": "a\tb"})
    assert response.status_code == 400 and error_of(response)["param"] == "X-Session-Id"
    # Unknown model / route: 404 in the same shape.
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-4o", messages=HELLO)
    assert error_of(httpx.get(f"{server.url}/nope"))["code"] == "not_found"
    # The core refusing its input (a ValueError before any mutation): 400, stream or not.
    scripted.fail = ValueError("tool result answers no tool call")
    for stream in (False, True):
        response = httpx.post(url, json={"messages": HELLO, "stream": stream})
        assert response.status_code == 400
        assert error_of(response)["message"] == "tool result answers no tool call"
    scripted.fail = RuntimeError("engine exploded")
    response = httpx.post(url, json={"messages": HELLO})
    assert response.status_code == 500 and error_of(response)["type"] == "server_error"
    assert "exploded" not in response.text  # internals stay in the server log


def test_concurrent_session_limit(server: BackgroundServer, scripted: ScriptedBackend) -> None:
    scripted.gate = threading.Event()
    url = f"{server.base_url}/chat/completions"
    first: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: first.update(
            r=httpx.post(url, json={"messages": HELLO}, headers={"X-Session-Id": "a"}, timeout=30)
        )
    )
    worker.start()
    assert scripted.started.wait(10)
    with pytest.raises(openai.RateLimitError) as info:
        client(server).chat.completions.create(
            model="scripted", messages=HELLO, extra_headers={"X-Session-Id": "b"}
        )
    assert info.value.code == "rate_limit_exceeded"
    scripted.gate.set()
    worker.join(30)
    assert first["r"].status_code == 200
    # The slot came back.
    client(server).chat.completions.create(model="scripted", messages=HELLO)


def test_client_going_away_closes_the_job(
    server: BackgroundServer, scripted: ScriptedBackend
) -> None:
    scripted.events = text_reply(" ".join(["word"] * 200), 5, 0)
    scripted.delay = 0.02
    url = f"{server.base_url}/chat/completions"
    with httpx.stream("POST", url, json={"messages": HELLO, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while scripted.closed_streams == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scripted.closed_streams == 1 and scripted.completed == 0  # stopped, not finished
    # ... and its session slot came back.
    client(server).chat.completions.create(model="scripted", messages=HELLO)


def test_shutdown_closes_the_backend() -> None:
    backend = ScriptedBackend()
    with BackgroundServer(create_app(backend)):
        assert not backend.closed
    assert backend.closed


def test_imports_stay_optional() -> None:
    """The engine and the package import without FastAPI/Ray; the server without Ray."""
    code = (
        "import sys\n"
        "for name in ('fastapi', 'uvicorn', 'ray', 'starlette'):\n"
        "    sys.modules[name] = None\n"
        "import langchain_infllm, langchain_infllm.engine, langchain_infllm.chat_core\n"
        "sys.modules.pop('fastapi'); sys.modules.pop('starlette'); sys.modules.pop('uvicorn')\n"
        "import langchain_infllm.serve, langchain_infllm.serve.__main__\n"
        "assert 'ray' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# ====================================================== part 2: the real core, tiny model
@pytest.fixture(scope="module")
def tiny_core(one_torch_thread: None) -> Any:
    from transformers import AutoTokenizer

    from langchain_infllm.chat_core import ChatCore
    from langchain_infllm.engine import InfLLMEngine
    from langchain_infllm.models.embedded import ensure_embedded_model
    from tests.shared_configs import TINY_CHAT_CONFIG
    from tests.tiny_models import tiny_chat_qwen2

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model("qwen2.5-coder-0.5b-instruct"))
    engine = InfLLMEngine(
        tiny_chat_qwen2(len(tokenizer)), tokenizer, TINY_CHAT_CONFIG, model_name="tiny-qwen2"
    )
    return ChatCore(engine)


@pytest.fixture(scope="module")
def tiny_server(tiny_core: Any) -> Iterator[BackgroundServer]:
    from langchain_infllm.serve import LocalBackend

    app = create_app(LocalBackend(tiny_core), ServeSettings(max_tokens_cap=16))
    with BackgroundServer(app) as running:
        yield running


LONG_USER = " ".join(f"Line {i}: the valve {i} reads {i * 7 % 13} bar." for i in range(12))


@pytest.mark.real_model
def test_real_core_reuse_stream_and_extension(
    tiny_server: BackgroundServer, tiny_core: Any
) -> None:
    sdk = client(tiny_server)
    history: list[dict[str, Any]] = [{"role": "user", "content": LONG_USER}]
    first = sdk.chat.completions.create(
        model="tiny-qwen2",
        messages=history,
        max_tokens=6,
        extra_headers={"X-Session-Id": "t1"},
        extra_body={"infllm": {"next_token_logprobs": 3}},
    )
    assert first.usage.prompt_tokens > 100 and first.usage.completion_tokens <= 6
    info = first.model_extra["infllm"]
    top = info["next_token_logprobs"]
    assert len(top) == 3 and top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
    assert "t1" in tiny_core.session_ids()
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And the valve 3?"},
    ]
    chunks = list(
        sdk.chat.completions.create(
            model="tiny-qwen2",
            messages=history,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Session-Id": "t1"},
        )
    )
    usage = chunks[-1].usage
    # The second turn reused at least the whole first prompt.
    assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert usage.prompt_tokens > usage.prompt_tokens_details.cached_tokens
    assert chunks[-1].model_extra["infllm"]  # the retrieval summary rides on the last chunk
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) >= 1


@pytest.mark.real_model
def test_real_core_prefix_match_without_a_session_id(tiny_server: BackgroundServer) -> None:
    sdk = client(tiny_server)
    history: list[dict[str, Any]] = [{"role": "user", "content": "Prefix: " + LONG_USER}]
    first = sdk.chat.completions.create(model="tiny-qwen2", messages=history, max_tokens=4)
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "More?"},
    ]
    second = sdk.chat.completions.create(model="tiny-qwen2", messages=history, max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


@pytest.mark.real_model
def test_real_core_refuses_bad_input_with_400(tiny_server: BackgroundServer) -> None:
    bad = [{"role": "tool", "content": "42", "tool_call_id": "nobody"}]
    with pytest.raises(openai.BadRequestError):
        client(tiny_server).chat.completions.create(model="tiny-qwen2", messages=bad)


@pytest.mark.real_model
def test_real_core_shutdown_spills_sessions(tiny_core: Any) -> None:
    from langchain_infllm.serve import LocalBackend

    with BackgroundServer(create_app(LocalBackend(tiny_core))) as running:
        client(running).chat.completions.create(
            model="tiny-qwen2", messages=HELLO, max_tokens=2, extra_headers={"X-Session-Id": "sp"}
        )
        store = tiny_core.engine.sessions
        assert "sp" in store.live_ids()
    assert "sp" in store.spilled_ids() and "sp" not in store.live_ids()


# =========================================== part 3: the embedded Qwen2.5-Coder-0.5B
QWEN = "qwen2.5-coder-0.5b-instruct"
WORD = "SERVE"
AGENT_SYSTEM = (
    "You spell a secret word by calling tools, one call per reply, never answering early.\n"
    "Repeat: call read_letter with the next position (1, 2, 3, ...), then call save_letter "
    "with the letter it gives you. Each tool result tells you the next call to make. When a "
    "result says the word is complete, reply with the word and no tool call."
)


@pytest.fixture(scope="module")
def qwen_server(one_torch_thread: None) -> Iterator[BackgroundServer]:
    from langchain_infllm.chat_core import ChatCore
    from langchain_infllm.engine import InfLLMEngine
    from langchain_infllm.serve import LocalBackend
    from tests.shared_configs import SMALL_AGENT_CONFIG

    core = ChatCore(InfLLMEngine.from_pretrained(QWEN, SMALL_AGENT_CONFIG))
    with BackgroundServer(create_app(LocalBackend(core), ServeSettings(max_tokens_cap=64))) as s:
        yield s


def qwen_chat(server: BackgroundServer, session: str, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=QWEN,
        base_url=server.base_url,
        api_key="unused",
        temperature=0,
        max_retries=0,
        default_headers={"X-Session-Id": session},
        timeout=300,
        **kwargs,
    )


@pytest.mark.real_model
def test_qwen_tools_and_structured_output(qwen_server: BackgroundServer) -> None:
    from langchain_core.tools import tool
    from pydantic import BaseModel

    @tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        return "sunny"

    llm = qwen_chat(qwen_server, "tools", max_tokens=40)
    called = llm.bind_tools([get_weather]).invoke("What is the weather in Paris?")
    assert [(c["name"], c["args"]) for c in called.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]

    class Person(BaseModel):
        name: str
        age: int
        city: str

    extract = qwen_chat(qwen_server, "structured", max_tokens=48).with_structured_output(
        Person, method="json_schema"
    )
    person = extract.invoke("Maria Garcia is 31 and lives in Madrid. Extract the person.")
    assert isinstance(person, Person) and person.age == 31 and person.city == "Madrid"


@pytest.mark.real_model
def test_create_agent_over_http_reuses_each_previous_step(qwen_server: BackgroundServer) -> None:
    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool

    saved: list[str] = []

    @tool
    def read_letter(position: int) -> str:
        """Read the letter of the secret word at a 1-based position."""
        if not 1 <= position <= len(WORD):
            return f"There is no letter at position {position}. Call read_letter with position 1."
        letter = WORD[position - 1]
        return f"Letter {position} is {letter}. Next call: save_letter with letter={letter!r}."

    @tool
    def save_letter(letter: str) -> str:
        """Save one letter of the secret word."""
        saved.append(letter)
        if len(saved) >= len(WORD):
            return f"Saved {letter}. The word is complete: {''.join(saved)}. Reply with it."
        return f"Saved {letter}. Next call: read_letter with position={len(saved) + 1}."

    agent = create_agent(
        qwen_chat(qwen_server, "agent", max_tokens=48),
        tools=[read_letter, save_letter],
        system_prompt=AGENT_SYSTEM,
    )
    state = agent.invoke(
        {"messages": [HumanMessage("Spell the secret word. Start with read_letter position 1.")]},
        {"recursion_limit": 60},
    )
    steps = [m for m in state["messages"] if isinstance(m, AIMessage)]
    assert len(steps) >= 10, [m.content for m in steps]
    assert sum(isinstance(m, ToolMessage) for m in state["messages"]) >= 9
    assert {c["name"] for s in steps for c in s.tool_calls} == {"read_letter", "save_letter"}
    usage = [s.usage_metadata for s in steps]
    for before, now in itertools.pairwise(usage):
        assert before is not None and now is not None
        # Every step reused the whole previous prompt (the agent re-sends its history).
        assert now["input_token_details"]["cache_read"] >= before["input_tokens"], usage


@pytest.mark.real_model
def test_cli_serves_and_shuts_down_cleanly(tmp_path: Path) -> None:
    """``python -m langchain_infllm.serve`` as documented; SIGTERM spills the sessions."""
    import os
    import signal

    from langchain_infllm.serve.background import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INFLLM_API_KEY": "k"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "langchain_infllm.serve",
            "--model",
            "smollm2-135m-instruct",
            "--config",
            str(ROOT / "config/smollm2-cpu.yaml"),
            "--port",
            str(port),
            "--max-tokens",
            "4",
            "--threads",
            "1",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        reply = sdk.chat.completions.create(
            model="smollm2-135m-instruct", messages=HELLO, extra_headers={"X-Session-Id": "cli"}
        )
        assert reply.usage is not None and reply.usage.completion_tokens <= 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=sdk.base_url, api_key="bad", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    # uvicorn finishes its shutdown, then re-raises the signal it caught (exit -15).
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "session cli spilled" in out and "Application shutdown complete" in out, out[-3000:]
