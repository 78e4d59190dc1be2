"""``ChatCore``: OpenAI-shaped messages in, typed events out, on a persistent engine."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import json_repair
import torch

from langchain_infllm import trace_data
from langchain_infllm.chat_core.detok import Detokenizer
from langchain_infllm.chat_core.engines import resolve_config, shared_engine
from langchain_infllm.chat_core.events import (
    ChatEvent,
    FinishEvent,
    InvalidToolCallEvent,
    RetrievalEvent,
    TextDelta,
    ToolCallEvent,
    UsageEvent,
)
from langchain_infllm.chat_core.messages import ChatInputError
from langchain_infllm.chat_core.params import GenerationParams
from langchain_infllm.chat_core.plan import TurnPlan, make_plan
from langchain_infllm.chat_core.prompt import PromptRenderer
from langchain_infllm.chat_core.routing import choose_session
from langchain_infllm.chat_core.tokens import GeneratedTokenStore, token_store_for
from langchain_infllm.chat_core.tool_parsing import TextEvent, ToolCallStreamParser
from langchain_infllm.chat_core.tool_parsing import ToolCallEvent as ParsedCall
from langchain_infllm.engine.sampling import generation_defaults, sample_token

if TYPE_CHECKING:
    from langchain_infllm.config import InfLLMConfig
    from langchain_infllm.engine import InfLLMEngine, Session

__all__ = ["ChatCore", "TooManySessionsError"]

logger = logging.getLogger(__name__)

TURN_POLL_SECONDS = 0.005
"""How often ``arun`` retries the turn lock of a session busy with another turn."""

DEFAULT_PARAMS = GenerationParams()
"""Frozen, so one shared default is safe."""

# Special tokens that end an assistant turn in the common chat formats.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
)


class TooManySessionsError(ChatInputError):
    """Every session slot is taken by a turn in flight."""


def end_of_turn_ids(engine: Any) -> tuple[int, ...]:
    """Token ids that end an assistant turn for this engine's model and tokenizer."""
    tokenizer = engine.tokenizer
    ids: list[int] = []
    eos = getattr(getattr(engine.model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    elif isinstance(eos, list | tuple):
        ids.extend(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab and token in tokenizer.all_special_tokens:
            ids.append(int(vocab[token]))
    return tuple(dict.fromkeys(ids))


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


@dataclass
class _Turn:
    """What a turn did; filled while it runs."""

    plan: TurnPlan
    session_id: str = ""
    text: str = ""
    generated_ids: list[int] = field(default_factory=list)
    finish: str = "length"
    reused: int = 0
    computed: int = 0
    scored: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    records: list[Any] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    context_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)


class ChatCore:
    """One engine, many sessions; renders, syncs, generates and parses a chat turn.

    Turns on one session run one after the other (a per-session turn lock); turns on
    different sessions interleave, one model forward at a time (the engine's lock,
    taken per forward, never across a yield).
    """

    def __init__(
        self,
        engine: InfLLMEngine,
        *,
        max_sessions: int | None = None,
        model_name: str | None = None,
    ) -> None:
        if getattr(engine, "tokenizer", None) is None:
            raise ChatInputError("the engine has no tokenizer; the chat core needs one")
        if max_sessions is not None and (isinstance(max_sessions, bool) or max_sessions < 1):
            raise ValueError(f"max_sessions must be a positive integer, got {max_sessions!r}")
        self.engine = engine
        self.max_sessions = max_sessions
        self._model_name = model_name
        self.stop_token_ids = end_of_turn_ids(engine)
        self.renderer = _shared_renderer(engine, self.stop_token_ids)
        self.tokens: GeneratedTokenStore = token_store_for(engine)
        self.defaults = generation_defaults(engine.model)
        self._locks: dict[str, threading.Lock] = {}
        self._busy: set[str] = set()
        self._guard = threading.Lock()

    @classmethod
    def from_model(
        cls,
        model: str,
        config: str | Path | InfLLMConfig | None = None,
        **engine_kwargs: Any,
    ) -> ChatCore:
        """Load (or reuse, process-wide) the engine for ``model`` and ``config``.

        ``engine_kwargs``: ``device``, ``dtype``, ``trust_remote_code``; ``max_sessions``
        goes to the core.
        """
        max_sessions = engine_kwargs.pop("max_sessions", None)
        engine = shared_engine(model, resolve_config(config), **engine_kwargs)
        return cls(engine, max_sessions=max_sessions, model_name=model)

    @property
    def model_name(self) -> str:
        return self._model_name or str(getattr(self.engine, "model_name", None) or "infllm")

    # ------------------------------------------------------------------ planning
    def plan(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        params: GenerationParams = DEFAULT_PARAMS,
        session_id: str | None = None,
        message_id: str | None = None,
    ) -> TurnPlan:
        """Validate and render a request (``ChatInputError`` if bad); touches no session."""
        return make_plan(
            self.renderer,
            self.tokens.lookup,
            messages,
            tools,
            params,
            default_repetition_penalty=self.defaults.get("repetition_penalty", 1.0),
            max_context=self.engine.config.max_context,
            stop_token_ids=self.stop_token_ids,
            session_id=session_id,
            message_id=message_id,
        )

    # ------------------------------------------------------------------ running
    def run(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        params: GenerationParams = DEFAULT_PARAMS,
        session_id: str | None = None,
        cancel: threading.Event | None = None,
        message_id: str | None = None,
    ) -> Generator[ChatEvent, None, None]:
        """Run one turn; the request is checked now (``ValueError``), the turn as the
        iterator is consumed. Closing the iterator early leaves the session consistent."""
        plan = self.plan(
            messages, tools=tools, params=params, session_id=session_id, message_id=message_id
        )
        return self.run_plan(plan, cancel)

    async def arun(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        params: GenerationParams = DEFAULT_PARAMS,
        session_id: str | None = None,
        cancel: threading.Event | None = None,
        message_id: str | None = None,
    ) -> AsyncGenerator[ChatEvent, None]:
        """``run`` without blocking the event loop: each step runs in a worker thread."""
        plan = await asyncio.to_thread(
            self.plan,
            messages,
            tools=tools,
            params=params,
            session_id=session_id,
            message_id=message_id,
        )
        async for event in self.arun_plan(plan, cancel):
            yield event

    async def arun_plan(
        self, plan: TurnPlan, cancel: threading.Event | None = None
    ) -> AsyncGenerator[ChatEvent, None]:
        """Step the sync turn one event at a time in worker threads. Nothing is held
        between events but the session's turn lock, so other sessions' turns go on."""
        stop = threading.Event()
        # The turn lock is waited for here, polling, not in a worker thread: workers
        # blocked on a busy session could starve the turn that holds it.
        acquired = None
        while acquired is None:
            trying = _EXECUTOR.submit(self._acquire, plan, False)
            try:
                acquired = await asyncio.wrap_future(trying)
            except BaseException:  # cancelled while trying: give back what it got
                trying.add_done_callback(self._release_result)
                raise
            if acquired is None:
                await asyncio.sleep(TURN_POLL_SECONDS)
        events = self._events(_Turn(plan), _either(cancel, stop), acquired)
        done = object()
        step: concurrent.futures.Future[Any] | None = None
        started = False
        try:
            while True:
                step = _EXECUTOR.submit(_step, events, done)
                started = True
                event = await asyncio.wrap_future(step)
                step = None
                if event is done:
                    break
                yield event
        finally:
            stop.set()  # an abandoned turn ends at its next token
            if not started:  # the turn never ran: its lock is released here
                self._release(acquired[1].session_id, acquired[0])
            elif step is None:
                events.close()
            else:  # the step still runs in its thread: close the turn once it returns
                step.add_done_callback(lambda _: events.close())

    def run_plan(
        self, plan: TurnPlan, cancel: threading.Event | None = None
    ) -> Generator[ChatEvent, None, None]:
        """The turn of a validated plan (see ``plan``)."""
        return self._events(_Turn(plan), cancel)

    def _acquire(
        self, plan: TurnPlan, blocking: bool = True
    ) -> tuple[threading.Lock, Session] | None:
        """Choose the session and take its turn lock: waits for a turn in flight on it,
        or returns None at once when not ``blocking``."""
        with self._guard:
            if plan.session_id is not None:
                sid, fork_of = plan.session_id, None
            else:
                sid, fork_of = choose_session(self.engine, plan.input_ids, set(self._busy))
            known = sid in self.engine.sessions
            if self.max_sessions is not None and not known:
                self._make_room()
            lock = self._locks.setdefault(sid, threading.Lock())
        if not lock.acquire(blocking=blocking):
            return None
        try:
            with self._guard:
                self._busy.add(sid)
            if fork_of is not None:
                session = fork_of.fork(sid)
                self.engine.sessions.put(session)
            else:
                session = self.engine.session(sid)
        except BaseException:
            self._release(sid, lock)
            raise
        return lock, session

    def _make_room(self) -> None:
        """Drop least recently used idle sessions until a new one fits ``max_sessions``."""
        assert self.max_sessions is not None
        store = self.engine.sessions
        ids = [*store.live_ids(), *store.spilled_ids()]
        if len(ids) < self.max_sessions:
            return
        idle = sorted(
            (sid for sid in ids if sid not in self._busy),
            key=lambda sid: store._sessions[sid].last_used,
        )
        if len(ids) - len(idle) >= self.max_sessions:
            raise TooManySessionsError(
                f"all {self.max_sessions} sessions are busy with turns in flight; retry later"
            )
        for sid in idle[: len(ids) - self.max_sessions + 1]:
            logger.info("dropping idle session %s (max_sessions=%d)", sid, self.max_sessions)
            store.drop(sid)
            self._locks.pop(sid, None)

    def _release_result(self, future: concurrent.futures.Future[Any]) -> None:
        """Release the turn lock an abandoned ``_acquire`` got."""
        if not future.cancelled() and future.exception() is None and future.result():
            lock, session = future.result()
            self._release(session.session_id, lock)

    def _release(self, sid: str, lock: threading.Lock) -> None:
        with self._guard:
            self._busy.discard(sid)
        lock.release()

    def _events(
        self,
        turn: _Turn,
        cancel: threading.Event | None,
        acquired: tuple[threading.Lock, Session] | None = None,
    ) -> Generator[ChatEvent, None, None]:
        # Without `acquired`, the session is chosen and locked at the first step, so an
        # iterator that is never started holds nothing.
        plan = turn.plan
        lock, session = acquired or self._acquire(plan)  # type: ignore[misc]
        turn.session_id = session.session_id
        shown: list[str] = []
        try:
            parser = ToolCallStreamParser(plan.tool_names) if plan.parse_tools else None
            calls: list[ParsedCall] = []
            json_text: list[str] = []

            def visible(delta: str) -> Generator[ChatEvent, None, None]:
                pieces: list[str] = []
                if parser is None:
                    pieces = [delta] if delta else []
                else:
                    for item in parser.feed(delta):
                        if isinstance(item, TextEvent):
                            pieces.append(item.text)
                        else:
                            calls.append(item)
                for piece in pieces:
                    if plan.json_mode:
                        json_text.append(piece)
                    elif piece:
                        shown.append(piece)
                        yield TextDelta(piece)

            for delta in self._generate(turn, session, cancel):
                yield from visible(delta)
            if parser is not None:
                for item in parser.finish():
                    if isinstance(item, TextEvent):
                        if plan.json_mode:
                            json_text.append(item.text)
                        elif item.text:
                            shown.append(item.text)
                            yield TextDelta(item.text)
                    else:
                        calls.append(item)
            if plan.json_mode:
                text = "".join(json_text)
                shown.append(text if calls else _valid_json(text))
                if shown[-1]:
                    yield TextDelta(shown[-1])
            tool_calls: list[dict[str, Any]] = []
            invalid: list[dict[str, Any]] = []
            for call in calls:
                chunk = call.chunk
                if call.invalid is None:
                    args = json.loads(chunk["args"])
                    tool_calls.append(
                        {
                            "id": chunk["id"],
                            "type": "function",
                            "function": {"name": chunk["name"], "arguments": args},
                        }
                    )
                    yield ToolCallEvent(id=chunk["id"], name=str(chunk["name"]), arguments=args)
                else:
                    record = call.invalid
                    invalid.append(dict(record))
                    yield InvalidToolCallEvent(
                        id=chunk["id"],
                        name=record["name"],
                        arguments=str(record["args"] or ""),
                        error=str(record["error"] or "invalid tool call"),
                    )
            self._remember(turn, "".join(shown), tool_calls, invalid)
            yield UsageEvent(
                prompt_tokens=len(plan.input_ids),
                cached_tokens=turn.reused,
                completion_tokens=len(turn.generated_ids),
            )
            yield self._retrieval_event(turn)
            reason = turn.finish
            if (tool_calls or invalid) and reason == "stop":
                reason = "tool_calls"
            yield FinishEvent(reason)
        finally:
            self._release(session.session_id, lock)

    def _remember(
        self,
        turn: _Turn,
        content: str,
        tool_calls: list[dict[str, Any]],
        invalid: list[dict[str, Any]],
    ) -> None:
        """Keep the exact ids of this answer (as a front end shows it), so its next
        appearance in a conversation is spliced instead of re-rendered."""
        plan = turn.plan
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if tool_calls:
            message["tool_calls"] = tool_calls
        if invalid:
            message["invalid_tool_calls"] = invalid
        if plan.message_id:
            message["id"] = plan.message_id
        self.tokens.remember(message, plan.prefill_ids + turn.generated_ids)

    # ------------------------------------------------------------------ decoding
    def _generate(
        self, turn: _Turn, session: Session, cancel: threading.Event | None
    ) -> Iterator[str]:
        """Sync the prompt, generate, and yield visible text deltas (stops cut)."""
        plan = turn.plan
        session.drain_retrievals()  # records of earlier, unrelated work
        began = time.perf_counter()
        if plan.prefill_choices:
            step = session.sync(plan.prompt.token_ids)
            turn.scored = self._choose_prefill(session, plan, step.logits)
            session.sync(plan.input_ids)
        else:
            step = session.sync(plan.input_ids)
        turn.prefill_seconds = time.perf_counter() - began
        turn.reused = int(step.reused_tokens)
        turn.computed = len(plan.input_ids) - turn.reused
        if plan.prefill_text:  # final now (a scored choice is made above)
            yield plan.prefill_text
        detok = Detokenizer(self.engine.tokenizer)
        stop_ids = set(plan.stop_token_ids)
        hold = max((len(s) for s in plan.stop), default=1) - 1
        began = time.perf_counter()
        text = ""
        emitted = 0
        finish = "length"
        tokens = self._tokens(session, plan)
        try:
            for token in tokens:
                turn.generated_ids.append(int(token))
                if token in stop_ids:
                    finish = "stop"
                    break
                text += detok.push(int(token))
                cut = find_stop(text, plan.stop)
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
                cut = find_stop(text, plan.stop)
                if cut is not None:
                    text = text[:cut]
                    finish = "stop"
            if len(text) > emitted:
                yield text[emitted:]
            turn.text = text
            turn.finish = finish
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
            turn.decode_seconds = time.perf_counter() - began
            turn.records = session.drain_retrievals()
            turn.stats = dict(session.stats())
            turn.context_tokens = len(session)
            if self.engine.config.trace != "off":
                turn.token_ids = list(session.token_ids)

    @staticmethod
    def _tokens(session: Session, plan: TurnPlan) -> Iterator[int]:
        """Sampled tokens, each appended to the session before it is yielded. Without a
        repetition penalty this is the engine's own ``Session.generate``."""
        if plan.repetition_penalty == 1.0:
            return session.generate(
                plan.max_new_tokens,
                temperature=plan.temperature,
                top_p=plan.top_p,
                stop_token_ids=plan.stop_token_ids,
                seed=plan.seed,
            )
        return _penalized(session, plan)

    @staticmethod
    def _choose_prefill(session: Session, plan: TurnPlan, logits: Any) -> int:
        """Forced call among several tools: pick the name the model finds most likely.

        Each candidate prefill (the call opening with one tool's name) is scored by its
        log-probability after the prompt; the candidates share the prompt, so scoring
        costs only their own few tokens. Returns the number of tokens computed to score.
        """
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

    # ------------------------------------------------------------------ results
    def _retrieval_event(self, turn: _Turn) -> RetrievalEvent:
        """Reuse, memory and retrieval figures of the turn (``response_metadata["infllm"]``
        in ChatInfLLM), plus the raw material for trace events."""
        plan = turn.plan
        digest = trace_data.summarize_retrievals(turn.records, max_blocks=8)
        stats = turn.stats
        summary: dict[str, Any] = {
            "session_id": turn.session_id,
            "tokens_reused": turn.reused,
            "tokens_computed": turn.computed,
            "tokens_generated": len(turn.generated_ids),
            "tokens_spliced": plan.prompt.spliced_tokens,
            "tokens_scored": turn.scored,
            "context_tokens": turn.context_tokens,
            "prompt_tokens": len(plan.input_ids),
            "blocks_in_memory": int(stats.get("blocks", 0)),
            "retrievals": digest["retrievals"],
            "blocks_retrieved": digest["blocks_selected"],
            "unique_blocks_retrieved": digest["unique_blocks"],
            "cache_hits": digest["cache_hits"],
            "cache_misses": digest["cache_misses"],
            "bytes_copied": digest["bytes_copied"],
            "top_blocks": [
                {k: b[k] for k in ("block", "start", "end", "count")} for b in digest["top_blocks"]
            ],
            "prefill_seconds": round(turn.prefill_seconds, 4),
            "decode_seconds": round(turn.decode_seconds, 4),
        }
        spans: list[dict[str, Any]] = []
        if self.engine.config.trace != "off" and plan.prompt.message_spans:
            spans = self._message_spans(plan)
            summary["message_spans"] = [
                {k: span[k] for k in ("index", "role", "start", "end")} for span in spans
            ]
        return RetrievalEvent(
            summary=summary,
            records=tuple(turn.records),
            token_ids=tuple(turn.token_ids),
            message_spans=tuple(spans),
        )

    @staticmethod
    def _message_spans(plan: TurnPlan) -> list[dict[str, Any]]:
        messages = plan.messages
        offsets = plan.prompt.message_spans
        if len(offsets) != len(messages):  # a JSON instruction was put in front
            messages = messages[len(messages) - len(offsets) :]
        return trace_data.build_message_spans(messages, offsets)

    # ------------------------------------------------------------------ sessions
    def session_ids(self) -> list[str]:
        """Every session the engine's store holds (in memory or spilled)."""
        store = self.engine.sessions
        return [*store.live_ids(), *store.spilled_ids()]

    def spill_all(self) -> None:
        """Write every live session to the store's spill folder and release its memory
        (busy sessions are skipped by the store); for a clean shutdown."""
        store = self.engine.sessions
        for sid in store.live_ids():
            try:
                store.spill(sid)
            except Exception:
                logger.warning("could not spill session %s", sid, exc_info=True)


_EXECUTOR = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="chat-core")
"""Runs ``arun`` steps; a step's thread finishes it even if the consumer went away."""


def _step(events: Iterator[ChatEvent], done: object) -> Any:
    return next(events, done)


class _either(threading.Event):
    """An event that is set when either of two events is (read-only use)."""

    def __init__(self, first: threading.Event | None, second: threading.Event) -> None:
        super().__init__()
        self._first = first
        self._second = second

    def is_set(self) -> bool:
        return self._second.is_set() or (self._first is not None and self._first.is_set())


def _penalized(session: Session, plan: TurnPlan) -> Iterator[int]:
    """Decode with a repetition penalty over the context's tokens (prompt + generated).

    Each step reads the logits, samples and appends under the session lock (released
    before the yield, like ``Session.generate``)."""
    generator = torch.Generator().manual_seed(plan.seed) if plan.seed is not None else None
    seen = set(session.token_ids)
    stops = set(plan.stop_token_ids)
    for _ in range(plan.max_new_tokens):
        with session.lock:
            session.ensure_resident()
            logits = session.last_logits
            if logits is None:
                raise RuntimeError("nothing to continue from: the prompt was not synced")
            token = sample_token(
                logits,
                plan.temperature,
                plan.top_p,
                generator,
                repetition_penalty=plan.repetition_penalty,
                previous=seen,
            )
            session.append([token])
        seen.add(token)
        yield token
        if token in stops:
            return


def _valid_json(text: str) -> str:
    """The JSON the model meant: repaired by ``json_repair`` (an object, ``{}`` at worst)."""
    with contextlib.suppress(ValueError, json.JSONDecodeError):
        value = json.loads(text)
        if isinstance(value, dict):
            return json.dumps(value, ensure_ascii=False)
    try:
        value = json_repair.loads(text)
    except Exception:  # the repair library must not break a turn
        value = None
    if not isinstance(value, dict):
        value = {}
    return json.dumps(value, ensure_ascii=False)


_RENDERERS_LOCK = threading.Lock()


def _shared_renderer(engine: Any, stop_ids: Sequence[int]) -> PromptRenderer:
    """One renderer per engine: its boundary caches serve every front end."""
    with _RENDERERS_LOCK:
        renderer = getattr(engine, "_chat_core_renderer", None)
        if renderer is None:
            renderer = PromptRenderer(engine.tokenizer, stop_ids)
            with contextlib.suppress(AttributeError):
                engine._chat_core_renderer = renderer
        return renderer
