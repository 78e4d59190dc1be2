"""Targeted check of the masks: every key is attended at most once, none is skipped.

With all-zero queries every allowed key gets the same weight, and with one-hot values
the output row of query i is the weight each position received. So the output must be
1/(i+1) on every position <= i (all of them retrieved here) and 0 elsewhere; a key seen
twice would show 2/(i+1), a key dropped by the masks 0.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from langchain_infllm.engine.attention import InfLLMForwardContext, attend_chunk
from langchain_infllm.engine.block_cache import DeviceBlockCache
from langchain_infllm.engine.memory import LayerMemory, LayerShape
from langchain_infllm.engine.rope import RotaryTable


class _IdentityRotary(torch.nn.Module):
    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*pos.shape, x.shape[-1])
        return torch.ones(shape), torch.zeros(shape)


@pytest.mark.parametrize("exc", [1, 5, 8, 13])
def test_each_key_attended_exactly_once(exc: int) -> None:
    n_local, n_init, bs, total = 12, 3, 4, 60
    shape = LayerShape(heads=2, kv_heads=1, head_dim=total)
    memory = LayerMemory(shape, n_init=n_init, block_size=bs, repr_topk=2,
                         dtype=torch.float32, device=torch.device("cpu"),
                         host_device=torch.device("cpu"), pin_memory=False, repr_on_host=False)
    uids = itertools.count()
    ctx = InfLLMForwardContext(
        layers=[memory], caches=[DeviceBlockCache(100, torch.device("cpu"))],
        rope=RotaryTable(_IdentityRotary(), n_local + exc + 1, total, torch.device("cpu")),
        start=0, n_local=n_local, topk=100, exc_block_size=exc, next_uid=lambda: next(uids),
    )
    values = torch.eye(total)[None]  # [kv_heads=1, position, dim=position]
    for start in range(0, total, exc):
        end = min(total, start + exc)
        c = end - start
        q = torch.zeros(2, c, total)
        k = torch.randn(1, c, total)
        out = attend_chunk(memory, ctx.caches[0], ctx, 0, q, k, values[:, start:end], start, 1.0)
        for row, i in enumerate(range(start, end)):
            expected = torch.zeros(total)
            expected[: i + 1] = 1.0 / (i + 1)
            torch.testing.assert_close(out[0, row], expected, atol=1e-6, rtol=0)
            torch.testing.assert_close(out[1, row], expected, atol=1e-6, rtol=0)
    assert memory.n_blocks == (total - n_local + 1 - n_init) // bs
