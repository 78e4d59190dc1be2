"""Chat-core events (as plain dicts) to OpenAI chat completion objects and stream chunks.

Events are dicts so that they cross a process boundary (Ray) as JSON would:
``{"type": "text", "text"}``, ``{"type": "tool_call", "id", "name", "arguments": dict}``,
``{"type": "invalid_tool_call", "id", "name", "arguments": str, "error"}``,
``{"type": "usage", "prompt_tokens", "cached_tokens", "completion_tokens"}``,
``{"type": "retrieval", "summary"}``, ``{"type": "extra", ...}`` (server facts that go
into the ``infllm`` extension field) and ``{"type": "finish", "reason"}``, last.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def tool_call_object(event: Mapping[str, Any], index: int | None = None) -> dict[str, Any]:
    """OpenAI's tool call: arguments as a JSON string (an invalid call keeps the model's
    raw text, so the client reports it as an invalid tool call with that text)."""
    arguments = event["arguments"]
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    call: dict[str, Any] = {
        "id": event["id"],
        "type": "function",
        "function": {"name": event["name"], "arguments": arguments},
    }
    if index is not None:
        call = {"index": index, **call}
    return call


def usage_object(event: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if event is None:
        return None
    prompt = int(event["prompt_tokens"])
    completion = int(event["completion_tokens"])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": int(event["cached_tokens"])},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


class Accumulator:
    """Collects one completion's events: text, tool calls, usage, the extension field."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.usage: dict[str, Any] | None = None
        self.infllm: dict[str, Any] = {}
        self.finish_reason: str | None = None

    def add(self, event: Mapping[str, Any]) -> None:
        kind = event["type"]
        if kind == "text":
            self.text.append(event["text"])
        elif kind in ("tool_call", "invalid_tool_call"):
            self.tool_calls.append(tool_call_object(event))
        elif kind == "usage":
            self.usage = dict(event)
        elif kind == "retrieval":
            self.infllm.update(event.get("summary") or {})
        elif kind == "extra":
            self.infllm.update({k: v for k, v in event.items() if k != "type"})
        elif kind == "finish":
            self.finish_reason = event["reason"]

    def finish(self) -> str:
        if self.tool_calls:
            return "tool_calls"
        return self.finish_reason or "stop"


def completion_object(
    acc: Accumulator, *, model: str, completion_id: str, created: int | None = None
) -> dict[str, Any]:
    """The non-streaming response."""
    content = "".join(acc.text)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": content if content or not acc.tool_calls else None,
        "refusal": None,
    }
    if acc.tool_calls:
        message["tool_calls"] = acc.tool_calls
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created if created is not None else int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": acc.finish()}
        ],
        "usage": usage_object(acc.usage),
        "infllm": acc.infllm,
    }


async def stream_chunks(
    events: AsyncIterator[Mapping[str, Any]],
    *,
    model: str,
    completion_id: str,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """``chat.completion.chunk`` objects for a stream of events.

    The first chunk carries the role; text and each tool call get their own chunk; the
    finish chunk carries ``finish_reason``; with ``include_usage`` one more chunk with
    empty choices carries usage. The ``infllm`` extension rides on the last chunk.
    """
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    acc = Accumulator()
    yield chunk({"role": "assistant", "content": ""})
    async for event in events:
        acc.add(event)
        kind = event["type"]
        if kind == "text" and event["text"]:
            yield chunk({"content": event["text"]})
        elif kind in ("tool_call", "invalid_tool_call"):
            index = len(acc.tool_calls) - 1
            yield chunk({"tool_calls": [tool_call_object(event, index)]})
    last = chunk({}, acc.finish())
    if not include_usage:
        last["infllm"] = acc.infllm
        yield last
        return
    yield last
    yield {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [],
        "usage": usage_object(acc.usage),
        "infllm": acc.infllm,
    }
