"""Device memory an engine needs besides the weights, checked before any work is done.

The promise of offloading is a fixed device budget whatever the context length: per
session the sinks, the tail (window + remainder + one execution chunk), and the
representative keys (one per block and query head; they grow with the context unless
`repr_on_host`), plus per engine the block cache and the working set of one chunk
(activations of `chunk_size` tokens and one execution block's attention logits). The
per-head `maxkey` / `maxmass` retrieval also keeps an index of every sealed key (one
token's K per layer), which grows with the context like the representatives but is
larger for long contexts: the fit check counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from langchain_infllm.config import InfLLMConfig
from langchain_infllm.engine.memory import LayerShape
from langchain_infllm.engine.retrieval import needs_key_index

GIB = 1024**3


class DeviceMemoryError(MemoryError):
    """The config cannot fit the device: raised before any session does work."""


@dataclass(frozen=True)
class DeviceBudget:
    """Estimated device bytes, by part (see the module docstring)."""

    weights: int
    block_cache: int
    session_fixed: int
    representatives_per_1m_tokens: int
    chunk_working_set: int

    def needed(self, context_tokens: int) -> int:
        """Bytes beyond the weights for one session holding `context_tokens`."""
        reprs = self.representatives_per_1m_tokens * context_tokens // 1_000_000
        return self.block_cache + self.session_fixed + reprs + self.chunk_working_set

    def describe(self, context_tokens: int) -> str:
        parts = {
            "weights (loaded)": self.weights,
            "block cache": self.block_cache,
            "sinks + window per session": self.session_fixed,
            f"representative keys (and key index) at {context_tokens:,} tokens": (
                self.representatives_per_1m_tokens * context_tokens // 1_000_000
            ),
            "one chunk's activations and logits": self.chunk_working_set,
        }
        return ", ".join(f"{name} {value / GIB:.2f} GiB" for name, value in parts.items())


def estimate_device_budget(
    config: InfLLMConfig,
    shape: LayerShape,
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    vocab_size: int,
    dtype: torch.dtype,
    weights_bytes: int,
) -> DeviceBudget:
    """Estimate what `config` costs on the device for this model geometry."""
    item = torch.tensor([], dtype=dtype).element_size()
    kv_token = 2 * shape.kv_heads * shape.head_dim * item  # one token's K and V, one layer
    block_cache = num_layers * config.max_cached_block * config.block_size * kv_token
    # The tail buffer grows to twice what it holds: window + remainder + a model chunk.
    tail_tokens = 2 * (config.n_local + config.block_size + config.chunk_size)
    # ... plus the rotated copy of its keys (LayerMemory.rotated_window): half a K/V pair.
    session_fixed = num_layers * (config.n_init + tail_tokens) * kv_token
    session_fixed += num_layers * tail_tokens * kv_token // 2
    reprs = 0 if config.repr_on_host else shape.heads * shape.head_dim * item * num_layers
    representatives_per_1m = reprs * 1_000_000 // config.block_size
    if needs_key_index(config.retrieval) and not config.repr_on_host:
        # one key per token and layer; the buffer grows by doubling, so count twice that
        representatives_per_1m += 2_000_000 * shape.kv_heads * shape.head_dim * item * num_layers
    memory_keys = config.n_init + config.topk * config.block_size
    keys = memory_keys + config.n_local + 2 * config.exc_block_size
    logits = 3 * shape.heads * config.exc_block_size * keys * 4  # fp32 logits, probs, mask
    activations = config.chunk_size * (4 * hidden_size + 2 * intermediate_size) * item
    last_logits = vocab_size * 4 * 2
    return DeviceBudget(
        weights=weights_bytes,
        block_cache=block_cache,
        session_fixed=session_fixed,
        representatives_per_1m_tokens=representatives_per_1m,
        chunk_working_set=logits + activations + last_logits,
    )


def check_device_fit(budget: DeviceBudget, free_bytes: int, context_tokens: int) -> None:
    """Raise `DeviceMemoryError` with the numbers when one session of `context_tokens`
    would not fit in `free_bytes` of device memory."""
    needed = budget.needed(context_tokens)
    if needed > free_bytes:
        raise DeviceMemoryError(
            f"this InfLLM config needs about {needed / GIB:.2f} GiB of device memory beyond "
            f"the weights for a {context_tokens:,}-token session, but only "
            f"{free_bytes / GIB:.2f} GiB is free ({budget.describe(context_tokens)}). "
            "Lower max_cached_block, chunk_size or n_local, set repr_on_host: true, "
            "use retrieval: infllm (no key index), or a smaller model / dtype."
        )
