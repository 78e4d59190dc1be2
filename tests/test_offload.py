"""Offload (DESIGN.md section 5): a device cache of `topk` blocks loses nothing.

An engine whose per-layer cache holds exactly `topk` blocks must produce the same logits,
bit for bit, as one whose cache never evicts, while really evicting, and its resident
bytes never exceed the budget the config implies. On CPU host and "device" are the same
memory, so the cache logic and its counters are exercised all the same; the CUDA test
repeats the check with pinned memory and the side copy stream.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import pytest
import torch
from torch import nn

from langchain_infllm import InfLLMConfig, InfLLMEngine
from langchain_infllm.engine import RetrievalRecord, Session
from tests.dense_oracle import dense_oracle_logits
from tests.tiny_models import tiny_pair

VOCAB = 97
TOPK = 3
SETTINGS: dict[str, Any] = dict(
    n_local=16,
    block_size=4,
    n_init=2,
    topk=TOPK,
    repr_topk=2,
    exc_block_size=5,
    chunk_size=11,
    trace="full",
    # Per-block cache accounting below; per-head methods cache per-head slices and have
    # their own lossless test in tests/test_retrieval.py.
    retrieval="infllm",
)
HUGE = 10_000  # never evicts


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_engine(
    arch: str = "llama", seed: int = 0, device: str = "cpu", **overrides: Any
) -> tuple[InfLLMEngine, nn.Module]:
    model, reference = tiny_pair(arch, seed=seed)
    config = InfLLMConfig(**{**SETTINGS, **overrides})
    return InfLLMEngine(model.to(device), None, config), reference


def schedule(seed: int, prefill: int = 300, decode: int = 100) -> list[list[int]]:
    """Random appends of 1-29 tokens, then single-token decoding steps."""
    rng = random.Random(seed)
    steps: list[list[int]] = []
    total = 0
    while total < prefill:
        n = min(rng.randint(1, 29), prefill - total)
        steps.append([rng.randrange(VOCAB) for _ in range(n)])
        total += n
    steps.extend([[rng.randrange(VOCAB)] for _ in range(decode)])
    return steps


def run(
    engine: InfLLMEngine, steps: list[list[int]], session: Session | None = None
) -> tuple[list[torch.Tensor], list[RetrievalRecord]]:
    """Feed the steps; check the device budget after every one."""
    session = session or engine.new_session()
    budget = engine.cache_budget_bytes()
    logits = []
    for ids in steps:
        out = session.append(ids)
        assert out.logits is not None
        logits.append(out.logits.cpu())
        resident = engine.cache_resident_bytes()
        assert resident <= budget, f"{resident} resident bytes > budget {budget}"
        for cache in engine.caches:
            assert len(cache) <= cache.capacity
    return logits, session.drain_retrievals()


def per_layer_distinct(records: list[RetrievalRecord]) -> dict[int, int]:
    seen: dict[int, set[int]] = defaultdict(set)
    for r in records:
        seen[r.layer].update(r.block_ids)
    return {layer: len(ids) for layer, ids in seen.items()}


def assert_lossless(small: InfLLMEngine, big: InfLLMEngine, steps: list[list[int]]) -> None:
    got, got_records = run(small, steps)
    want, want_records = run(big, steps)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"step {i}: max diff {(a - b).abs().max()}"
    # The same blocks were attended: only where they came from differs.
    assert [(r.layer, r.query_start, r.block_ids) for r in got_records] == [
        (r.layer, r.query_start, r.block_ids) for r in want_records
    ]
    requested = defaultdict(int)
    for r in want_records:
        requested[r.layer] += len(r.block_ids)
        assert len(r.block_ids) <= TOPK
    distinct = per_layer_distinct(want_records)
    assert len(distinct) == small.num_layers
    assert min(distinct.values()) > 5 * TOPK, "too few blocks to exercise the cache"
    for layer, (s, b) in enumerate(zip(small.caches, big.caches, strict=True)):
        assert s.capacity == TOPK
        # the unbounded cache copies each block once; the small one had to evict and refetch
        assert b.counters.misses == distinct[layer]
        assert b.counters.hits + b.counters.misses == requested[layer]
        assert s.counters.hits + s.counters.misses == requested[layer]
        assert s.counters.misses > distinct[layer] + 20, "the small cache never evicted"
        assert s.counters.bytes_copied > b.counters.bytes_copied
        assert len(s) == TOPK and len(b) == distinct[layer]
    assert small.cache_resident_bytes() == small.cache_budget_bytes()
    assert big.cache_resident_bytes() > small.cache_resident_bytes()


@pytest.mark.parametrize(("arch", "seed"), [("llama", 0), ("qwen2", 1), ("qwen3", 2)])
def test_cache_of_topk_blocks_is_lossless(arch: str, seed: int) -> None:
    small, _ = make_engine(arch, seed, max_cached_block=TOPK)
    big, _ = make_engine(arch, seed, max_cached_block=HUGE)
    steps = schedule(seed)
    assert_lossless(small, big, steps)


@pytest.mark.parametrize("decay", [0.0, 0.1, 0.9])
def test_lru_s_cache_is_lossless(decay: float) -> None:
    small, _ = make_engine(
        "mistral", 3, max_cached_block=TOPK, cache_strategy="lru-s", score_decay=decay
    )
    big, _ = make_engine("mistral", 3, max_cached_block=HUGE)
    assert all(c.strategy == "lru-s" for c in small.caches)
    assert_lossless(small, big, schedule(3, prefill=250, decode=60))


def test_lru_s_evicts_differently_from_lru() -> None:
    """Guard that the strategy knob reaches the cache: same traffic, other victims."""
    counts = []
    for strategy in ("lru", "lru-s"):
        engine, _ = make_engine(
            "llama", 4, max_cached_block=TOPK + 2, cache_strategy=strategy, score_decay=0.0
        )
        run(engine, schedule(4, prefill=250, decode=60))
        counts.append([c.counters.snapshot() for c in engine.caches])
    assert counts[0] != counts[1]


def test_repr_on_host_is_identical() -> None:
    on_device, _ = make_engine("qwen2", 5, max_cached_block=TOPK)
    on_host, _ = make_engine("qwen2", 5, max_cached_block=TOPK, repr_on_host=True)
    steps = schedule(5, prefill=200, decode=40)
    a, rec_a = run(on_device, steps)
    b, rec_b = run(on_host, steps)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert [r.block_ids for r in rec_a] == [r.block_ids for r in rec_b]
    probe = on_host.new_session()
    probe.append(list(range(60)))
    assert probe.n_blocks > 0
    assert all(layer.repr_device == torch.device("cpu") for layer in probe.layers)
    assert all(layer.reprs.device.type == "cpu" for layer in probe.layers)


@pytest.mark.parametrize("capacity", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("strategy", ["lru", "lru-s"])
def test_resident_bytes_never_exceed_budget(capacity: int, strategy: str) -> None:
    topk = min(capacity, 2)
    engine, _ = make_engine(
        "llama",
        capacity,
        topk=topk,
        max_cached_block=capacity,
        cache_strategy=strategy,
        trace="off",
    )
    per_block = 2 * engine.shape.kv_heads * 4 * engine.shape.head_dim * 4  # fp32 K+V
    assert engine.cache_budget_bytes() == engine.num_layers * capacity * per_block
    # run() asserts resident <= budget after every step, at every length up to 250
    run(engine, schedule(capacity, prefill=170, decode=80))
    # and two more sessions sharing the same caches do not get around it
    for seed in (11, 12):
        run(engine, schedule(seed, prefill=120, decode=10))
    assert engine.cache_resident_bytes() == engine.cache_budget_bytes()


def test_sessions_and_forks_sharing_a_small_cache_are_lossless() -> None:
    """Blocks are keyed engine-wide: sessions never read each other's blocks by mistake,
    and a fork reads its parent's blocks without copying them again."""
    small, _ = make_engine("qwen3", 6, max_cached_block=TOPK)
    big, _ = make_engine("qwen3", 6, max_cached_block=HUGE)
    outputs: dict[str, list[torch.Tensor]] = {}
    for engine, name in ((small, "small"), (big, "big")):
        rng = random.Random(6)
        a, b = engine.new_session(), engine.new_session()
        c: Session | None = None
        logits = []
        for step in range(90):
            if step == 45:
                c = a.fork()
            live = [a, b] if c is None else [a, b, c]
            s = live[rng.randrange(len(live))]
            n = rng.randint(1, 12) if step < 60 else 1
            out = s.append([rng.randrange(VOCAB) for _ in range(n)])
            logits.append(out.logits)
            if step == 70 and c is not None:
                c.truncate(len(c) // 2)  # unseals some shared blocks in the fork only
                logits.append(c.append([1, 2, 3]).logits)
            assert engine.cache_resident_bytes() <= engine.cache_budget_bytes()
        outputs[name] = logits
    assert all(torch.equal(x, y) for x, y in zip(outputs["small"], outputs["big"], strict=True))


def test_stale_cached_blocks_are_not_reused_after_truncate() -> None:
    """Truncating and re-sealing puts new K/V at the old block indices; the cache still
    holds the old ones. With every block retrieved the dense oracle tells which was read."""
    engine, reference = make_engine("llama", 7, topk=64, max_cached_block=64, trace="off")
    rng = random.Random(7)
    first = [rng.randrange(VOCAB) for _ in range(150)]
    session = engine.new_session()
    session.append(first)
    session.append([5])  # every block is now resident
    assert len(engine.caches[0]) == session.n_blocks > 30
    session.truncate(40)
    second = [rng.randrange(VOCAB) for _ in range(110)]
    for a in range(0, 110, 13):
        session.append(second[a : a + 13])
    expected = dense_oracle_logits(
        reference, first[:40] + second, n_local=16, n_init=2, block_size=4
    )[-1]
    torch.testing.assert_close(session.last_logits, expected, atol=1e-4, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["lru", "lru-s"])
def test_cache_of_topk_blocks_is_lossless_on_cuda(strategy: str) -> None:
    small, _ = make_engine(
        "qwen2", 8, device="cuda", max_cached_block=TOPK, cache_strategy=strategy
    )
    big, _ = make_engine("qwen2", 8, device="cuda", max_cached_block=HUGE)
    cpu, _ = make_engine("qwen2", 8, max_cached_block=HUGE)
    assert small.device.type == "cuda"
    assert all(c._stream is not None for c in small.caches), "side copy stream expected"
    steps = schedule(8)
    assert_lossless(small, big, steps)
    probe = small.new_session()
    probe.append(list(range(60)))
    assert probe.layers[0].block_k[0].is_pinned()
    assert probe.layers[0].block_k[0].device.type == "cpu"
    got, _ = run(small, steps)
    want, _ = run(cpu, steps)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


def _blocks(n: int) -> list[torch.Tensor]:
    return [torch.full((2, 4, 16), float(i)) for i in range(n)]


def test_block_cache_evicts_least_recently_used_and_never_a_needed_block() -> None:
    from langchain_infllm.engine.block_cache import DeviceBlockCache

    cache = DeviceBlockCache(3, torch.device("cpu"))
    k, v = _blocks(10), _blocks(10)

    def fetch(uids: list[int]) -> torch.Tensor:
        key_parts, value_parts = cache.fetch(
            uids, [k[u] for u in uids], [v[u] for u in uids]
        ).gather()
        keys, values = torch.cat(key_parts, dim=1), torch.cat(value_parts, dim=1)
        assert torch.equal(keys, torch.cat([k[u] for u in uids], dim=1))
        assert torch.equal(values, torch.cat([v[u] for u in uids], dim=1))
        return keys

    fetch([0, 1, 2])
    fetch([0])  # 0 is now the most recently used
    fetch([3])  # evicts 1, the least recently used
    assert set(cache._slot_of) == {0, 2, 3}
    assert cache.counters.snapshot()[:2] == (1, 4)
    fetch([4, 5, 2])  # 2 is the oldest but needed by this very fetch: 0 and 3 go
    assert set(cache._slot_of) == {2, 4, 5}
    fetch([5, 4, 2])  # all hits, any order
    assert cache.counters.snapshot()[:2] == (5, 6)
    assert cache.resident_bytes == 3 * 2 * k[0].numel() * 4
    with pytest.raises(ValueError, match="cache holds 3"):
        fetch([6, 7, 8, 9])


def _assert_cache_holds_only(engine: InfLLMEngine, *sessions: Session) -> None:
    for i, cache in enumerate(engine.caches):
        held = set().union(*(s.block_uids(i) for s in sessions))
        assert cache.resident_ids() <= held, f"layer {i} keeps slots of dropped blocks"


def test_truncate_close_and_spill_free_device_slots(tmp_path: Any) -> None:
    engine, _ = make_engine("llama", 7, topk=64, max_cached_block=64, trace="off")
    rng = random.Random(7)
    session = engine.new_session()
    session.append([rng.randrange(VOCAB) for _ in range(150)])
    session.append([5])  # every block is now resident
    n_before = session.n_blocks
    assert all(len(c) == n_before for c in engine.caches)
    allocated = engine.cache_resident_bytes()
    session.truncate(40)
    assert 0 < session.n_blocks < n_before
    _assert_cache_holds_only(engine, session)
    assert all(len(c) == session.n_blocks for c in engine.caches)
    session.close()
    assert len(session) == 0 and session.n_blocks == 0
    assert all(len(c) == 0 for c in engine.caches)
    # freed slots are reused: a new session of the same size allocates nothing more
    other = engine.new_session("other")
    other.append([rng.randrange(VOCAB) for _ in range(150)])
    other.append([5])
    assert engine.cache_resident_bytes() == allocated
    assert all(len(c) == other.n_blocks for c in engine.caches)
    # a spilled session's blocks leave the device too, and come back losslessly
    want = other.append([9]).logits
    other.truncate(len(other) - 1)
    engine.sessions._spill_dir = tmp_path
    assert engine.sessions.spill("other") is not None
    assert all(len(c) == 0 for c in engine.caches)
    got = engine.session("other").append([9]).logits
    assert got is not None and want is not None and torch.equal(got, want)


def test_forgetting_keeps_the_blocks_a_fork_still_uses() -> None:
    engine, _ = make_engine("qwen2", 8, topk=64, max_cached_block=64, trace="off")
    rng = random.Random(8)
    parent = engine.new_session()
    parent.append([rng.randrange(VOCAB) for _ in range(120)])
    parent.append([5])
    twin = parent.fork()
    resident = [c.resident_ids() for c in engine.caches]
    assert all(len(r) > 20 for r in resident)
    parent.truncate(0)  # the parent drops every block; the fork still holds them all
    assert [c.resident_ids() for c in engine.caches] == resident
    not_resident = sum(
        len(set(twin.block_uids(i)) - resident[i]) for i in range(engine.num_layers)
    )
    out = twin.append([6])
    assert out.cache_misses == not_resident, "the fork had to copy its blocks again"
    twin.close()
    assert all(len(c) == 0 for c in engine.caches)


def test_truncations_with_slot_reuse_are_lossless() -> None:
    """Slots freed by truncation are handed to new blocks; outputs must not notice."""
    outputs = []
    for capacity in (TOPK, HUGE):
        engine, _ = make_engine("llama", 9, max_cached_block=capacity, trace="off")
        rng = random.Random(9)
        session = engine.new_session()
        logits = []
        for step in range(40):
            n = rng.randint(1, 20)
            logits.append(session.append([rng.randrange(VOCAB) for _ in range(n)]).logits)
            if step % 7 == 6:
                session.truncate(rng.randrange(len(session)))
                _assert_cache_holds_only(engine, session)
        outputs.append(logits)
    assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_device_memory_flat_from_32k_to_256k_on_cuda() -> None:
    """The device holds weights + a fixed budget: peak memory while growing the context
    from 32K to 256K tokens exceeds the 32K peak by no more than the representative keys
    (the only part that grows, by design) plus allocator slack."""
    model, _ = tiny_pair("llama", seed=0)
    config = InfLLMConfig(block_size=128, n_init=128, n_local=1024, topk=4,
                          max_cached_block=8, exc_block_size=512, chunk_size=4096, trace="off")
    engine = InfLLMEngine(model.to("cuda"), None, config)
    session = engine.new_session()
    rng = random.Random(0)
    peaks = {}
    for target in (32_768, 65_536, 131_072, 262_144):
        torch.cuda.reset_peak_memory_stats()
        while len(session) < target:
            session.append([rng.randrange(1, VOCAB) for _ in range(4096)])
        torch.cuda.synchronize()
        peaks[target] = torch.cuda.max_memory_allocated()
    reprs_growth = engine.device_budget.representatives_per_1m_tokens * (262_144 - 32_768)
    assert peaks[262_144] <= peaks[32_768] * 1.05 + reprs_growth // 1_000_000 + 2**20, peaks
    assert engine.cache_resident_bytes() <= engine.cache_budget_bytes()
