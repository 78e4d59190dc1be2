"""``ChatInfLLM``: a LangChain chat model on a persistent InfLLM engine.

Every call renders the conversation with the model's chat template, syncs it to an
engine session (only tokens not already consumed are computed), and generates. The
exact ids generated for each AIMessage are remembered by message id and spliced back
when the message returns, so an agent loop re-sending its history never recomputes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    InvalidToolCall,
    ToolCall,
    ToolCallChunk,
)
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda, ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from langchain_infllm import tracing
from langchain_infllm.chat_prompt import PromptRenderer, RenderedPrompt
from langchain_infllm.chat_sessions import (
    GeneratedTokenStore,
    choose_session_id,
    session_key_from_config,
    token_store_for,
)
from langchain_infllm.config import InfLLMConfig, model_path_from_yaml
from langchain_infllm.engine.sampling import check_seed, check_temperature, check_top_p
from langchain_infllm.tool_parsing import (
    StreamEvent,
    TextEvent,
    ToolCallStreamParser,
    generate_tool_call_id,
    parse_tool_calls,
    tool_call_prefill,
)

if TYPE_CHECKING:
    from langchain_infllm.engine import InfLLMEngine

logger = logging.getLogger(__name__)

PROVIDER = "infllm"
DEFAULT_MAX_NEW_TOKENS = 1024
"""Generation budget when neither ``max_tokens`` nor ``max_context`` bounds it."""
RETRY_TEMPERATURE = 0.7
"""Sampling temperature of structured-output retries (a greedy retry repeats itself)."""
"""Name of the custom callback event emitted once per call with the retrieval summary."""
THREAD_KWARG = "_infllm_thread"
"""Private call kwarg carrying the LangGraph thread key found in the call's config."""

# Special tokens that end an assistant turn in the common chat formats.
_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
)

ToolChoice = Literal["auto", "any", "none"] | str


# ============================================================================ engines

_ENGINES: dict[tuple[str, str, str, str], InfLLMEngine] = {}
_ENGINES_LOCK = threading.Lock()


def _torch_dtype(name: str | None) -> Any:
    if name is None or name == "auto":
        return None
    import torch

    aliases = {
        "bf16": "bfloat16",
        "bfloat16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "float16": "float16",
        "fp32": "float32",
        "float": "float32",
        "float32": "float32",
    }
    key = aliases.get(name.lower().removeprefix("torch."))
    if key is None:
        raise ValueError(f"dtype {name!r} is not one of bfloat16, float16, float32, auto")
    return getattr(torch, key)


def shared_engine(
    model: str, config: InfLLMConfig, device: str | None = None, dtype: str | None = None
) -> InfLLMEngine:
    """The process-wide engine for this model and config, loaded on first use."""
    key = (model, config.model_dump_json(), device or "", dtype or "")
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            from langchain_infllm.engine import InfLLMEngine

            logger.info("loading InfLLM engine for %s", model)
            engine = InfLLMEngine.from_pretrained(
                model, config, device=device, dtype=_torch_dtype(dtype)
            )
            _ENGINES[key] = engine
        return engine


def _tokenizer(engine: Any) -> Any:
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the engine has no tokenizer; ChatInfLLM needs one to render chats")
    return tokenizer


def clear_engine_registry() -> None:
    """Forget the shared engines (they are freed once no chat model holds them)."""
    with _ENGINES_LOCK:
        _ENGINES.clear()


# ============================================================================ per-call


@dataclass
class _Plan:
    """Everything a call needs, validated before the session is touched."""

    engine: Any
    session_id: str
    prompt: RenderedPrompt
    prefill_text: str
    prefill_ids: list[int]
    prefill_choices: list[tuple[str, list[int]]]
    """Forced call among several tools: candidate prefills (one per tool name), scored by
    the model at run time; the winner plus its argument opening becomes the prefill."""
    args_openings: dict[str, tuple[str, list[int]]]
    tool_names: list[str]
    parse_tools: bool
    tool_format: str
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stop_token_ids: tuple[int, ...]
    message_id: str
    messages: list[BaseMessage] = field(default_factory=list)
    outcome: _Outcome = field(default_factory=lambda: _Outcome())

    @property
    def input_ids(self) -> list[int]:
        return self.prompt.token_ids + self.prefill_ids


@dataclass
class _Outcome:
    """What the turn did; filled while it runs."""

    text: str = ""
    generated_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    reused_tokens: int = 0
    computed_tokens: int = 0
    prefill_seconds: float = 0.0
    scored_tokens: int = 0
    summary: dict[str, Any] | None = None
    decode_seconds: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    """The session's tokens after the turn (kept only when tracing, to decode block text)."""
    context_tokens: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    records: list[Any] = field(default_factory=list)
    done: bool = False


class _Detokenizer:
    """Incremental decoding that never emits half a multi-byte character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return str(text[len(prefix) :])
        return ""

    def flush(self) -> str:
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        self.prefix_offset = self.read_offset = len(self.ids)
        return str(text[len(prefix) :]) if len(text) > len(prefix) else ""


def _check_max_tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {value!r}")
    return value


def _format_tools(tools: Any) -> list[dict[str, Any]]:
    """Tools in OpenAI form, each with a non-empty name; ValueError naming the tool
    otherwise (a nameless tool could never be called or forced)."""
    if isinstance(tools, Mapping) or not isinstance(tools, Sequence) or isinstance(tools, str):
        raise ValueError(f"tools must be a list of tools, got {type(tools).__name__}")
    formatted: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        try:
            spec = convert_to_openai_tool(tool)
        except Exception as exc:  # langchain raises ValueError, KeyError, TypeError...
            raise ValueError(f"tools[{i}] is not a tool: {exc}") from None
        function = spec.get("function") if isinstance(spec, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"tools[{i}] has no name (a tool needs a non-empty string name)")
        formatted.append(spec)
    return formatted


def _validate_stop(stop: Any, where: str) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list | tuple):
        raise ValueError(f"{where}: stop must be a list of strings, got {type(stop).__name__}")
    for item in stop:
        if not isinstance(item, str):
            raise ValueError(
                f"{where}: stop sequences must be strings, got {item!r} ({type(item).__name__})"
            )
        if not item:
            raise ValueError(f"{where}: stop sequences must be non-empty strings")
    return list(stop)


def _normalize_tool_choice(choice: Any, names: Sequence[str]) -> str | None:
    if choice is None:
        return None
    if choice is True:
        choice = "any"
    elif choice is False:
        choice = "none"
    if isinstance(choice, dict):
        inner = choice.get("function") if isinstance(choice.get("function"), dict) else choice
        name = inner.get("name") if isinstance(inner, dict) else None
        if not isinstance(name, str):
            raise ValueError(f"tool_choice {choice!r} names no tool")
        choice = name
    if not isinstance(choice, str):
        raise ValueError(f"tool_choice must be a string, dict or bool, got {choice!r}")
    if choice in ("auto", "none"):
        return choice
    if choice in ("any", "required"):
        if not names:
            raise ValueError("tool_choice='any' needs at least one tool")
        return "any"
    if choice not in names:
        raise ValueError(f"tool_choice {choice!r} is not one of the bound tools {list(names)}")
    return choice


# ============================================================================ model


class ChatInfLLM(BaseChatModel):
    """Chat model on an InfLLM engine: long contexts, prefix never recomputed.

    Construct with a model (embedded name such as ``"qwen2.5-coder-0.5b-instruct"``,
    hub id or local folder) and an InfLLM config (object or YAML path), or with a
    ready ``engine``. Construction is cheap: the engine loads on first use and is
    shared by every instance with the same model and config in the process.

    Sessions: a call uses the session named by ``session_id`` (call kwarg,
    ``configurable``, or this field), else the LangGraph thread, else ``"default"``.

    Example:
        ```python
        from langchain_infllm import ChatInfLLM

        llm = ChatInfLLM(model="qwen2.5-coder-0.5b-instruct", infllm_config="config/cpu-small.yaml")
        llm.invoke("Write a haiku about caches.")
        ```
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    model: str | None = None
    """Embedded model name, hub id or local path. With ``engine``: only its display name."""
    infllm_config: InfLLMConfig | str | Path | None = None
    """InfLLM settings, or a path to a YAML file (whose ``model.path`` may name the model)."""
    engine: Any = Field(default=None, exclude=True, repr=False)
    """A ready ``InfLLMEngine`` to use instead of loading one."""
    device: str | None = None
    """Device to load the model on (default: CUDA if available, else CPU)."""
    dtype: str | None = None
    """``"bfloat16"``, ``"float16"``, ``"float32"`` or ``None`` for the device's best."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_tokens: int | None = None
    """Most new tokens per call (default 1024, and never past ``max_context``)."""
    stop: list[str] | None = None
    """Stop sequences: generation ends where one appears (it is not returned)."""
    seed: int | None = None
    """Seed for sampling when ``temperature > 0``."""
    streaming: bool = False
    """Stream through callbacks even when called with ``invoke``."""
    session_id: str | None = None
    """Default session for calls that name none (overrides the LangGraph thread)."""
    structured_output_retries: int = 2
    """Extra attempts ``with_structured_output`` makes when the output doesn't validate."""

    _config: InfLLMConfig | None = PrivateAttr(default=None)

    # ------------------------------------------------------------------ validation
    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> list[str] | None:
        return None if value is None else _validate_stop(value, "ChatInfLLM")

    # "before" validators: pydantic would otherwise coerce True, "0.5" or nan first.
    @field_validator("temperature", mode="before")
    @classmethod
    def _check_temperature(cls, value: Any) -> float:
        return check_temperature(value)

    @field_validator("top_p", mode="before")
    @classmethod
    def _check_top_p(cls, value: Any) -> float:
        return check_top_p(value)

    @field_validator("seed", mode="before")
    @classmethod
    def _check_seed(cls, value: Any) -> int | None:
        return check_seed(value)

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _check_max_tokens(cls, value: Any) -> int | None:
        return None if value is None else _check_max_tokens(value)

    @field_validator("structured_output_retries")
    @classmethod
    def _check_retries(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"structured_output_retries must be >= 0, got {value}")
        return value

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        config = self.infllm_config
        if self.engine is not None:
            engine_config = getattr(self.engine, "config", None)
            if isinstance(config, InfLLMConfig) and config != engine_config:
                raise ValueError("infllm_config differs from the given engine's config")
            if isinstance(config, str | Path):
                raise ValueError("pass either engine= or an infllm_config path, not both")
            self._config = engine_config
            return
        if isinstance(config, str | Path):
            if self.model is None:
                self.model = model_path_from_yaml(config)
            self._config = InfLLMConfig.from_yaml(config)
        else:
            self._config = config if config is not None else InfLLMConfig.create()
        if not self.model:
            raise ValueError(
                "ChatInfLLM needs `model` (an embedded name such as "
                "'qwen2.5-coder-0.5b-instruct', a hub id or a local path) or `engine`"
            )

    # ------------------------------------------------------------------ identity
    @property
    def model_name(self) -> str:
        """The model's name as reported in metadata and traces."""
        if self.model:
            return self.model
        return str(getattr(self.engine, "model_name", "infllm"))

    @property
    def resolved_config(self) -> InfLLMConfig:
        """The InfLLM config in effect (YAML paths already read)."""
        assert self._config is not None
        return self._config

    @property
    def _llm_type(self) -> str:
        return "infllm-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "infllm_config": self.resolved_config.model_dump(),
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = PROVIDER
        model = kwargs.get("model")
        params["ls_model_name"] = model if isinstance(model, str) else self.model_name
        params["ls_model_type"] = "chat"
        temperature = kwargs.get("temperature", self.temperature)
        if isinstance(temperature, int | float):
            params["ls_temperature"] = float(temperature)
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if isinstance(max_tokens, int):
            params["ls_max_tokens"] = max_tokens
        stops = stop if stop is not None else self.stop
        if isinstance(stops, list | tuple) and stops and all(isinstance(x, str) for x in stops):
            params["ls_stop"] = list(stops)
        else:
            params.pop("ls_stop", None)  # invalid stop values are reported by the call itself
        return params

    def _resolve_model_profile(self) -> ModelProfile | None:
        profile = ModelProfile(
            text_inputs=True,
            image_inputs=False,
            image_url_inputs=False,
            pdf_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            image_tool_message=False,
            pdf_tool_message=False,
            text_outputs=True,
            image_outputs=False,
            audio_outputs=False,
            video_outputs=False,
            reasoning_output=False,
            tool_calling=True,
            tool_choice=True,
            tool_call_streaming=True,
            # Structured output goes through tool calling (with_structured_output's
            # default), not a native response_format: not claimed.
            structured_output=False,
            temperature=True,
            open_weights=True,
            attachment=False,
        )
        config = self._config
        if config is not None and config.max_context is not None:
            profile["max_input_tokens"] = config.max_context
        return profile

    # ------------------------------------------------------------------ engine
    def get_engine(self) -> InfLLMEngine:
        """The engine (loaded and shared on first use)."""
        if self.engine is not None:
            return cast("InfLLMEngine", self.engine)
        assert self.model is not None
        return shared_engine(self.model, self.resolved_config, self.device, self.dtype)

    def _renderer(self, engine: Any) -> PromptRenderer:
        renderer = getattr(engine, "_chat_infllm_renderer", None)
        if renderer is None:
            renderer = PromptRenderer(_tokenizer(engine), self._stop_token_ids(engine))
            with contextlib.suppress(AttributeError):
                engine._chat_infllm_renderer = renderer
        return cast(PromptRenderer, renderer)

    @staticmethod
    def _stop_token_ids(engine: Any) -> tuple[int, ...]:
        tokenizer = _tokenizer(engine)
        ids: list[int] = []
        generation_config = getattr(engine.model, "generation_config", None)
        eos = getattr(generation_config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.append(eos)
        elif isinstance(eos, list | tuple):
            ids.extend(int(i) for i in eos)
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        vocab = tokenizer.get_vocab()
        for token in _END_OF_TURN_TOKENS:
            if token in vocab and token in tokenizer.all_special_tokens:
                ids.append(int(vocab[token]))
        return tuple(dict.fromkeys(ids))

    def _token_store(self, engine: Any) -> GeneratedTokenStore:
        return token_store_for(engine)

    # ------------------------------------------------------------------ tokens
    def get_token_ids(self, text: str) -> list[int]:
        """Ids of ``text`` under the model's tokenizer (no special tokens added)."""
        return list(_tokenizer(self.get_engine()).encode(text, add_special_tokens=False))

    def get_num_tokens_from_messages(
        self,
        messages: list[BaseMessage],
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool] | None = None,
    ) -> int:
        """Tokens of the prompt these messages render to (chat template included)."""
        engine = self.get_engine()
        formatted = [convert_to_openai_tool(t) for t in tools] if tools else None
        return self._renderer(engine).count(messages, formatted)

    # ------------------------------------------------------------------ session keys
    def _with_session_kwargs(
        self, config: RunnableConfig | None, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        explicit, thread = session_key_from_config(ensure_config(config))
        if explicit and "session_id" not in kwargs:
            kwargs["session_id"] = explicit
        if thread and THREAD_KWARG not in kwargs:
            kwargs[THREAD_KWARG] = thread
        return kwargs

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        return super().invoke(input, config, stop=stop, **self._with_session_kwargs(config, kwargs))

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        return await super().ainvoke(
            input, config, stop=stop, **self._with_session_kwargs(config, kwargs)
        )

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        yield from super().stream(
            input, config, stop=stop, **self._with_session_kwargs(config, kwargs)
        )

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        async for chunk in super().astream(
            input, config, stop=stop, **self._with_session_kwargs(config, kwargs)
        ):
            yield chunk

    # ------------------------------------------------------------------ planning
    def _plan(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
        kwargs: dict[str, Any],
    ) -> _Plan:
        """Validate the call and render its prompt; touches no session."""
        stops = _validate_stop(stop if stop is not None else self.stop, "stop")

        def option(name: str) -> Any:
            value = kwargs.get(name)
            return getattr(self, name) if value is None else value

        temperature = check_temperature(option("temperature"))
        top_p = check_top_p(option("top_p"))
        max_tokens = option("max_tokens")
        if max_tokens is not None:
            max_tokens = _check_max_tokens(max_tokens)
        seed = check_seed(option("seed"))
        tools: list[dict[str, Any]] | None = kwargs.get("tools") or None
        if tools is not None:
            tools = _format_tools(tools)
        names = [t["function"]["name"] for t in tools or []]
        choice = _normalize_tool_choice(kwargs.get("tool_choice"), names)
        if choice not in (None, "auto", "none") and not tools:
            raise ValueError(f"tool_choice={choice!r} needs tools; use bind_tools(...)")

        engine = self.get_engine()
        renderer = self._renderer(engine)
        store = self._token_store(engine)
        prompt = renderer.render(messages, tools, store.lookup)

        tool_format = renderer.tool_format
        prefill_text = ""
        choices: list[tuple[str, list[int]]] = []
        openings: dict[str, tuple[str, list[int]]] = {}
        if tools and choice not in (None, "auto", "none"):
            forced = choice if choice != "any" else (names[0] if len(names) == 1 else None)
            if forced is not None:
                prefill_text = tool_call_prefill(tool_format, forced) + _args_opening(
                    tools[names.index(forced)]
                )
            else:
                for tool, name in zip(tools, names, strict=True):
                    text = tool_call_prefill(tool_format, name)
                    choices.append((text, renderer.encode(text)))
                    opening = _args_opening(tool)
                    openings[text] = (opening, renderer.encode(text + opening))
        prefill_ids = renderer.encode(prefill_text)
        # Before scoring, the longest candidate prefill counts against the limit.
        n_prefill = max((len(ids) for _, ids in openings.values()), default=len(prefill_ids))
        n_input = len(prompt.token_ids) + n_prefill
        budget = max_tokens if max_tokens is not None else DEFAULT_MAX_NEW_TOKENS
        limit = self.resolved_config.max_context
        if limit is not None:
            if n_input >= limit:
                raise ValueError(
                    f"prompt is {n_input} tokens and max_context is {limit}, which leaves no "
                    "room to generate (shorten the conversation or raise max_context)"
                )
            budget = min(budget, limit - n_input)

        session_id = choose_session_id(
            explicit=kwargs.get("session_id") or None,
            field=self.session_id,
            thread_key=kwargs.get(THREAD_KWARG) or None,
            metadata=run_manager.metadata if run_manager is not None else None,
        )
        if run_manager is None and session_id == choose_session_id(
            explicit=None, field=None, thread_key=None
        ):
            _, thread = session_key_from_config(ensure_config())
            if thread:
                session_id = thread
        message_id = (
            f"lc_run--{run_manager.run_id}" if run_manager is not None else f"infllm-{uuid.uuid4()}"
        )
        return _Plan(
            engine=engine,
            session_id=session_id,
            prompt=prompt,
            prefill_text=prefill_text,
            prefill_ids=prefill_ids,
            prefill_choices=choices,
            args_openings=openings,
            tool_names=names,
            parse_tools=bool(tools) and choice != "none",
            tool_format=tool_format,
            max_new_tokens=budget,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stops,
            stop_token_ids=renderer.end_of_turn_ids,
            message_id=message_id,
            messages=list(messages),
        )

    # ------------------------------------------------------------------ the turn
    def _run_turn(self, plan: _Plan, cancel: threading.Event | None = None) -> Iterator[str]:
        """Sync the prompt, generate, and yield visible text deltas.

        The session lock is held for the whole turn, so concurrent calls on one session
        run one after the other. ``plan.outcome`` is complete once the iterator ends.
        """
        engine = plan.engine
        outcome = plan.outcome
        session = engine.session(plan.session_id)
        detok = _Detokenizer(_tokenizer(engine))
        stop_ids = set(plan.stop_token_ids)
        hold = max((len(s) for s in plan.stop), default=1) - 1
        with session.lock:
            session.drain_retrievals()  # records of earlier, unrelated work
            began = time.perf_counter()
            if plan.prefill_choices:
                step = session.sync(plan.prompt.token_ids)
                outcome.scored_tokens = self._choose_prefill(session, plan, step.logits)
                session.sync(plan.input_ids)
            else:
                step = session.sync(plan.input_ids)
            outcome.prefill_seconds = time.perf_counter() - began
            outcome.reused_tokens = int(step.reused_tokens)
            outcome.computed_tokens = len(plan.input_ids) - outcome.reused_tokens
            began = time.perf_counter()
            text = ""
            emitted = 0
            finish = "length"
            tokens = session.generate(
                plan.max_new_tokens,
                temperature=plan.temperature,
                top_p=plan.top_p,
                stop_token_ids=plan.stop_token_ids,
                seed=plan.seed,
            )
            try:
                for token in tokens:
                    outcome.generated_ids.append(int(token))
                    if token in stop_ids:
                        finish = "stop"
                        break
                    text += detok.push(int(token))
                    cut = self._find_stop(text, plan.stop)
                    if cut is not None:
                        text = text[:cut]
                        finish = "stop"
                        break
                    safe = len(text) - hold
                    if safe > emitted:
                        yield text[emitted:safe]
                        emitted = safe
                    if cancel is not None and cancel.is_set():
                        finish = "cancelled"
                        break
                else:
                    text += detok.flush()
                    cut = self._find_stop(text, plan.stop)
                    if cut is not None:
                        text = text[:cut]
                        finish = "stop"
                if len(text) > emitted:
                    yield text[emitted:]
                outcome.text = text
                outcome.finish_reason = finish
            finally:
                close = getattr(tokens, "close", None)
                if close is not None:
                    close()
                outcome.decode_seconds = time.perf_counter() - began
                outcome.records = session.drain_retrievals()
                outcome.stats = dict(session.stats())
                outcome.context_tokens = len(session)
                if engine.config.trace != "off":
                    outcome.token_ids = list(session.token_ids)
        outcome.done = True

    @staticmethod
    def _choose_prefill(session: Any, plan: _Plan, logits: Any) -> int:
        """Forced call among several tools: pick the name the model finds most likely.

        Each candidate prefill (the call opening with one tool's name) is scored by its
        log-probability after the prompt; the candidates share the prompt, so scoring
        costs only their own few tokens. Returns the number of tokens computed to score.
        """
        import torch

        base = list(plan.prompt.token_ids)
        best_text, best_score = plan.prefill_choices[0][0], -float("inf")
        computed = 0
        for text, ids in plan.prefill_choices:
            # Back to the prompt: a truncation, then the last prompt token recomputed.
            computed += int(session.sync(base).computed_tokens)
            current = logits
            score = 0.0
            for position, token in enumerate(ids):
                if current is None:
                    break
                logprobs = torch.log_softmax(current.to(torch.float32), dim=-1)
                score += float(logprobs[token])
                if position + 1 < len(ids):
                    current = session.append([token]).logits
                    computed += 1
            if score > best_score:
                best_text, best_score = text, score
        opening, ids = plan.args_openings[best_text]
        plan.prefill_text = best_text + opening
        plan.prefill_ids = ids
        return computed

    @staticmethod
    def _find_stop(text: str, stops: Sequence[str]) -> int | None:
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        return min(found) if found else None

    # ------------------------------------------------------------------ results
    def _summary(self, plan: _Plan) -> dict[str, Any]:
        """``response_metadata["infllm"]``: reuse, memory and retrieval figures of the call,
        the most recalled blocks and, when tracing, where each input message sits (so a
        trace handler can map recalled blocks to messages from the metadata alone).
        Computed once per call (metadata and trace events share it)."""
        out = plan.outcome
        if out.summary is not None:
            return dict(out.summary)
        digest = tracing.summarize_retrievals(out.records, max_blocks=8)
        stats = out.stats
        summary: dict[str, Any] = {
            "session_id": plan.session_id,
            "tokens_reused": out.reused_tokens,
            "tokens_computed": out.computed_tokens,
            "tokens_generated": len(out.generated_ids),
            "tokens_spliced": plan.prompt.spliced_tokens,
            "tokens_scored": out.scored_tokens,
            "context_tokens": out.context_tokens,
            "prompt_tokens": len(plan.input_ids),
            "blocks_in_memory": int(stats.get("blocks", 0)),
            "retrievals": digest["retrievals"],
            "blocks_retrieved": digest["blocks_selected"],
            "unique_blocks_retrieved": digest["unique_blocks"],
            "cache_hits": digest["cache_hits"],
            "cache_misses": digest["cache_misses"],
            "bytes_copied": digest["bytes_copied"],
            "top_blocks": [
                {k: b[k] for k in ("block", "start", "end", "count")}
                for b in digest["top_blocks"]
            ],
            "prefill_seconds": round(out.prefill_seconds, 4),
            "decode_seconds": round(out.decode_seconds, 4),
        }
        if plan.engine.config.trace != "off" and plan.prompt.message_spans:
            summary["message_spans"] = [
                {k: span[k] for k in ("index", "role", "start", "end")}
                for span in self._message_spans(plan)
            ]
        out.summary = summary
        return dict(summary)

    @staticmethod
    def _message_spans(plan: _Plan) -> list[dict[str, Any]]:
        return tracing.build_message_spans(plan.messages, plan.prompt.message_spans)

    def _trace_events(self, plan: _Plan) -> list[tuple[str, dict[str, Any]]]:
        """This call's trace events at the engine's trace level (schema in tracing.py)."""
        level = plan.engine.config.trace
        if level == "off":
            return []
        out = plan.outcome
        tokenizer = _tokenizer(plan.engine)

        def decode(ids: Sequence[int]) -> str:
            return str(tokenizer.decode(list(ids)))

        summary = tracing.step_summary_payload(
            out.records,
            session_id=plan.session_id,
            step=None,
            prompt_tokens=len(plan.input_ids),
            tokens_reused=out.reused_tokens,
            tokens_computed=out.computed_tokens,
            generated_tokens=len(out.generated_ids),
            blocks_in_memory=int(out.stats.get("blocks", 0)),
            seconds=out.prefill_seconds + out.decode_seconds,
            message_spans=self._message_spans(plan) if plan.prompt.message_spans else None,
            token_ids=out.token_ids,
            decode=decode,
            extra={"model_name": self.model_name, **self._summary(plan)},
        )
        return tracing.build_trace_events(
            level, out.records, summary, token_ids=out.token_ids, decode=decode
        )

    def _usage(self, plan: _Plan) -> UsageMetadata:
        out = plan.outcome
        n_in = len(plan.input_ids)
        n_out = len(out.generated_ids)
        return UsageMetadata(
            input_tokens=n_in,
            output_tokens=n_out,
            total_tokens=n_in + n_out,
            input_token_details=InputTokenDetails(
                cache_read=out.reused_tokens, cache_creation=out.computed_tokens
            ),
        )

    def _response_metadata(self, plan: _Plan, finish_reason: str) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "finish_reason": finish_reason,
            "model_provider": PROVIDER,
            "infllm": self._summary(plan),
        }

    def _parse(self, plan: _Plan) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
        full = plan.prefill_text + plan.outcome.text
        if not plan.parse_tools:
            return full, [], []
        parsed = parse_tool_calls(full, plan.tool_names)
        return parsed.content, list(parsed.tool_calls), list(parsed.invalid_tool_calls)

    def _finish_reason(self, plan: _Plan, has_calls: bool) -> str:
        reason = plan.outcome.finish_reason
        return "tool_calls" if has_calls and reason == "stop" else reason

    def _build_message(self, plan: _Plan) -> AIMessage:
        content, calls, invalid = self._parse(plan)
        message = AIMessage(
            content=content,
            tool_calls=calls,
            invalid_tool_calls=invalid,
            id=plan.message_id,
            usage_metadata=self._usage(plan),
            response_metadata=self._response_metadata(plan, self._finish_reason(plan, bool(calls))),
        )
        self._remember(plan, message)
        return message

    def _remember(self, plan: _Plan, message: AIMessage) -> None:
        ids = plan.prefill_ids + plan.outcome.generated_ids
        self._token_store(plan.engine).remember(message, ids)

    # ------------------------------------------------------------------ generate
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        plan = self._plan(messages, stop, run_manager, kwargs)
        for _ in self._run_turn(plan):
            pass
        message = self._build_message(plan)
        tracing.emit_trace_events(run_manager, self._trace_events(plan))
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        plan = await asyncio.to_thread(self._plan, messages, stop, run_manager, kwargs)
        async for _ in self._aiter_turn(plan):
            pass
        message = self._build_message(plan)
        await tracing.aemit_trace_events(run_manager, self._trace_events(plan))
        return ChatResult(generations=[ChatGeneration(message=message)])

    # ------------------------------------------------------------------ stream
    def _chunks(self, plan: _Plan, deltas: Iterator[str]) -> Iterator[ChatGenerationChunk]:
        """Shared body of the sync stream: text and tool-call chunks, then the last one."""
        parser = ToolCallStreamParser(plan.tool_names) if plan.parse_tools else None
        state = _StreamState()
        for delta in deltas:
            yield from self._feed(plan, parser, state, delta)
        yield from self._close(plan, parser, state)

    def _feed(
        self,
        plan: _Plan,
        parser: ToolCallStreamParser | None,
        state: _StreamState,
        delta: str,
    ) -> Iterator[ChatGenerationChunk]:
        if not state.prefill_fed:  # the prefill is final once the turn has started
            state.prefill_fed = True
            delta = plan.prefill_text + delta
        if parser is None:
            if delta:
                state.text += delta
                yield self._text_chunk(plan, delta)
            return
        for event in parser.feed(delta):
            yield from self._event_chunk(plan, state, event)

    def _close(
        self, plan: _Plan, parser: ToolCallStreamParser | None, state: _StreamState
    ) -> Iterator[ChatGenerationChunk]:
        if not state.prefill_fed:
            yield from self._feed(plan, parser, state, "")
        if parser is not None:
            for event in parser.finish():
                yield from self._event_chunk(plan, state, event)
        aggregate = AIMessage(
            content=state.text,
            tool_calls=state.tool_calls,
            invalid_tool_calls=state.invalid_tool_calls,
            id=plan.message_id,
        )
        self._remember(plan, aggregate)
        reason = self._finish_reason(plan, bool(state.tool_calls))
        last = AIMessageChunk(
            content="",
            id=plan.message_id,
            usage_metadata=self._usage(plan),
            response_metadata=self._response_metadata(plan, reason),
            chunk_position="last",
        )
        yield ChatGenerationChunk(message=last)

    def _event_chunk(
        self, plan: _Plan, state: _StreamState, event: StreamEvent
    ) -> Iterator[ChatGenerationChunk]:
        if isinstance(event, TextEvent):
            if event.text:
                state.text += event.text
                yield self._text_chunk(plan, event.text)
            return
        data = event.chunk
        chunk = ToolCallChunk(
            name=data["name"],
            args=data["args"],
            id=data["id"] or generate_tool_call_id(),
            index=data["index"],
            type="tool_call_chunk",
        )
        message = AIMessageChunk(content="", tool_call_chunks=[chunk], id=plan.message_id)
        state.tool_calls.extend(message.tool_calls)
        if event.invalid is not None:
            state.invalid_tool_calls.append(event.invalid)
        else:
            state.invalid_tool_calls.extend(message.invalid_tool_calls)
        yield ChatGenerationChunk(message=message)

    @staticmethod
    def _text_chunk(plan: _Plan, text: str) -> ChatGenerationChunk:
        return ChatGenerationChunk(message=AIMessageChunk(content=text, id=plan.message_id))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        plan = self._plan(messages, stop, run_manager, kwargs)
        for chunk in self._chunks(plan, self._run_turn(plan)):
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
        if plan.outcome.done:
            tracing.emit_trace_events(run_manager, self._trace_events(plan))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        plan = await asyncio.to_thread(self._plan, messages, stop, run_manager, kwargs)
        parser = ToolCallStreamParser(plan.tool_names) if plan.parse_tools else None
        state = _StreamState()
        pending: list[ChatGenerationChunk] = []
        async for delta in self._aiter_turn(plan):
            pending.extend(self._feed(plan, parser, state, delta))
            for chunk in pending:
                if run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
            pending.clear()
        pending.extend(self._close(plan, parser, state))
        for chunk in pending:
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
        await tracing.aemit_trace_events(run_manager, self._trace_events(plan))

    async def _aiter_turn(self, plan: _Plan) -> AsyncIterator[str]:
        """Run the blocking turn in a worker thread; hand deltas over through a queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def post(item: tuple[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def worker() -> None:
            try:
                for delta in self._run_turn(plan, cancel):
                    post(("delta", delta))
            except BaseException as error:  # handed to the consumer
                post(("error", error))
            else:
                post(("done", None))

        future = loop.run_in_executor(None, worker)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "delta":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    break
            await future
        finally:
            cancel.set()  # stops the worker at its next token if we were abandoned

    # ------------------------------------------------------------------ tools
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: ToolChoice | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (any LangChain tool form).

        ``tool_choice``: ``"auto"``/None (model decides), ``"any"`` (must call one),
        ``"none"`` (must not), or a tool name (must call that one). Forced choices
        prefill the assistant turn with the tool-call opening (and the name).
        """
        formatted = _format_tools(tools)
        names = [t["function"]["name"] for t in formatted]
        choice = _normalize_tool_choice(tool_choice, names)
        if choice is not None:
            kwargs["tool_choice"] = choice
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """Structured output through a forced tool call, retried when it doesn't validate.

        ``method`` may be given for compatibility; every method uses tool calling here.
        Retries (``structured_output_retries``) sample at a nonzero temperature, since a
        greedy retry would repeat the same output.
        """
        chain = super().with_structured_output(schema, include_raw=include_raw, **kwargs)
        if self.structured_output_retries == 0:
            return chain
        check = _structured_checker(schema, include_raw=include_raw)
        retry_model = self.model_copy(
            update={
                "temperature": max(self.temperature, RETRY_TEMPERATURE),
                "structured_output_retries": 0,
            }
        )
        attempts = self.structured_output_retries + 1
        retried = [
            super(
                ChatInfLLM, retry_model.model_copy(update={"seed": (self.seed or 0) + n})
            ).with_structured_output(schema, include_raw=include_raw, **kwargs)
            for n in range(1, attempts)
        ]
        runners = [chain, *retried]
        errors = (OutputParserException, ValidationError, ValueError, KeyError, TypeError)

        def run(value: Any, config: RunnableConfig) -> Any:
            attempt = 0
            for trial in Retrying(
                stop=stop_after_attempt(attempts),
                retry=retry_if_exception_type(errors),
                reraise=True,
            ):
                with trial:
                    attempt += 1
                    return check(runners[min(attempt, attempts) - 1].invoke(value, config))
            raise AssertionError("unreachable")  # pragma: no cover

        async def arun(value: Any, config: RunnableConfig) -> Any:
            attempt = 0
            for trial in Retrying(
                stop=stop_after_attempt(attempts),
                retry=retry_if_exception_type(errors),
                reraise=True,
            ):
                with trial:
                    attempt += 1
                    runner = runners[min(attempt, attempts) - 1]
                    return check(await runner.ainvoke(value, config))
            raise AssertionError("unreachable")  # pragma: no cover

        return RunnableLambda(run, afunc=arun, name="ChatInfLLMStructuredOutput")


@dataclass
class _StreamState:
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)
    next_index: int = 0
    prefill_fed: bool = False


def _args_opening(tool: Mapping[str, Any]) -> str:
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


def _structured_checker(
    schema: dict[str, Any] | type, *, include_raw: bool
) -> Callable[[Any], Any]:
    """Raise when a structured-output result is missing or lacks required keys."""
    required: set[str] = set()
    is_model = isinstance(schema, type) and is_basemodel_subclass(schema)  # pydantic v1 or v2
    if not is_model:
        with contextlib.suppress(Exception):
            required = set(convert_to_json_schema(schema).get("required") or [])

    def check(result: Any) -> Any:
        value = result
        if include_raw:
            if result.get("parsing_error") is not None:
                raise OutputParserException(str(result["parsing_error"]))
            value = result.get("parsed")
        if value is None:
            raise OutputParserException("the model made no tool call matching the schema")
        if not is_model:
            if not isinstance(value, dict):
                raise OutputParserException(f"expected an object, got {value!r}")
            missing = sorted(required - set(value))
            if missing:
                raise OutputParserException(f"output lacks required keys {missing}")
        return result

    return check


__all__ = ["ChatInfLLM", "clear_engine_registry", "shared_engine"]
