"""A turn's plan: the request validated and rendered, before any session is touched."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_infllm.chat_core.messages import (
    ChatInputError,
    normalize_tool_choice,
    normalize_tools,
)
from langchain_infllm.chat_core.params import GenerationParams
from langchain_infllm.chat_core.prompt import PromptRenderer, RenderedPrompt
from langchain_infllm.chat_core.tool_parsing import tool_call_prefill
from langchain_infllm.engine.sampling import (
    check_repetition_penalty,
    check_seed,
    check_temperature,
    check_top_p,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "TurnPlan",
    "args_opening",
    "check_max_tokens",
    "check_stop",
    "make_plan",
]

DEFAULT_MAX_NEW_TOKENS = 1024
"""Generation budget when neither ``max_tokens`` nor ``max_context`` bounds it."""

JSON_INSTRUCTION = "Answer with a single JSON object and nothing else."


@dataclass
class TurnPlan:
    """Everything a turn needs, validated."""

    messages: list[dict[str, Any]]
    prompt: RenderedPrompt
    tools: list[dict[str, Any]]
    tool_names: list[str]
    parse_tools: bool
    tool_format: str
    prefill_text: str
    prefill_ids: list[int]
    prefill_choices: list[tuple[str, list[int]]]
    """Forced call among several tools: one candidate prefill per tool name, scored by the
    model at run time; the winner plus its argument opening becomes the prefill."""
    args_openings: dict[str, tuple[str, list[int]]]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    repetition_penalty: float
    stop: list[str]
    stop_token_ids: tuple[int, ...]
    json_mode: bool
    session_id: str | None
    message_id: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_ids(self) -> list[int]:
        return self.prompt.token_ids + self.prefill_ids


def check_max_tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ChatInputError(f"max_tokens must be a positive integer, got {value!r}")
    return value


def check_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list | tuple):
        raise ChatInputError(f"stop must be a list of strings, got {type(stop).__name__}")
    for item in stop:
        if not isinstance(item, str):
            raise ChatInputError(
                f"stop sequences must be strings, got {item!r} ({type(item).__name__})"
            )
        if not item:
            raise ChatInputError("stop sequences must be non-empty strings")
    return list(stop)


def args_opening(tool: Mapping[str, Any]) -> str:
    """Start of the arguments object for a forced call of ``tool``.

    Opening the object (and its first key when one is required) keeps small models from
    writing a bare value where an object belongs.
    """
    params = tool.get("function", {}).get("parameters") or {}
    if params.get("required"):
        return '{"'
    if params.get("properties"):
        return "{"
    return "{}"


def _json_schema(response_format: Any) -> tuple[bool, dict[str, Any] | None]:
    """``(json mode, schema)`` of an OpenAI ``response_format``."""
    if response_format is None:
        return False, None
    if not isinstance(response_format, Mapping):
        raise ChatInputError("response_format must be an object with a 'type'")
    kind = response_format.get("type")
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise ChatInputError("response_format json_schema needs json_schema.schema (an object)")
        return True, dict(schema)
    raise ChatInputError(
        f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'"
    )


def _with_instruction(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{text}" if out[0]["content"] else text
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def make_plan(
    renderer: PromptRenderer,
    lookup: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    params: GenerationParams,
    *,
    default_repetition_penalty: float,
    max_context: int | None,
    stop_token_ids: Sequence[int],
    session_id: str | None,
    message_id: str | None,
) -> TurnPlan:
    """Validate a request and render its prompt; raises ``ChatInputError``, touches nothing."""
    if not isinstance(params, GenerationParams):
        raise ChatInputError(f"params must be GenerationParams, got {type(params).__name__}")
    if session_id is not None and (not isinstance(session_id, str) or not session_id):
        raise ChatInputError(f"session_id must be a non-empty string, got {session_id!r}")
    try:
        temperature = check_temperature(params.temperature)
        top_p = check_top_p(params.top_p)
        seed = check_seed(params.seed)
        penalty = check_repetition_penalty(
            default_repetition_penalty
            if params.repetition_penalty is None
            else params.repetition_penalty
        )
    except ChatInputError:
        raise
    except ValueError as error:
        raise ChatInputError(str(error)) from None
    max_tokens = None if params.max_tokens is None else check_max_tokens(params.max_tokens)
    stops = check_stop(params.stop)
    formatted = normalize_tools(tools)
    names = [t["function"]["name"] for t in formatted]
    choice = normalize_tool_choice(params.tool_choice, names)
    json_mode, schema = _json_schema(params.response_format)

    normalized = renderer.normalize(messages)
    if json_mode:
        instruction = JSON_INSTRUCTION
        if schema is not None:
            instruction += " It must match this JSON schema:\n" + json.dumps(
                schema, ensure_ascii=False
            )
        normalized = _with_instruction(normalized, instruction)
    prompt = renderer.render_normalized(normalized, formatted or None, lookup)

    tool_format = renderer.tool_format
    prefill_text = ""
    choices: list[tuple[str, list[int]]] = []
    openings: dict[str, tuple[str, list[int]]] = {}
    if formatted and choice not in (None, "auto", "none"):
        forced = choice if choice != "required" else (names[0] if len(names) == 1 else None)
        if forced is not None:
            prefill_text = tool_call_prefill(tool_format, forced) + args_opening(
                formatted[names.index(forced)]
            )
        else:
            for tool, name in zip(formatted, names, strict=True):
                text = tool_call_prefill(tool_format, name)
                choices.append((text, renderer.encode(text)))
                opening = args_opening(tool)
                openings[text] = (opening, renderer.encode(text + opening))
    elif json_mode:
        prefill_text = "{"
    prefill_ids = renderer.encode(prefill_text)
    # Before scoring, the longest candidate prefill counts against the limit.
    n_prefill = max((len(ids) for _, ids in openings.values()), default=len(prefill_ids))
    n_input = len(prompt.token_ids) + n_prefill
    budget = max_tokens if max_tokens is not None else DEFAULT_MAX_NEW_TOKENS
    if max_context is not None:
        if n_input >= max_context:
            raise ChatInputError(
                f"prompt is {n_input} tokens and max_context is {max_context}, which leaves "
                "no room to generate (shorten the conversation or raise max_context)"
            )
        budget = min(budget, max_context - n_input)
    return TurnPlan(
        messages=normalized,
        prompt=prompt,
        tools=formatted,
        tool_names=names,
        parse_tools=bool(formatted) and choice != "none",
        tool_format=tool_format,
        prefill_text=prefill_text,
        prefill_ids=prefill_ids,
        prefill_choices=choices,
        args_openings=openings,
        max_new_tokens=budget,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        repetition_penalty=penalty,
        stop=stops,
        stop_token_ids=tuple(stop_token_ids),
        json_mode=json_mode,
        session_id=session_id,
        message_id=message_id,
    )
