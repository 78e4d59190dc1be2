"""InfLLMEngine: one Hugging Face causal LM with InfLLM attention, shared by many sessions."""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from langchain_infllm.config import InfLLMConfig
from langchain_infllm.engine import persistence
from langchain_infllm.engine.architectures import check_supported, layer_shape
from langchain_infllm.engine.attention import ATTENTION_NAME, infllm_attention_forward
from langchain_infllm.engine.block_cache import DeviceBlockCache
from langchain_infllm.engine.budget import check_device_fit, estimate_device_budget
from langchain_infllm.engine.host_memory import limit_heap_fragmentation
from langchain_infllm.engine.memory import LayerMemory
from langchain_infllm.engine.retrieval import selects_per_head
from langchain_infllm.engine.rope import RotaryTable
from langchain_infllm.engine.session import Session
from langchain_infllm.engine.store import SessionStore
from langchain_infllm.models.embedded import load_model_and_tokenizer

logger = logging.getLogger(__name__)

_REGISTER_LOCK = threading.Lock()
# Context length the device fit is checked for when the config sets no max_context.
FIT_CHECK_CONTEXT = 131_072


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The InfLLM attention builds its own masks; never materialise an n x n one."""
    return None


def register_attention() -> None:
    """Register the 'infllm' attention and mask functions with transformers (idempotent)."""
    with _REGISTER_LOCK:
        AttentionInterface.register(ATTENTION_NAME, infllm_attention_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def compact_reach(config: InfLLMConfig) -> int:
    """The farthest a query reaches under `memory_positions: compact` less one chunk:
    sinks, the retrieved blocks and the unsealed remainder packed behind the window."""
    if config.memory_positions != "compact":
        return 0
    remainder = config.block_size + config.exc_block_size
    return config.n_init + config.topk * config.block_size + remainder + config.n_local


def memory_distance(config: InfLLMConfig, model_config: Any) -> int:
    """The cap on a memory key's distance under `memory_positions: exact` (0: fixed).

    By default the model's native window less one execution chunk, so that every
    distance a query sees is one the model was trained on.
    """
    if config.memory_positions != "exact":
        return 0
    if config.max_memory_distance is not None:  # checked against n_local by the config
        return config.max_memory_distance
    native = int(getattr(model_config, "max_position_embeddings", 0) or 0)
    return max(native - config.exc_block_size, config.n_local)


class InfLLMEngine:
    """Wraps a loaded causal LM; sessions hold the per-conversation context memory.

    The engine switches the model's attention implementation to 'infllm', so the model
    object belongs to the engine afterwards. One forward runs at a time.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any | None,
        config: InfLLMConfig | None = None,
        *,
        model_name: str | None = None,
        spill_dir: str | Path | None = None,
    ) -> None:
        self.config = config or InfLLMConfig()
        model_config = check_supported(model)
        register_attention()
        limit_heap_fragmentation()
        model.set_attn_implementation(ATTENTION_NAME)  # type: ignore[operator]
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.model_name = model_name or str(getattr(model_config, "name_or_path", "") or "model")
        first = next(model.parameters())
        self.device = first.device
        self.dtype = first.dtype
        self.host_device = torch.device("cpu")
        self.shape = layer_shape(model_config)
        self.num_layers = int(model_config.num_hidden_layers)
        self.vocab_size = int(model_config.vocab_size)
        cfg = self.config
        # Per-head methods cache one KV head's slice per entry: the same device bytes.
        slices = self.shape.kv_heads if selects_per_head(cfg.retrieval) else 1
        self.memory_distance = memory_distance(cfg, model_config)
        self.rope = RotaryTable(
            model.model.rotary_emb,  # type: ignore[union-attr,arg-type]
            # Local keys are rotated against the tail start (LayerMemory.rotated_window),
            # up to a block (the remainder) behind the window; exact memory positions
            # reach `memory_distance` plus a chunk.
            size=max(cfg.n_local + cfg.block_size, self.memory_distance, compact_reach(cfg))
            + cfg.exc_block_size + 1,
            head_dim=self.shape.head_dim,
            device=self.device,
        )
        self.caches = [
            DeviceBlockCache(
                cfg.max_cached_block * slices,
                self.device,
                strategy=cfg.cache_strategy,
                score_decay=cfg.score_decay,
                use_side_stream=cfg.async_global_stream,
            )
            for _ in range(self.num_layers)
        ]
        self.model_lock = threading.Lock()
        self._uids = itertools.count()
        self._uid_lock = threading.Lock()
        self.tokens_computed = 0  # every token that went through the model, all sessions
        # Every session object alive, to know whether a dropped block is still referenced.
        self._alive: weakref.WeakSet[Session] = weakref.WeakSet()
        self._alive_lock = threading.Lock()
        self.sessions = SessionStore(self, spill_dir=spill_dir)
        self.device_budget = estimate_device_budget(
            cfg,
            self.shape,
            num_layers=self.num_layers,
            hidden_size=int(getattr(model_config, "hidden_size", 0) or 0),
            intermediate_size=int(getattr(model_config, "intermediate_size", 0) or 0),
            vocab_size=self.vocab_size,
            dtype=self.dtype,
            weights_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        )
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            check_device_fit(self.device_budget, free, cfg.max_context or FIT_CHECK_CONTEXT)

    # ----------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        config: InfLLMConfig | str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        trust_remote_code: bool = False,
    ) -> InfLLMEngine:
        """Load a model by hub id, local path, or embedded name (see `models.embedded`)."""
        if isinstance(config, str | Path):
            config = InfLLMConfig.from_yaml(config)
        model, tokenizer = load_model_and_tokenizer(
            name_or_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
        return cls(model, tokenizer, config, model_name=name_or_path)

    # --------------------------------------------------------------- sessions
    def new_session(self, session_id: str | None = None) -> Session:
        """A fresh, empty session (not kept in the store unless `session_id` is given)."""
        session = Session(self, session_id)
        if session_id is not None:
            self.sessions.put(session)
        return session

    def session(self, session_id: str) -> Session:
        """Get or create the stored session with this id (reloaded from disk if spilled)."""
        return self.sessions.get_or_create(session_id)

    def load_session(self, path: str | Path, session_id: str | None = None) -> Session:
        """Load a session saved with `Session.save`; verifies model and config identity."""
        session = persistence.load_session(self, Path(path), session_id, Session)
        if session_id is not None:
            self.sessions.put(session)
        return session

    # ------------------------------------------------------------- internals
    def register_session(self, session: Session) -> None:
        """Called by `Session.__init__`: the engine tracks (weakly) which sessions exist."""
        with self._alive_lock:
            self._alive.add(session)

    def forget_blocks(
        self, dropped: Sequence[Iterable[int]], owner: Session, *, model_locked: bool = False
    ) -> None:
        """Free the device cache slots of blocks `owner` no longer holds (per layer).

        Blocks another session still references (a fork shares its parent's blocks) stay
        cached. The caches are shared with running forwards, so this takes the model
        lock unless the caller already holds it (`model_locked`).
        """
        per_layer = [set(uids) for uids in dropped]
        if not any(per_layer):
            return
        with self._alive_lock:
            others = [s for s in self._alive if s is not owner]
        if model_locked:
            self._forget_blocks(per_layer, others)
        else:
            with self.model_lock:
                self._forget_blocks(per_layer, others)

    def _forget_blocks(self, per_layer: list[set[int]], others: list[Session]) -> None:
        for i, uids in enumerate(per_layer):
            for other in others:
                if not uids:
                    break
                uids.difference_update(other.block_uids(i))
            if uids:
                self.caches[i].forget(uids)

    def next_uid(self) -> int:
        with self._uid_lock:
            return next(self._uids)

    def new_layer_memory(self) -> LayerMemory:
        cfg = self.config
        return LayerMemory(
            self.shape,
            n_init=cfg.n_init,
            block_size=cfg.block_size,
            repr_topk=cfg.repr_topk,
            dtype=self.dtype,
            device=self.device,
            host_device=self.host_device,
            pin_memory=cfg.pin_memory,
            repr_on_host=cfg.repr_on_host,
            retrieval=cfg.retrieval,
        )

    def identity(self) -> dict[str, Any]:
        """What a saved session must match to be loaded into this engine."""
        return {
            "model_name": self.model_name,
            "model_type": self.model_config.model_type,
            "num_layers": self.num_layers,
            "heads": self.shape.heads,
            "kv_heads": self.shape.kv_heads,
            "head_dim": self.shape.head_dim,
            "vocab_size": self.vocab_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "weights_fingerprint": self.weights_fingerprint(),
            "config_fingerprint": self.config.fingerprint(),
        }

    def weights_fingerprint(self) -> str:
        """A hash that changes when any weight of the model changes; computed once.

        Every parameter contributes its name, shape and dtype and, reading its raw bits
        as integers (`[rows, -1]`), the exact int64 sum of every row and of every column.
        Integer sums are exact and independent of summation order, so the value is the
        same on any device, thread count or reduction kernel.

        Trade-off: every weight is read once, on its own device (about a millisecond per
        GiB on a GPU, where only the sums are copied back, and a fraction of a second per
        GiB on a CPU), instead of hashing every byte, which on a GPU would mean copying
        the whole model to the host. Any changed element changes its row's sum, and any
        two swapped unequal elements change a row's or a column's sum, so a fine-tune,
        a rescaled or shifted tensor, or a single edited weight is always seen; only a
        contrived edit that keeps every row and column sum of every tensor (e.g. +d/-d
        at the four corners of a rectangle) would go unnoticed. Weights modified after
        the first call are not seen (the value is cached).
        """
        if not hasattr(self, "_fingerprint"):
            digest = hashlib.sha256()
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    _digest_tensor(digest, name, param.detach())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def cache_resident_bytes(self) -> int:
        """Device bytes held by the block caches of all layers."""
        return sum(cache.resident_bytes for cache in self.caches)

    def cache_budget_bytes(self) -> int:
        """Upper bound of `cache_resident_bytes` implied by the config."""
        per_block = (
            2 * self.shape.kv_heads * self.config.block_size * self.shape.head_dim
            * torch.tensor([], dtype=self.dtype).element_size()
        )
        return self.num_layers * self.config.max_cached_block * per_block


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _digest_tensor(digest: Any, name: str, t: torch.Tensor) -> None:
    """Feed `name`, shape, dtype and the exact row and column sums of `t`'s bits."""
    digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel() == 0:
        return
    bits = t.view(_INT_OF_SIZE[t.element_size()])
    grid = bits.reshape(bits.shape[0], -1) if bits.dim() > 1 else bits.reshape(1, -1)
    if grid.device.type == "cpu":  # numpy's integer reductions are far faster here
        array = grid.numpy()
        rows, cols = array.sum(axis=1, dtype=np.int64), array.sum(axis=0, dtype=np.int64)
    else:
        rows = grid.sum(dim=1, dtype=torch.int64).cpu().numpy()
        cols = grid.sum(dim=0, dtype=torch.int64).cpu().numpy()
    digest.update(rows.astype("<i8").tobytes())
    digest.update(cols.astype("<i8").tobytes())
