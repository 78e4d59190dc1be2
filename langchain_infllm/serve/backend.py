"""What the HTTP layer talks to: a stream of plain event dicts for one chat job.

`LocalBackend` runs a `ChatCore` in this process (through its async `arun`, which
releases the engine between yields, so the event loop never waits on the model). The
Ray deployment (`ray_app`) offers the same interface over Serve handles. A job is plain
JSON: ``{"messages", "tools", "params" (GenerationParams kwargs), "session_id",
"next_token_logprobs"}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from langchain_infllm.chat_core import ChatCore

logger = logging.getLogger(__name__)

EVENT_TYPES = {
    "TextDelta": "text",
    "ToolCallEvent": "tool_call",
    "InvalidToolCallEvent": "invalid_tool_call",
    "UsageEvent": "usage",
    "RetrievalEvent": "retrieval",
    "FinishEvent": "finish",
}


class ChatBackend(Protocol):
    """The server's view of a model: a name, jobs streamed as events, a clean close."""

    model_name: str

    def stream(self, job: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    async def aclose(self) -> None: ...

    def health(self) -> dict[str, Any]: ...


def jsonable(value: Any) -> Any:
    """`value` as JSON would carry it (tuples become lists, unknown objects strings)."""
    return json.loads(json.dumps(value, default=str))


def event_dict(event: Any) -> dict[str, Any]:
    """A chat-core event dataclass as a plain dict with a ``type`` key."""
    kind = EVENT_TYPES.get(type(event).__name__)
    if kind is None:
        raise TypeError(f"unknown chat event {type(event).__name__}")
    if kind == "retrieval":  # the summary only: records and token ids stay in process
        return {"type": kind, "summary": jsonable(getattr(event, "summary", {}) or {})}
    if dataclasses.is_dataclass(event) and not isinstance(event, type):
        fields = dataclasses.asdict(event)
    else:
        fields = dict(vars(event))
    return {"type": kind, **jsonable(fields)}


def engine_of(core: Any) -> Any:
    """The core's engine (the core keeps the one it was built with)."""
    for name in ("engine", "_engine"):
        engine = getattr(core, name, None)
        if engine is not None:
            return engine
    raise AttributeError("ChatCore exposes no engine")


def next_token_logprobs(core: ChatCore, session_id: str, k: int) -> list[dict[str, Any]]:
    """Top-k log-probabilities of the token after everything the session holds.

    Read from the session's last logits (kept in its snapshots too), so a session
    reloaded on another process gives the same numbers without computing anything.
    """
    import torch

    engine = engine_of(core)
    if session_id not in engine.sessions:
        return []
    session = engine.sessions.get_or_create(session_id)
    with session.lock:
        session.ensure_resident()
        logits = session.last_logits
        if logits is None:
            return []
        logprobs = torch.log_softmax(logits.float().reshape(-1), dim=-1)
        top = torch.topk(logprobs, k)
    tokenizer = engine.tokenizer
    return [
        {
            "token_id": int(i),
            "token": tokenizer.decode([int(i)]) if tokenizer is not None else str(int(i)),
            "logprob": float(lp),
        }
        for lp, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]


class LocalBackend:
    """A `ChatCore` in this process."""

    def __init__(self, core: ChatCore) -> None:
        self.core = core
        self.model_name = core.model_name

    async def stream(self, job: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        from langchain_infllm.chat_core import GenerationParams

        params = GenerationParams(**_params(job["params"]))
        session_id = job.get("session_id")
        cancel = threading.Event()
        used_session = session_id
        run = self.core.arun(
            job["messages"],
            tools=job.get("tools"),
            params=params,
            session_id=session_id,
            cancel=cancel,
        )
        try:
            async for event in run:
                item = event_dict(event)
                if item["type"] == "retrieval" and used_session is None:
                    used_session = (item.get("summary") or {}).get("session_id")
                if item["type"] == "finish":
                    k = int(job.get("next_token_logprobs") or 0)
                    if k and used_session:
                        top = await asyncio.to_thread(
                            next_token_logprobs, self.core, used_session, k
                        )
                        yield {"type": "extra", "next_token_logprobs": top}
                yield item
        finally:
            cancel.set()  # a client that went away stops the generation at the next token
            aclose = getattr(run, "aclose", None)
            if aclose is not None:
                await aclose()

    async def aclose(self) -> None:
        """Spill every live session to the store's folder."""
        await asyncio.to_thread(self.core.spill_all)

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "sessions": len(self.core.session_ids())}


def _params(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    if "stop" in out:
        out["stop"] = tuple(out["stop"])
    return out
