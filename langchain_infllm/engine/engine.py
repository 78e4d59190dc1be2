"""InfLLMEngine: one Hugging Face causal LM with InfLLM attention, shared by many sessions."""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from langchain_infllm.config import InfLLMConfig
from langchain_infllm.engine.architectures import check_supported, layer_shape
from langchain_infllm.engine.attention import ATTENTION_NAME, infllm_attention_forward
from langchain_infllm.engine.block_cache import DeviceBlockCache
from langchain_infllm.engine.memory import LayerMemory
from langchain_infllm.engine.rope import RotaryTable
from langchain_infllm.engine.session import Session
from langchain_infllm.engine.store import SessionStore

logger = logging.getLogger(__name__)

_REGISTER_LOCK = threading.Lock()


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The InfLLM attention builds its own masks; never materialise an n x n one."""
    return None


def register_attention() -> None:
    """Register the 'infllm' attention and mask functions with transformers (idempotent)."""
    with _REGISTER_LOCK:
        AttentionInterface.register(ATTENTION_NAME, infllm_attention_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


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
        self.rope = RotaryTable(
            model.model.rotary_emb,  # type: ignore[union-attr,arg-type]
            size=cfg.n_local + cfg.exc_block_size + 1,
            head_dim=self.shape.head_dim,
            device=self.device,
        )
        self.caches = [
            DeviceBlockCache(
                cfg.max_cached_block,
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
        self.sessions = SessionStore(self, spill_dir=spill_dir)

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
        from langchain_infllm.models.embedded import load_model_and_tokenizer

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
        from langchain_infllm.engine.persistence import load_session

        session = load_session(self, Path(path), session_id)
        if session_id is not None:
            self.sessions.put(session)
        return session

    # ------------------------------------------------------------- internals
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
        """A cheap hash of a slice of the embedding and the final norm weights."""
        if not hasattr(self, "_fingerprint"):
            digest = hashlib.sha256()
            embed = self.model.get_input_embeddings().weight  # type: ignore[operator]
            sample = embed.detach().reshape(-1)[:65536].to(torch.float32).cpu()
            digest.update(sample.numpy().tobytes())
            norm = getattr(self.model.model, "norm", None)
            if norm is not None and hasattr(norm, "weight"):
                digest.update(norm.weight.detach().to(torch.float32).cpu().numpy().tobytes())
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
