"""``ChatInfLLM``: a LangChain chat model on a persistent InfLLM engine.

A thin adapter over :class:`~langchain_infllm.chat_core.ChatCore`, as ChatOllama is over
its client: LangChain messages and tools become OpenAI-shaped dicts
(``convert_to_openai_messages`` / ``convert_to_openai_tool``), the core runs the turn
(render, sync the session so only new tokens are computed, generate, parse tool calls)
and its events become ``AIMessageChunk``s, usage metadata and
``response_metadata["infllm"]``; the retrieval trace goes out through callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import uuid
import weakref
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

from langchain_infllm import trace_data, tracing
from langchain_infllm.chat_core import (
    ChatCore,
    ChatEvent,
    FinishEvent,
    GenerationParams,
    InvalidToolCallEvent,
    RetrievalEvent,
    TextDelta,
    ToolCallEvent,
    UsageEvent,
)
from langchain_infllm.chat_core.engines import clear_engine_registry, shared_engine
from langchain_infllm.chat_core.messages import normalize_tool_choice
from langchain_infllm.chat_core.plan import TurnPlan, check_max_tokens, check_stop
from langchain_infllm.chat_core.tool_parsing import generate_tool_call_id
from langchain_infllm.chat_prompt import messages_to_dicts
from langchain_infllm.chat_sessions import choose_session_id, session_key_from_config
from langchain_infllm.config import InfLLMConfig, model_path_from_yaml
from langchain_infllm.engine.sampling import (
    check_repetition_penalty,
    check_seed,
    check_temperature,
    check_top_p,
)

if TYPE_CHECKING:
    from langchain_infllm.engine import InfLLMEngine

logger = logging.getLogger(__name__)

PROVIDER = "infllm"
RETRY_TEMPERATURE = 0.7
"""Sampling temperature of structured-output retries (a greedy retry repeats itself)."""
THREAD_KWARG = "_infllm_thread"
"""Private call kwarg carrying the LangGraph thread key found in the call's config."""

ToolChoice = Literal["auto", "any", "none"] | str

_CORES: weakref.WeakKeyDictionary[Any, ChatCore] = weakref.WeakKeyDictionary()
_CORES_LOCK = threading.Lock()


def core_for(engine: Any, model_name: str | None = None) -> ChatCore:
    """The chat core on ``engine``, shared by every ChatInfLLM using it."""
    with _CORES_LOCK:
        core = _CORES.get(engine)
        if core is None:
            core = ChatCore(engine, model_name=model_name)
            _CORES[engine] = core
        return core


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
    """The core's check, with the message naming where the bad value came from."""
    try:
        return check_stop(stop)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _core_tool_choice(choice: Any, names: Sequence[str]) -> str | None:
    """LangChain's tool_choice (``"any"``, True, a dict...) in the core's terms."""
    return normalize_tool_choice(choice, names)


@dataclass
class _Call:
    """One call of ChatInfLLM: the core's plan plus what the events said."""

    core: ChatCore
    plan: TurnPlan
    message_id: str
    messages: list[BaseMessage]
    text: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)
    usage: UsageEvent | None = None
    retrieval: RetrievalEvent | None = None
    finish: str | None = None
    index: int = 0


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
    repetition_penalty: float | None = None
    """CTRL-style penalty on tokens already in the context (1 is off); None: the model's
    ``generation_config`` value, else 1."""
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

    @field_validator("repetition_penalty", mode="before")
    @classmethod
    def _check_repetition_penalty(cls, value: Any) -> float | None:
        return None if value is None else check_repetition_penalty(value)

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _check_max_tokens(cls, value: Any) -> int | None:
        return None if value is None else check_max_tokens(value)

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
            "repetition_penalty": self.repetition_penalty,
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

    def get_core(self) -> ChatCore:
        """The chat core on this model's engine (one per engine, shared)."""
        return core_for(self.get_engine(), self.model_name)

    # ------------------------------------------------------------------ tokens
    def get_token_ids(self, text: str) -> list[int]:
        """Ids of ``text`` under the model's tokenizer (no special tokens added)."""
        return list(
            cast(Any, self.get_core().engine.tokenizer).encode(text, add_special_tokens=False)
        )

    def get_num_tokens_from_messages(
        self,
        messages: list[BaseMessage],
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool] | None = None,
    ) -> int:
        """Tokens of the prompt these messages render to (chat template included)."""
        formatted = [convert_to_openai_tool(t) for t in tools] if tools else None
        return self.get_core().renderer.count(messages_to_dicts(messages), formatted)

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
    ) -> _Call:
        """Validate the call and render its prompt; touches no session."""
        stops = _validate_stop(stop if stop is not None else self.stop, "stop")

        def option(name: str) -> Any:
            value = kwargs.get(name)
            return getattr(self, name) if value is None else value

        temperature = check_temperature(option("temperature"))
        top_p = check_top_p(option("top_p"))
        max_tokens = option("max_tokens")
        if max_tokens is not None:
            max_tokens = check_max_tokens(max_tokens)
        seed = check_seed(option("seed"))
        penalty = option("repetition_penalty")
        if penalty is not None:
            penalty = check_repetition_penalty(penalty)
        tools: list[dict[str, Any]] | None = kwargs.get("tools") or None
        if tools is not None:
            tools = _format_tools(tools)
        names = [t["function"]["name"] for t in tools or []]
        choice = _core_tool_choice(kwargs.get("tool_choice"), names)
        if choice not in (None, "auto", "none") and not tools:
            raise ValueError(f"tool_choice={choice!r} needs tools; use bind_tools(...)")

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
        params = GenerationParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=tuple(stops),
            repetition_penalty=penalty,
            tool_choice=choice,
        )
        core = self.get_core()
        plan = core.plan(
            messages_to_dicts(messages),
            tools=tools,
            params=params,
            session_id=session_id,
            message_id=message_id,
        )
        return _Call(core=core, plan=plan, message_id=message_id, messages=list(messages))

    # ------------------------------------------------------------------ events
    def _chunks(self, call: _Call, event: ChatEvent) -> Iterator[ChatGenerationChunk]:
        """The chunks one core event becomes (usage and metadata wait for the end)."""
        if isinstance(event, TextDelta):
            call.text.append(event.text)
            message = AIMessageChunk(content=event.text, id=call.message_id)
            yield ChatGenerationChunk(message=message)
        elif isinstance(event, ToolCallEvent | InvalidToolCallEvent):
            yield self._tool_chunk(call, event)
        elif isinstance(event, UsageEvent):
            call.usage = event
        elif isinstance(event, RetrievalEvent):
            call.retrieval = event
        elif isinstance(event, FinishEvent):
            call.finish = event.reason
            last = AIMessageChunk(
                content="",
                id=call.message_id,
                usage_metadata=self._usage(call),
                response_metadata=self._response_metadata(call),
                chunk_position="last",
            )
            yield ChatGenerationChunk(message=last)

    def _tool_chunk(
        self, call: _Call, event: ToolCallEvent | InvalidToolCallEvent
    ) -> ChatGenerationChunk:
        if isinstance(event, ToolCallEvent):
            args = json.dumps(event.arguments, ensure_ascii=False)
            name: str | None = event.name
        else:
            # A JSON string literal never parses to a dict, so LangChain keeps the call
            # invalid instead of "repairing" truncated arguments into wrong ones.
            args, name = json.dumps(event.arguments, ensure_ascii=False), event.name
        chunk = ToolCallChunk(
            name=name,
            args=args,
            id=event.id or generate_tool_call_id(),
            index=call.index,
            type="tool_call_chunk",
        )
        call.index += 1
        message = AIMessageChunk(content="", tool_call_chunks=[chunk], id=call.message_id)
        if isinstance(event, ToolCallEvent):
            call.tool_calls.extend(message.tool_calls)
        else:
            call.invalid_tool_calls.append(
                InvalidToolCall(
                    name=event.name,
                    args=event.arguments,
                    id=event.id,
                    error=event.error,
                    type="invalid_tool_call",
                )
            )
        return ChatGenerationChunk(message=message)

    # ------------------------------------------------------------------ results
    def _summary(self, call: _Call) -> dict[str, Any]:
        """``response_metadata["infllm"]``: the core's retrieval summary of the turn."""
        return dict(call.retrieval.summary) if call.retrieval is not None else {}

    def _trace_events(self, call: _Call) -> list[tuple[str, dict[str, Any]]]:
        """This call's trace events at the engine's trace level (schema in trace_data)."""
        engine = call.core.engine
        level = engine.config.trace
        retrieval = call.retrieval
        if level == "off" or retrieval is None:
            return []
        summary = retrieval.summary
        tokenizer = cast(Any, engine.tokenizer)

        def decode(ids: Sequence[int]) -> str:
            return str(tokenizer.decode(list(ids)))

        spans = list(retrieval.message_spans)
        if spans:  # the previews of LangChain messages, as the trace handler shows them
            offsets = call.plan.prompt.message_spans
            if len(offsets) == len(call.messages):
                spans = trace_data.build_message_spans(call.messages, offsets)
        payload = trace_data.step_summary_payload(
            list(retrieval.records),
            session_id=summary["session_id"],
            step=None,
            prompt_tokens=summary["prompt_tokens"],
            tokens_reused=summary["tokens_reused"],
            tokens_computed=summary["tokens_computed"],
            generated_tokens=summary["tokens_generated"],
            blocks_in_memory=summary["blocks_in_memory"],
            seconds=summary["prefill_seconds"] + summary["decode_seconds"],
            message_spans=spans or None,
            token_ids=list(retrieval.token_ids),
            decode=decode,
            extra={"model_name": self.model_name, **summary},
        )
        return trace_data.build_trace_events(
            level,
            list(retrieval.records),
            payload,
            token_ids=list(retrieval.token_ids),
            decode=decode,
        )

    def _usage(self, call: _Call) -> UsageMetadata:
        usage = call.usage or UsageEvent(0, 0, 0)
        n_in, n_out = usage.prompt_tokens, usage.completion_tokens
        return UsageMetadata(
            input_tokens=n_in,
            output_tokens=n_out,
            total_tokens=n_in + n_out,
            input_token_details=InputTokenDetails(
                cache_read=usage.cached_tokens, cache_creation=n_in - usage.cached_tokens
            ),
        )

    def _response_metadata(self, call: _Call) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "finish_reason": call.finish or "stop",
            "model_provider": PROVIDER,
            "infllm": self._summary(call),
        }

    def _message(self, call: _Call) -> AIMessage:
        text = "".join(call.text)
        return AIMessage(
            content=text.strip() if call.plan.parse_tools else text,
            tool_calls=call.tool_calls,
            invalid_tool_calls=call.invalid_tool_calls,
            id=call.message_id,
            usage_metadata=self._usage(call),
            response_metadata=self._response_metadata(call),
        )

    # ------------------------------------------------------------------ generate
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = self._plan(messages, stop, run_manager, kwargs)
        for event in call.core.run_plan(call.plan):
            for _ in self._chunks(call, event):
                pass
        tracing.emit_trace_events(run_manager, self._trace_events(call))
        return ChatResult(generations=[ChatGeneration(message=self._message(call))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = await asyncio.to_thread(self._plan, messages, stop, run_manager, kwargs)
        async for event in call.core.arun_plan(call.plan):
            for _ in self._chunks(call, event):
                pass
        await tracing.aemit_trace_events(run_manager, self._trace_events(call))
        return ChatResult(generations=[ChatGeneration(message=self._message(call))])

    # ------------------------------------------------------------------ stream
    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        call = self._plan(messages, stop, run_manager, kwargs)
        events = call.core.run_plan(call.plan)
        try:
            for event in events:
                for chunk in self._chunks(call, event):
                    if run_manager is not None:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
        finally:
            events.close()
        if call.finish is not None:
            tracing.emit_trace_events(run_manager, self._trace_events(call))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        call = await asyncio.to_thread(self._plan, messages, stop, run_manager, kwargs)
        events = call.core.arun_plan(call.plan)
        try:
            async for event in events:
                for chunk in self._chunks(call, event):
                    if run_manager is not None:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
        finally:
            await events.aclose()
        if call.finish is not None:
            await tracing.aemit_trace_events(run_manager, self._trace_events(call))

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
        choice = _core_tool_choice(tool_choice, names)
        if choice == "required":
            choice = "any"  # LangChain's word for it
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


__all__ = ["ChatInfLLM", "clear_engine_registry", "core_for", "shared_engine"]
