"""The device fit check: a config that cannot fit fails before any work, with numbers."""

from __future__ import annotations

import pytest
import torch

from langchain_infllm import InfLLMConfig, InfLLMEngine
from langchain_infllm.engine import DeviceMemoryError, Session
from langchain_infllm.engine.budget import GIB, check_device_fit, estimate_device_budget
from langchain_infllm.engine.memory import LayerShape
from tests.tiny_models import tiny_pair

SHAPE_7B = LayerShape(heads=32, kv_heads=8, head_dim=128)  # Llama-3-8B / Mistral-7B layout


def budget(**overrides: object) -> object:
    config = InfLLMConfig.create(**{"n_local": 4096, "block_size": 128, "topk": 16,
                                    "max_cached_block": 32, "chunk_size": 8192, **overrides})
    return estimate_device_budget(
        config, SHAPE_7B, num_layers=32, hidden_size=4096, intermediate_size=14336,
        vocab_size=128256, dtype=torch.bfloat16, weights_bytes=16 * GIB,
    )


def test_block_cache_matches_engine_accounting() -> None:
    cfg = InfLLMConfig(block_size=8, n_init=4, n_local=32, topk=2, max_cached_block=4,
                       exc_block_size=8, chunk_size=16)
    model, _ = tiny_pair("llama", seed=0)
    engine = InfLLMEngine(model, None, cfg)
    assert engine.device_budget.block_cache == engine.cache_budget_bytes()
    session: Session = engine.new_session()
    session.append([t % 90 + 1 for t in range(200)])
    # What a session really holds on the device stays within the fixed estimate plus
    # its representative keys.
    reprs = engine.device_budget.representatives_per_1m_tokens * 200 // 1_000_000
    assert session.device_bytes() <= engine.device_budget.session_fixed + reprs + 1


def test_representatives_grow_with_context_unless_on_host() -> None:
    on_device = budget(retrieval="infllm")
    on_host = budget(retrieval="infllm", repr_on_host=True)
    assert on_host.representatives_per_1m_tokens == 0
    # 32 layers x 32 heads x 128 dims x 2 bytes per 128-token block: 16 MiB per 1M tokens
    # ... per head and layer; about 2 GB for 1M tokens in all (DESIGN.md's figure).
    assert 1.5 * GIB < on_device.representatives_per_1m_tokens < 2.5 * GIB
    assert on_device.needed(1_000_000) - on_device.needed(0) == (
        on_device.representatives_per_1m_tokens
    )


def test_too_small_device_fails_with_the_numbers() -> None:
    b = budget()
    needed = b.needed(131_072)
    check_device_fit(b, free_bytes=needed + 1, context_tokens=131_072)  # fits: no error
    with pytest.raises(DeviceMemoryError) as info:
        check_device_fit(b, free_bytes=needed // 2, context_tokens=131_072)
    message = str(info.value)
    assert f"{needed / GIB:.2f} GiB" in message and f"{needed // 2 / GIB:.2f} GiB" in message
    assert "block cache" in message and "repr_on_host" in message
    assert isinstance(info.value, MemoryError)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_refuses_a_cache_larger_than_the_gpu() -> None:
    model, _ = tiny_pair("llama", seed=0)
    model = model.to("cuda")
    free, _ = torch.cuda.mem_get_info()
    huge = InfLLMConfig(block_size=4096, n_local=4096, topk=1,
                        max_cached_block=max(2, int(free // (4096 * 1024)) * 4))
    with pytest.raises(DeviceMemoryError):
        InfLLMEngine(model, None, huge)


def test_key_index_of_per_head_retrieval_is_counted() -> None:
    """maxkey keeps every sealed key on the device (unless repr_on_host): 1M tokens of
    a 7B-class layout add 1M x 32 layers x 8 KV heads x 128 dims x 2 bytes, twice over
    (the buffer grows by doubling)."""
    paper, maxkey = budget(retrieval="infllm"), budget(retrieval="maxkey")
    extra = 2 * 1_000_000 * 32 * 8 * 128 * 2
    assert maxkey.representatives_per_1m_tokens - paper.representatives_per_1m_tokens == extra  # type: ignore[attr-defined]
    on_host = budget(retrieval="maxkey", repr_on_host=True)
    assert on_host.representatives_per_1m_tokens == 0  # type: ignore[attr-defined]
    with pytest.raises(DeviceMemoryError, match="retrieval: infllm"):
        check_device_fit(maxkey, 40 * GIB, 1_000_000)  # type: ignore[arg-type]
    check_device_fit(paper, 40 * GIB, 1_000_000)  # type: ignore[arg-type]
