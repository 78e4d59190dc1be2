"""The request body of `/v1/chat/completions`, checked before any engine work.

Only what the server honours is modelled; fields OpenAI clients send that change nothing
here (``store``, ``metadata``, ``parallel_tool_calls``, ...) are accepted and ignored, and
fields whose meaning would be silently changed (``n > 1``, penalties, ``logprobs``) are
refused with a 400 naming the parameter, so a client never gets a quietly different
answer than it asked for.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from langchain_infllm.serve.errors import bad_request

MAX_STOP_STRINGS = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class InfLLMOptions(BaseModel):
    """The ``infllm`` extension object of a request (``extra_body={"infllm": {...}}``)."""

    model_config = ConfigDict(extra="forbid")
    next_token_logprobs: int = Field(default=0, ge=0, le=20)
    """Return the top-k log-probabilities of the token that would follow the reply (read
    from the session's last logits): a cheap, exact fingerprint of the session state."""


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat completion request that this server implements."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    infllm: InfLLMOptions | None = None

    @field_validator("temperature", "top_p", "repetition_penalty")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    @field_validator("messages")
    @classmethod
    def _roles(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, message in enumerate(messages):
            role = message.get("role")
            if role not in {"system", "developer", "user", "assistant", "tool"}:
                raise ValueError(f"messages[{i}].role must be a chat role, got {role!r}")
        return messages


def tool_choice_name(choice: str | dict[str, Any] | None) -> str | None:
    """OpenAI's tool_choice as the chat core takes it: None/"auto"/"none"/"required" or a
    tool name (from ``{"type": "function", "function": {"name": ...}}``)."""
    if choice is None or isinstance(choice, str):
        if choice not in (None, "auto", "none", "required"):
            raise bad_request(
                f"tool_choice must be 'auto', 'none', 'required' or an object, got {choice!r}",
                param="tool_choice",
            )
        return choice
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str) or not name:
        raise bad_request(
            "tool_choice object must be {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    return name


def response_format_of(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """``{"type": "text"}`` means no constraint; json_object and json_schema pass through."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad_request(
                "response_format.json_schema must be an object with a 'schema' object",
                param="response_format",
            )
        return fmt
    raise bad_request(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        param="response_format",
    )


def generation_kwargs(request: ChatCompletionRequest, max_tokens_cap: int) -> dict[str, Any]:
    """Keyword arguments of `GenerationParams` for this request (plain JSON, so they can
    cross a process boundary as they are).

    Raises `APIError` (400) for what the server does not do: several choices, penalties
    it cannot honour, per-token logprobs, a max_tokens above the server's cap.
    """
    if request.n not in (None, 1):
        raise bad_request("only n=1 is supported", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name) not in (None, 0, 0.0):
            raise bad_request(f"{name} is not supported; use repetition_penalty", param=name)
    if request.logprobs or request.top_logprobs:
        raise bad_request(
            "per-token logprobs are not supported; "
            "extra_body={'infllm': {'next_token_logprobs': k}} returns the next token's",
            param="logprobs",
        )
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None and max_tokens > max_tokens_cap:
        raise bad_request(
            f"max_tokens={max_tokens} is above this server's limit of {max_tokens_cap}",
            param="max_tokens",
            code="max_tokens_exceeded",
        )
    stop: tuple[str, ...] = ()
    if isinstance(request.stop, str):
        stop = (request.stop,)
    elif request.stop:
        stop = tuple(request.stop)
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise bad_request(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens or max_tokens_cap,
        "stop": stop,
        "tool_choice": tool_choice_name(request.tool_choice),
        "response_format": response_format_of(request.response_format),
    }
    if request.temperature is not None:
        kwargs["temperature"] = request.temperature
    if request.top_p is not None:
        kwargs["top_p"] = request.top_p
    if request.seed is not None:
        kwargs["seed"] = request.seed
    if request.repetition_penalty is not None:
        kwargs["repetition_penalty"] = request.repetition_penalty
    return kwargs


def check_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Tools in OpenAI's ``{"type": "function", "function": {"name", ...}}`` shape."""
    if not tools:
        return None
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type", "function") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise bad_request(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                param=f"tools[{i}]",
            )
    return tools


FinishReason = Literal["stop", "length", "tool_calls"]
