"""InfLLM configs shared by several test modules.

Equal configs share one engine per process (ChatInfLLM's engine registry), so test
modules that use the same one load the model once.
"""

from __future__ import annotations

from langchain_infllm import InfLLMConfig

# Tiny windows for chat tests on a real tokenizer: retrieval starts after ~100 tokens.
TINY_CHAT_CONFIG = InfLLMConfig.create(
    block_size=16,
    n_init=16,
    n_local=64,
    topk=2,
    repr_topk=2,
    max_cached_block=4,
    exc_block_size=16,
    chunk_size=64,
)

# A local window smaller than the short agent conversations (~900-1200 tokens) of the
# real-model agent tests, so later steps attend to retrieved memory blocks too.
SMALL_AGENT_CONFIG = InfLLMConfig.create(
    block_size=64,
    n_init=64,
    n_local=512,
    topk=4,
    repr_topk=4,
    max_cached_block=8,
    exc_block_size=256,
    chunk_size=1024,
)

# Tiny windows where every block is retrieved (topk >= blocks): for session-state tests
# on tiny random models, whose outputs must not depend on the selection.
TINY_ALL_BLOCKS: dict[str, int] = dict(
    n_local=16, block_size=4, n_init=2, topk=64, max_cached_block=64, repr_topk=2,
    exc_block_size=5, chunk_size=11,
)
