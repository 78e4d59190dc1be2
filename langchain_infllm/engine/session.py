"""Session: one conversation's context memory plus the exact tokens it has consumed.

The invariant every method keeps, even when a forward fails half-way: `token_ids`
describes exactly what the memory of every layer holds (and a failed forward leaves no
attention mass behind either). A session the store spilled keeps its token ids and
reloads its memory on first use, so a caller's handle stays valid.
"""

from __future__ import annotations

import logging
import numbers
import operator
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt

from langchain_infllm.engine import persistence
from langchain_infllm.engine.attention import InfLLMForwardContext
from langchain_infllm.engine.memory import LayerMemory
from langchain_infllm.engine.persistence import SessionFileError
from langchain_infllm.engine.records import RetrievalRecord, StepResult
from langchain_infllm.engine.sampling import (
    check_seed,
    check_temperature,
    check_top_p,
    sample_token,
)

if TYPE_CHECKING:
    from langchain_infllm.engine.engine import InfLLMEngine

logger = logging.getLogger(__name__)

OOM_ATTEMPTS = 3


class EngineOutOfMemoryError(RuntimeError):
    """A forward ran out of memory even with smaller execution chunks; nothing was lost."""


class ContextLimitError(ValueError):
    """The session would exceed the configured `max_context`."""


class Session:
    """Context memory for one token stream; only new tokens are ever computed."""

    def __init__(self, engine: InfLLMEngine, session_id: str | None = None) -> None:
        self.engine = engine
        self.session_id = session_id or uuid.uuid4().hex
        self.lock = threading.RLock()
        self._layers = [engine.new_layer_memory() for _ in range(engine.num_layers)]
        self._spill_path: Path | None = None  # set while the memory lives on disk
        self._spilled_blocks = 0
        self._tokens: list[int] = []
        self.last_logits: torch.Tensor | None = None
        self._retrievals: list[RetrievalRecord] = []
        self.trace_sink: Callable[[RetrievalRecord], None] | None = None
        # Diagnostics: sees each chunk's memory-side queries (see InfLLMForwardContext).
        self.observer: Callable[[int, int, torch.Tensor, LayerMemory], None] | None = None
        self.totals = {"computed": 0, "reused": 0, "hits": 0, "misses": 0, "bytes_copied": 0}
        self.last_used = time.monotonic()
        engine.register_session(self)

    # ------------------------------------------------------------------ views
    @property
    def layers(self) -> list[LayerMemory]:
        """The per-layer memory; a spilled session is reloaded from disk first."""
        if self._spill_path is not None:
            self.ensure_resident()
        return self._layers

    @layers.setter
    def layers(self, value: list[LayerMemory]) -> None:
        self._layers = value

    @property
    def spilled(self) -> bool:
        """True while the memory lives in a spill snapshot (see `SessionStore`)."""
        return self._spill_path is not None

    @property
    def token_ids(self) -> list[int]:
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def n_blocks(self) -> int:
        if self._spill_path is not None:
            return self._spilled_blocks
        return self._layers[0].n_blocks if self._layers else 0

    def device_bytes(self) -> int:
        """Device bytes held now (0 while spilled; never reloads)."""
        return sum(layer.device_bytes() for layer in self._layers)

    def host_bytes(self) -> int:
        """Host bytes held now (0 while spilled; never reloads)."""
        return sum(layer.host_bytes() for layer in self._layers)

    def block_uids(self, layer: int) -> list[int]:
        """Engine-wide ids of the sealed blocks this session holds in `layer` (none while
        spilled; never reloads)."""
        layers = self._layers
        return list(layers[layer].block_uids) if layer < len(layers) else []

    def stats(self) -> dict[str, Any]:
        """Counters for this session (cumulative) and what it holds now."""
        return {
            "session_id": self.session_id,
            "spilled": self.spilled,
            "tokens": len(self._tokens),
            "blocks": self.n_blocks,
            "tokens_computed": self.totals["computed"],
            "tokens_reused": self.totals["reused"],
            "cache_hits": self.totals["hits"],
            "cache_misses": self.totals["misses"],
            "bytes_copied": self.totals["bytes_copied"],
            "device_bytes": self.device_bytes(),
            "host_bytes": self.host_bytes(),
            "cache_resident_bytes": self.engine.cache_resident_bytes(),
        }

    def drain_retrievals(self) -> list[RetrievalRecord]:
        """Retrieval records since the last drain (kept only when `trace` is not 'off')."""
        with self.lock:
            records, self._retrievals = self._retrievals, []
            return records

    # -------------------------------------------------------------- mutation
    def append(self, token_ids: Iterable[int]) -> StepResult:
        """Process exactly these tokens (in chunks) and return the last one's logits."""
        ids = self._validate_ids(token_ids)
        result = self._append(ids)
        if result.computed_tokens:
            # The session grew: the store may now be over its host budget. Other sessions
            # are only try-locked there, so this cannot deadlock.
            self.engine.sessions.note_growth(self)
        return result

    def _append(self, ids: list[int]) -> StepResult:
        with self.lock:
            self.ensure_resident()
            self.last_used = time.monotonic()
            if not ids:
                return StepResult(logits=self.last_logits, computed_tokens=0)
            limit = self.engine.config.max_context
            if limit is not None and len(self._tokens) + len(ids) > limit:
                raise ContextLimitError(
                    f"session would hold {len(self._tokens) + len(ids)} tokens; "
                    f"max_context is {limit}"
                )
            began = time.perf_counter()
            counters_before = self._cache_counters()
            records: list[RetrievalRecord] = []
            calls = self._model_calls(ids)
            if len(calls) == 1:
                self._forward_with_retry(calls[0], records)  # one model call: atomic by itself
            else:
                self._forward_calls(calls, records)
            hits, misses, copied = (
                now - then
                for now, then in zip(self._cache_counters(), counters_before, strict=True)
            )
            self.totals["computed"] += len(ids)
            self.totals["hits"] += hits
            self.totals["misses"] += misses
            self.totals["bytes_copied"] += copied
            if self.engine.config.trace != "off":
                self._retrievals.extend(records)
            return StepResult(
                logits=self.last_logits,
                computed_tokens=len(ids),
                seconds=time.perf_counter() - began,
                cache_hits=hits,
                cache_misses=misses,
                bytes_copied=copied,
                retrievals=records,
            )

    def sync(self, prompt_ids: Sequence[int]) -> StepResult:
        """Make the session hold exactly `prompt_ids`, computing only what is new.

        The longest common prefix with the consumed tokens is kept; a divergent suffix is
        truncated (nothing before it is recomputed). If the prompt is a prefix of what was
        consumed, the last prompt token is recomputed to obtain its logits.
        """
        prompt = self._validate_ids(prompt_ids)
        if not prompt:
            raise ValueError("cannot sync to an empty prompt")
        with self.lock:
            limit = self.engine.config.max_context
            if limit is not None and len(prompt) > limit:
                # Checked before truncating: a refused prompt leaves the session untouched.
                raise ContextLimitError(
                    f"prompt of {len(prompt)} tokens; max_context is {limit}"
                )
            self.ensure_resident()
            common = _common_prefix(self._tokens, prompt)
            if common == len(prompt) == len(self._tokens) and self.last_logits is not None:
                self.totals["reused"] += common
                return StepResult(logits=self.last_logits, computed_tokens=0, reused_tokens=common)
            if common == len(prompt):
                common -= 1  # need the logits after the last prompt token
            if common < len(self._tokens):
                self.truncate(common)
            result = self.append(prompt[common:])
            result.reused_tokens = common
            self.totals["reused"] += common
            return result

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens; computes nothing, keeps their K/V byte-identical."""
        with self.lock:
            if not 0 <= length <= len(self._tokens):
                raise ValueError(f"truncate({length}) outside [0, {len(self._tokens)}]")
            if length == len(self._tokens):
                return
            self.ensure_resident()
            dropped = self._truncate_layers(length)
            del self._tokens[length:]
            self.last_logits = None
            self.engine.forget_blocks(dropped, self)

    def close(self) -> None:
        """Empty the session and free what it holds, device cache slots included.

        The object stays usable (as an empty session); blocks a fork still references
        stay cached for the fork.
        """
        with self.lock:
            if self._spill_path is not None:
                shutil.rmtree(self._spill_path, ignore_errors=True)
                self._spill_path = None
                self._spilled_blocks = 0
                engine = self.engine
                self._layers = [engine.new_layer_memory() for _ in range(engine.num_layers)]
                self._tokens.clear()
                self.last_logits = None
                return
            self.truncate(0)

    def generate(
        self,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: Iterable[int] = (),
        seed: int | None = None,
    ) -> Iterator[int]:
        """Yield sampled tokens; each is appended to the session before it is yielded.

        Closing the iterator early is safe: the session then holds the prompt plus exactly
        the tokens yielded so far.
        """
        # Checked here, before the first token: a bad argument changes nothing.
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
            raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        temperature = check_temperature(temperature)
        top_p = check_top_p(top_p)
        seed = check_seed(seed)
        stops = set(self._validate_ids(stop_token_ids, "stop_token_ids"))
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return self._generate(int(max_new_tokens), temperature, top_p, stops, generator)

    def _generate(
        self,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stops: set[int],
        generator: torch.Generator | None,
    ) -> Iterator[int]:
        for _ in range(max_new_tokens):
            # Read logits, sample and append under one lock hold, so no other thread's
            # append can slip between the context a token was sampled from and the token.
            # The lock is released before yielding: a paused consumer blocks nobody.
            with self.lock:
                self.ensure_resident()
                logits = self.last_logits
                if logits is None:
                    raise RuntimeError("nothing to continue from: append or sync a prompt first")
                token = sample_token(logits, temperature, top_p, generator)
                self.append([token])
            yield token
            if token in stops:
                return

    def fork(self, session_id: str | None = None) -> Session:
        """An independent copy sharing the immutable sealed blocks with this session."""
        with self.lock:
            self.ensure_resident()
            layers = [layer.clone() for layer in self.layers]  # may fail: nothing made yet
            twin = Session(self.engine, session_id)
            twin.layers = layers
            twin._tokens = list(self._tokens)
            twin.last_logits = None if self.last_logits is None else self.last_logits.clone()
            return twin

    def save(self, path: str | Path) -> Path:
        """Write a snapshot (safetensors + JSON manifest) atomically; returns the folder."""
        with self.lock:
            self.ensure_resident()
            return persistence.save_session(self, Path(path))

    # ------------------------------------------------------------- spilling
    def spill_to(self, path: Path) -> None:
        """Write the memory to the snapshot `path` and release it (the store calls this).

        Tokens stay in memory; any later use reloads the memory first, so a caller that
        holds this object never notices (apart from the time the reload takes).
        """
        with self.lock:
            if self._spill_path is not None:
                return
            self.save(path)
            dropped = [layer.block_uids for layer in self._layers]
            self._spilled_blocks = self.n_blocks
            self._spill_path = path
            self._layers = []
            self.last_logits = None
            self.engine.forget_blocks(dropped, self)

    def ensure_resident(self) -> None:
        """Reload the memory of a spilled session.

        The token ids never leave this object, so a spill snapshot that is gone or
        corrupt loses nothing: the memory is recomputed from them (with a warning). If
        that fails too (out of memory, interrupted) the session stays spilled, exactly as
        it was, and the error propagates; a later call tries again.
        """
        if self._spill_path is None:
            return
        with self.lock:
            path = self._spill_path
            if path is None:
                return
            try:
                loaded = persistence.load_session(self.engine, path, self.session_id, Session)
                if loaded.token_ids != self._tokens:
                    raise SessionFileError(
                        f"{path}: spill snapshot of session {self.session_id!r} holds "
                        "other tokens"
                    )
            except SessionFileError as exc:
                logger.warning(
                    "session %s: spill snapshot unusable (%s); recomputing its %d tokens",
                    self.session_id, exc, len(self._tokens),
                )
                self._recompute_spilled(path)
            else:
                self._layers, loaded._layers = loaded._layers, []
                self.last_logits = loaded.last_logits
                self._spill_path = None
                self._spilled_blocks = 0
                logger.info("session %s reloaded from %s", self.session_id, path)
            self.last_used = time.monotonic()
            shutil.rmtree(path, ignore_errors=True)

    def _recompute_spilled(self, path: Path) -> None:
        """Rebuild a spilled session's memory from its token ids, all or nothing."""
        tokens = self._tokens
        self._layers = [self.engine.new_layer_memory() for _ in range(self.engine.num_layers)]
        self._tokens = []
        self._spill_path = None
        try:
            self._append(tokens)
        except BaseException:
            dropped = [layer.block_uids for layer in self._layers]
            self._layers, self._tokens, self.last_logits = [], tokens, None
            self._spill_path = path
            self.engine.forget_blocks(dropped, self)
            raise
        self._spilled_blocks = 0

    # ------------------------------------------------------------- internals
    def _validate_ids(self, token_ids: Iterable[int], name: str = "token_ids") -> list[int]:
        """Integer ids in the vocabulary, or ValueError naming `name` and the position.

        Only true integers pass (ints, numpy/torch integer scalars): a float such as 1.5,
        a bool or a string is refused rather than silently converted.
        """
        if isinstance(token_ids, str | bytes) or not isinstance(token_ids, Iterable):
            raise ValueError(
                f"{name} must be a sequence of integer token ids, got "
                f"{type(token_ids).__name__}"
            )
        ids = []
        for i, t in enumerate(token_ids):
            if isinstance(t, bool) or _is_bool_tensor(t):
                raise ValueError(f"{name}[{i}] must be an integer token id, got {t!r}")
            try:
                ids.append(operator.index(t))
            except TypeError:
                raise ValueError(
                    f"{name}[{i}] must be an integer token id, got {t!r} ({type(t).__name__})"
                ) from None
        vocab = self.engine.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{name}: token ids out of range [0, {vocab}): {bad[:5]}")
        return ids

    def _cache_counters(self) -> tuple[int, int, int]:
        hits = misses = copied = 0
        for cache in self.engine.caches:
            h, m, c = cache.counters.snapshot()
            hits, misses, copied = hits + h, misses + m, copied + c
        return hits, misses, copied

    def _out_of_window_end(self, length: int) -> int:
        return max(0, length - self.engine.config.n_local + 1)

    def _truncate_layers(self, length: int) -> list[list[int]]:
        """Truncate every layer; returns the uids of the blocks each layer dropped."""
        end = self._out_of_window_end(length)
        # All or nothing: every layer's new state is prepared (what can fail: device
        # copies, new tails) before any layer changes; committing is assignment.
        plans = [layer.plan_truncate(min(length, layer.length), end) for layer in self._layers]
        dropped = []
        for layer, plan in zip(self._layers, plans, strict=True):
            kept = plan.get("block_uids", layer.block_uids)
            assert isinstance(kept, list)
            dropped.append(layer.block_uids[len(kept) :])
        for layer, plan in zip(self._layers, plans, strict=True):
            layer.commit(plan)
        return dropped

    def _forward_with_retry(self, ids: list[int], records: list[RetrievalRecord]) -> None:
        exc_size = self.engine.config.exc_block_size

        def shrink(_: Any) -> None:
            nonlocal exc_size
            exc_size = max(1, exc_size // 2)
            logger.warning("out of memory; retrying with execution chunks of %d", exc_size)

        retrying = Retrying(
            retry=retry_if_exception_type(torch.OutOfMemoryError),
            stop=stop_after_attempt(OOM_ATTEMPTS),
            before_sleep=shrink,
            reraise=False,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self._forward(ids, exc_size, records)
        except RetryError as exc:
            raise EngineOutOfMemoryError(
                f"out of memory on {len(ids)} tokens even with execution chunks of {exc_size}; "
                f"the session still holds its {len(self._tokens)} earlier tokens"
            ) from exc.last_attempt.exception()

    def _model_calls(self, ids: list[int]) -> list[list[int]]:
        """The model calls of one append: `chunk_size` tokens each, and with
        `last_token_alone` the last token on its own. A prompt's last token produces the
        logits of the answer's first token; inside a chunk it would retrieve with means
        over the chunk's queries (mostly the text before it: in a pass-key prompt, filler)
        and miss the block a decode step with its own query finds."""
        config = self.engine.config
        calls = [ids[a : a + config.chunk_size] for a in range(0, len(ids), config.chunk_size)]
        if config.last_token_alone and config.topk > 0 and len(calls[-1]) > 1:
            calls[-1:] = [calls[-1][:-1], calls[-1][-1:]]
        return calls

    def _forward_calls(self, calls: list[list[int]], records: list[RetrievalRecord]) -> None:
        """Several model calls as one mutation: if any fails, the calls that completed are
        rolled back too, so the session holds exactly what it held before the append."""
        engine = self.engine
        start, logits = len(self._tokens), self.last_logits
        with engine.model_lock:
            checkpoints = [layer.checkpoint(start, engine.config.n_local) for layer in self._layers]
            cache_scores = [cache.score_state() for cache in engine.caches]
        try:
            for call in calls:
                self._forward_with_retry(call, records)
        except BaseException:
            with engine.model_lock:
                dropped = [
                    layer.rollback(checkpoint)
                    for layer, checkpoint in zip(self._layers, checkpoints, strict=True)
                ]
                for cache, scores in zip(engine.caches, cache_scores, strict=True):
                    cache.restore_score_state(scores)
                del self._tokens[start:]
                self.last_logits = logits
                engine.forget_blocks(dropped, self, model_locked=True)
            raise

    def _forward(self, ids: list[int], exc_size: int, records: list[RetrievalRecord]) -> None:
        engine = self.engine
        start = len(self._tokens)
        pending: list[RetrievalRecord] = []
        sink = self.trace_sink

        def record(rec: RetrievalRecord) -> None:
            pending.append(rec)

        ctx = InfLLMForwardContext(
            layers=self.layers,
            caches=engine.caches,
            rope=engine.rope,
            start=start,
            n_local=engine.config.n_local,
            topk=engine.config.topk,
            exc_block_size=exc_size,
            next_uid=engine.next_uid,
            record=record if engine.config.trace != "off" or sink is not None else None,
            observe=self.observer,
            fused=engine.config.fused_attention,
            query_group=engine.config.query_group,
            neighbours=engine.config.neighbours,
            fast_decode=engine.config.fast_decode,
            direct_blocks=engine.config.direct_blocks,
            memory_positions=engine.config.memory_positions,
            memory_distance=engine.memory_distance,
            position_group=engine.config.position_group,
        )
        input_ids = torch.tensor([ids], dtype=torch.long, device=engine.device)
        position_ids = torch.zeros_like(input_ids)
        n_local = engine.config.n_local
        with engine.model_lock, torch.no_grad():
            # What a failed forward would leave behind besides the new tokens: attention
            # mass on the window's keys (it picks representative keys later) and the
            # lru-s scores of the shared block caches.
            # Each layer's state as it is now (see LayerMemory.checkpoint): a rollback to
            # it is assignment only, so it cannot itself fail half-way.
            checkpoints = [layer.checkpoint(start, n_local) for layer in self._layers]
            cache_scores = [cache.score_state() for cache in engine.caches]
            try:
                out = engine.model(
                    input_ids=input_ids,
                    position_ids=position_ids,
                    use_cache=False,
                    logits_to_keep=1,
                    infllm_context=ctx,
                )
                logits = out.logits[0, -1].to(torch.float32)
            except BaseException:
                # Layers may have consumed part of the chunk (appended, sealed): put every
                # one back exactly as it was, attention mass included.
                dropped = [
                    layer.rollback(checkpoint)
                    for layer, checkpoint in zip(self._layers, checkpoints, strict=True)
                ]
                for cache, scores in zip(engine.caches, cache_scores, strict=True):
                    cache.restore_score_state(scores)
                engine.forget_blocks(dropped, self, model_locked=True)
                raise
        self._tokens.extend(ids)
        self.last_logits = logits
        engine.tokens_computed += len(ids)
        records.extend(pending)
        if sink is not None:
            for rec in pending:
                sink(rec)


def _is_bool_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
