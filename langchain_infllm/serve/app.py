"""The FastAPI app: OpenAI's chat completions, models and a health check over a backend.

`create_app(backend, settings)` builds it; the backend is a `ChatCore` in this process
(`LocalBackend`) or Ray Serve replicas (`ray_app`). Everything the client sent is
checked (auth, size, schema, limits) before the engine is touched, and a job's first
event is awaited before the response starts, so errors the core raises before any
mutation come back as proper 4xx responses, not as a broken stream.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from langchain_infllm.serve.backend import ChatBackend
from langchain_infllm.serve.errors import APIError, bad_request, error_body, not_found, too_many
from langchain_infllm.serve.limits import (
    SESSION_HEADER,
    BodyLimit,
    SessionSlots,
    check_api_key,
    session_id_of,
)
from langchain_infllm.serve.openai_format import (
    Accumulator,
    completion_object,
    new_completion_id,
    stream_chunks,
)
from langchain_infllm.serve.schemas import ChatCompletionRequest, check_tools, generation_kwargs
from langchain_infllm.serve.sse import DONE, sse

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """Limits and auth; the defaults suit one engine serving a few agents."""

    api_key: str | None = None
    max_request_bytes: int = 8 * 1024 * 1024
    max_tokens_cap: int = 2048
    max_concurrent_sessions: int | None = 16


def create_app(backend: ChatBackend, settings: ServeSettings | None = None) -> FastAPI:
    """An ASGI app serving `backend`; shutting it down spills the backend's sessions."""
    settings = settings or ServeSettings()
    slots = SessionSlots(settings.max_concurrent_sessions)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        try:
            await backend.aclose()
        except Exception:  # shutdown goes on; what could not be spilled is in the log
            logger.exception("spilling sessions at shutdown failed")

    app = FastAPI(title="langchain-infllm", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.state.backend = backend
    app.state.slots = slots

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(404)
    async def _missing(request: Request, _: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(f"no route {request.method} {request.url.path}", code="not_found"),
            status_code=404,
        )

    @app.exception_handler(405)
    async def _method(request: Request, _: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(f"method {request.method} not allowed on {request.url.path}"),
            status_code=405,
        )

    def authorize(request: Request) -> None:
        check_api_key(request.headers.get("authorization"), settings.api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        info = backend.health()
        return {**info, "in_flight_sessions": slots.in_use}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [_model_card(backend.model_name)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        if model_id != backend.model_name:
            raise not_found(f"The model '{model_id}' does not exist", param="model")
        return _model_card(model_id)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        authorize(request)
        body = parse_request(await request.body())
        if body.model and body.model != backend.model_name:
            raise not_found(
                f"The model '{body.model}' does not exist; this server serves "
                f"'{backend.model_name}'",
                param="model",
            )
        session_id = session_id_of(request.headers.get(SESSION_HEADER), body.user)
        job = {
            "messages": body.messages,
            "tools": check_tools(body.tools),
            "params": generation_kwargs(body, settings.max_tokens_cap),
            "session_id": session_id,
            "next_token_logprobs": body.infllm.next_token_logprobs if body.infllm else 0,
        }
        key = slots.acquire(session_id)
        try:
            events = backend.stream(job)
            first = await _first(events)
        except BaseException:
            slots.release(key)
            raise
        completion_id = new_completion_id()
        if not body.stream:
            try:
                acc = Accumulator()
                async for event in _chain(first, events):
                    acc.add(event)
            finally:
                slots.release(key)
            return JSONResponse(
                completion_object(acc, model=backend.model_name, completion_id=completion_id)
            )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = stream_chunks(
            _chain(first, events),
            model=backend.model_name,
            completion_id=completion_id,
            include_usage=include_usage,
        )
        return StreamingResponse(
            _sse_body(chunks, events, lambda: slots.release(key)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """The request body, or a 400 naming the first offending parameter."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"{param}: {first['msg']}", param=param) from None


def backend_error(exc: BaseException) -> APIError:
    """An exception out of the backend as the response it deserves: the core's
    ValueErrors (bad messages, tools, parameters) are the client's fault."""
    if isinstance(exc, APIError):
        return exc
    if type(exc).__name__ == "TooManySessionsError":  # the core's session slots are full
        return too_many(str(exc))
    if isinstance(exc, ValueError | TypeError):
        return bad_request(str(exc) or type(exc).__name__)
    logger.error("chat job failed", exc_info=exc)
    return APIError(500, "The server failed to complete the request.", type="server_error")


def raise_event_error(event: Mapping[str, Any]) -> None:
    """Backends across a process boundary send an ``{"type": "error"}`` event instead of
    raising; turn it back into the error it stands for."""
    if event.get("type") == "error":
        raise APIError(
            int(event.get("status", 500)),
            str(event.get("message", "error")),
            type=str(event.get("error_type", "server_error")),
            param=event.get("param"),
            code=event.get("code"),
        )


async def _first(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        return None
    except Exception as exc:
        raise backend_error(exc) from exc
    raise_event_error(first)
    return first


async def _chain(
    first: dict[str, Any] | None, events: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    if first is None:
        return
    yield first
    try:
        async for event in events:
            raise_event_error(event)
            yield event
    except APIError:
        raise
    except Exception as exc:
        raise backend_error(exc) from exc


async def _sse_body(
    chunks: AsyncIterator[dict[str, Any]],
    events: AsyncIterator[dict[str, Any]],
    release: Any,
) -> AsyncIterator[bytes]:
    """The SSE stream; an error after the headers went out becomes an ``error`` event
    (OpenAI's SDKs raise it as an APIError), and a client that goes away closes the job,
    which stops the generation."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
        yield DONE
    except APIError as exc:
        yield sse(exc.body())
    finally:
        release()
        # Closing the outer generators does not close the ones they iterate: close the
        # backend's stream explicitly, which cancels the turn.
        for gen in (chunks, events):
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()


def _model_card(name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "langchain-infllm",
    }
