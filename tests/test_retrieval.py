"""Block scorers against brute-force references, per-head state (key index, cache
slices), and the fused path against the reference path. The engine against the dense
oracle for every method: tests/test_engine_oracles.py."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from langchain_infllm import InfLLMConfig, InfLLMEngine
from langchain_infllm.config import RetrievalMethod
from langchain_infllm.engine.attention import exact_scoring_inputs
from langchain_infllm.engine.memory import LayerMemory, LayerShape
from langchain_infllm.engine.retrieval import (
    RETRIEVAL_METHODS,
    chunk_queries,
    score_blocks,
    select_blocks,
)
from langchain_infllm.engine.rope import RotaryTable
from tests.dense_oracle import dense_oracle_logits
from tests.test_engine_oracles import ATOL, _exec_chunks, _pieces
from tests.tiny_models import tiny_pair

PER_HEAD = [m for m in RETRIEVAL_METHODS if m != "infllm"]


def _random_memory(seed: int, method: str, n_blocks: int, shape: LayerShape) -> LayerMemory:
    gen = torch.Generator().manual_seed(seed)
    bs = 8
    memory = LayerMemory(shape, n_init=0, block_size=bs, repr_topk=2, dtype=torch.float32,
                         device=torch.device("cpu"), host_device=torch.device("cpu"),
                         pin_memory=False, repr_on_host=False, retrieval=method)  # type: ignore[arg-type]
    for uid in range(n_blocks):
        keys = torch.randn(shape.kv_heads, bs, shape.head_dim, generator=gen)
        memory.add_sealed_block(uid, keys, torch.randn_like(keys),
                                torch.rand(shape.heads, bs, generator=gen),
                                torch.randn(shape.heads, shape.head_dim, generator=gen))
    return memory


def _brute_force(method: str, memory: LayerMemory, mean_q: torch.Tensor) -> torch.Tensor:
    """Loops over blocks, heads and keys; no engine code but the stored tensors."""
    shape = memory.shape
    if method == "infllm":
        return torch.tensor([[
            sum(float(memory.reprs[b, h] @ mean_q[h]) for h in range(shape.heads))
            for b in range(memory.n_blocks)]])
    rows = []
    for g in range(shape.kv_heads):
        heads = range(g * shape.groups, (g + 1) * shape.groups)
        row = []
        for b in range(memory.n_blocks):
            keys = memory.block_k[b][g]
            best = -float("inf")
            for h in heads:
                every = [float(mean_q[h] @ memory.block_k[c][g][t])
                         for c in range(memory.n_blocks) for t in range(keys.shape[0])]
                norm = 0.0
                if method == "maxmass":  # log-softmax over every key
                    norm = torch.tensor(every).logsumexp(0).item()
                elif method == "maxshare":  # log-softmax over the blocks' best keys
                    bs = keys.shape[0]
                    norm = torch.tensor([max(every[c * bs:(c + 1) * bs])
                                         for c in range(memory.n_blocks)]).logsumexp(0).item()
                best = max(best, max(float(mean_q[h] @ k) - norm for k in keys))
            row.append(best)
        rows.append(row)
    return torch.tensor(rows)


@pytest.mark.parametrize("method", RETRIEVAL_METHODS)
@pytest.mark.parametrize("seed", range(4))
def test_scores_equal_brute_force(method: str, seed: int) -> None:
    rng = random.Random(seed)
    kv_heads = rng.choice([1, 2, 3])
    shape = LayerShape(heads=kv_heads * rng.choice([1, 2, 4]), kv_heads=kv_heads,
                       head_dim=rng.choice([4, 8]))
    memory = _random_memory(seed, method, rng.randint(1, 9), shape)
    mean_q = torch.randn(shape.heads, shape.head_dim, generator=torch.Generator().manual_seed(99))
    got = score_blocks(method, mean_q, reprs=memory.reprs,  # type: ignore[arg-type]
                       index_keys=memory.index_keys, kv_heads=kv_heads, block_size=8)
    torch.testing.assert_close(got, _brute_force(method, memory, mean_q), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("method", PER_HEAD)
@pytest.mark.parametrize("seed", range(4))
def test_query_groups_and_neighbours_equal_brute_force(method: str, seed: int) -> None:
    """Sub-chunk mean queries (best match over them) and neighbour dilation, against
    loops: group means by hand, the brute-force scorer per mean, max over means, then
    each block the max of the blocks within `neighbours` of it."""
    rng = random.Random(100 + seed)
    kv_heads = rng.choice([1, 2])
    shape = LayerShape(heads=kv_heads * rng.choice([1, 3]), kv_heads=kv_heads, head_dim=4)
    memory = _random_memory(seed, method, rng.randint(2, 9), shape)
    c, group, neighbours = rng.randint(1, 11), rng.randint(1, 4), rng.randint(0, 2)
    q_mem = torch.randn(shape.heads, c, shape.head_dim,
                        generator=torch.Generator().manual_seed(seed))
    queries = chunk_queries(q_mem, method, group)  # type: ignore[arg-type]
    got = score_blocks(method, queries, reprs=memory.reprs,  # type: ignore[arg-type]
                       index_keys=memory.index_keys, kv_heads=kv_heads, block_size=8,
                       neighbours=neighbours)
    spans = [(a, min(c, a + group)) for a in range(0, c, group)] if c > group else [(0, c)]
    per_mean = torch.stack([_brute_force(method, memory, q_mem[:, a:b].mean(dim=1))
                            for a, b in spans]).amax(dim=0)
    n = memory.n_blocks
    want = torch.tensor([[max(float(per_mean[r, j])
                              for j in range(max(0, b - neighbours), min(n, b + neighbours + 1)))
                          for b in range(n)] for r in range(per_mean.shape[0])])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_paper_method_ignores_query_groups() -> None:
    """The paper's scoring keeps the chunk mean whatever `query_group` says."""
    q_mem = torch.randn(4, 9, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(chunk_queries(q_mem, "infllm", 2), q_mem.mean(dim=1, keepdim=True))


@pytest.mark.parametrize("seed", range(6))
def test_selection_is_topk_of_each_row(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rows, n = random.Random(seed).randint(1, 4), random.Random(seed + 1).randint(1, 12)
    scores = torch.randn(rows, n, generator=gen)
    topk = random.Random(seed + 2).randint(1, 14)
    sel = select_blocks(scores, topk)
    for r in range(rows):
        ranked = sorted(range(n), key=lambda b: -float(scores[r, b]))
        assert sel.per_head[r] == sorted(ranked[: min(topk, n)])
    union = sorted({b for row in sel.per_head for b in row})
    assert sel.blocks == union
    for b, value in zip(sel.blocks, sel.scores, strict=True):
        assert value == pytest.approx(max(float(scores[r, b]) for r in range(rows)
                                          if b in sel.per_head[r]))


def test_per_head_oracle_differs_from_shared_union() -> None:
    """Guard on the oracle: giving every head the union instead must change the outputs."""
    model, reference = tiny_pair("qwen2", seed=8)
    config = InfLLMConfig(n_local=24, block_size=6, n_init=3, topk=1, max_cached_block=4,
                          exc_block_size=7, chunk_size=19, trace="full", retrieval="maxkey")
    rng = random.Random(201)
    ids = [rng.randrange(97) for _ in range(151)]
    records = InfLLMEngine(model, None, config).new_session()
    records.append(ids)
    recs = records.drain_retrievals()
    chunks = _exec_chunks([151], 19, 7)
    right = dense_oracle_logits(reference, ids, n_local=24, n_init=3, block_size=6,
                                records=recs, chunks=chunks)
    unioned = [type(r)(**{**r.to_dict(), "head_block_ids": None}) for r in recs]
    wrong = dense_oracle_logits(reference, ids, n_local=24, n_init=3, block_size=6,
                                records=unioned, chunks=chunks)
    assert (right - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("method", PER_HEAD)
def test_key_index_follows_truncate_fork_and_reload(method: str, tmp_path: Path) -> None:
    model, _ = tiny_pair("llama", seed=2)
    config = InfLLMConfig(n_local=16, block_size=4, n_init=2, topk=2, max_cached_block=8,
                          exc_block_size=5, chunk_size=11, retrieval=method)  # type: ignore[arg-type]
    engine = InfLLMEngine(model, None, config)
    rng = random.Random(4)
    session = engine.new_session()
    session.append([rng.randrange(97) for _ in range(90)])

    def check(s: object) -> None:
        for layer in s.layers:  # type: ignore[attr-defined]
            index = layer.index_keys
            assert index is not None
            expected = (torch.cat(layer.block_k, dim=1) if layer.block_k
                        else torch.empty(index.shape[0], 0, index.shape[2]))
            assert torch.equal(index, expected)

    check(session)
    twin = session.fork()
    twin.append([rng.randrange(97) for _ in range(23)])
    check(twin)
    check(session)
    session.truncate(41)
    check(session)
    session.append([rng.randrange(97) for _ in range(30)])
    check(session)
    loaded = engine.load_session(session.save(tmp_path / "snap"))
    check(loaded)
    nxt = [rng.randrange(97) for _ in range(9)]
    a, b = session.append(nxt).logits, loaded.append(nxt).logits
    assert a is not None and b is not None
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", PER_HEAD)
def test_per_head_cache_holds_slices_within_the_block_budget(method: str) -> None:
    """Per-head methods cache one KV head's slice per entry: device bytes stay within the
    paper's budget (max_cached_block whole blocks), and closing frees every slice."""
    model, _ = tiny_pair("llama", seed=0)  # 2 KV heads
    config = InfLLMConfig(n_local=16, block_size=4, n_init=2, topk=3, max_cached_block=3,
                          exc_block_size=5, chunk_size=11, retrieval=method)  # type: ignore[arg-type]
    engine = InfLLMEngine(model, None, config)
    session = engine.new_session()
    rng = random.Random(1)
    for _ in range(12):
        session.append([rng.randrange(97) for _ in range(9)])
        assert engine.cache_resident_bytes() <= engine.cache_budget_bytes()
    resident = engine.caches[0].resident_ids()
    assert resident and all(isinstance(key, tuple) for key in resident)
    session.close()
    assert all(len(cache) == 0 for cache in engine.caches)


@pytest.mark.parametrize("retrieval", ["maxkey", "infllm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_attention_equals_reference_path(
    dtype: torch.dtype, arch: str, retrieval: RetrievalMethod
) -> None:
    """Same logits (fp32: 1e-4; bf16: 0.05 abs + 5% rel) and the same blocks selected,
    on odd lengths with sinks, blocks and a remainder in play. For the paper's scoring
    also the attention mass every key received while local (fp32: 1e-5 relative to the
    largest; bf16: 2%), which the fused path recomputes from the log-sum-exp, and so
    the same representative keys."""
    atol, rtol = (ATOL, 0.0) if dtype == torch.float32 else (0.05, 0.05)
    outputs = {}
    masses = {}
    for fused in (True, False):
        model, _ = tiny_pair(arch, seed=11, dtype=dtype)
        config = InfLLMConfig(n_local=24, block_size=6, n_init=3, topk=2, max_cached_block=4,
                              exc_block_size=7, chunk_size=19, trace="full",
                              retrieval=retrieval, fused_attention=fused)
        session = InfLLMEngine(model, None, config).new_session()
        rng = random.Random(12)
        ids = [rng.randrange(97) for _ in range(143)]
        logits = []
        pos = 0
        for size in _pieces(rng, len(ids)):
            out = session.append(ids[pos : pos + size]).logits
            assert out is not None
            logits.append(out)
            pos += size
        for _ in range(5):  # decode steps: one-token chunks
            token = int(logits[-1].argmax())
            out = session.append([token]).logits
            assert out is not None
            logits.append(out)
        outputs[fused] = (torch.stack(logits), session.drain_retrievals())
        masses[fused] = [(torch.cat([*layer.block_scores, layer.tail_score], dim=1),
                          layer.reprs.clone()) for layer in session.layers]
    (fused_logits, fused_recs), (ref_logits, ref_recs) = outputs[True], outputs[False]
    torch.testing.assert_close(fused_logits, ref_logits, atol=atol, rtol=rtol)
    if dtype == torch.float32:
        assert [r.head_block_ids for r in fused_recs] == [r.head_block_ids for r in ref_recs]
        assert [r.block_ids for r in fused_recs] == [r.block_ids for r in ref_recs]
    if retrieval == "infllm":
        mass_tol = 1e-5 if dtype == torch.float32 else 2e-2
        for (mass, reprs), (ref_mass, ref_reprs) in zip(masses[True], masses[False], strict=True):
            assert float(ref_mass.sum()) > 0
            torch.testing.assert_close(mass, ref_mass, rtol=0.0,
                                       atol=mass_tol * float(ref_mass.abs().max()))
            if dtype == torch.float32:
                torch.testing.assert_close(reprs, ref_reprs, atol=ATOL, rtol=0.0)


@pytest.mark.parametrize("arch", ["llama", "llama31", "qwen2"])
@pytest.mark.parametrize("seed", range(3))
def test_exact_position_scores_equal_brute_force(arch: str, seed: int) -> None:
    """`memory_positions: exact` ranks blocks at the distances it attends them at: against
    loops that rotate each query and key with the model's own `apply_rotary_pos_emb` at
    query i's distance to key j (its true one, or `distance` past the chunk start)."""
    rng = random.Random(200 + seed)
    model, _ = tiny_pair(arch, seed=seed)
    rotary = model.model.rotary_emb
    kv_heads, heads, d, bs = 2, 4, 16, 8
    shape = LayerShape(heads=heads, kv_heads=kv_heads, head_dim=d)
    memory = _random_memory(seed, "maxkey", rng.randint(2, 9), shape)
    n_init, c = rng.randint(0, 5), rng.randint(1, 6)
    n_keys = memory.n_blocks * bs
    start = n_init + n_keys + rng.randint(0, 12)
    distance = rng.randint(4, start + 2)
    rope = RotaryTable(rotary, start + c + 4, d, torch.device("cpu"))
    q = torch.randn(heads, c, d, generator=torch.Generator().manual_seed(seed))
    keys = memory.index_keys
    assert keys is not None
    q_rot, k_rot = exact_scoring_inputs(rope, distance, n_init, q, keys, start)
    got = score_blocks("maxkey", chunk_queries(q_rot, "maxkey", 1), reprs=memory.reprs,
                       index_keys=k_rot, kv_heads=kv_heads, block_size=bs)
    want = torch.full((kv_heads, memory.n_blocks), -float("inf"))
    scale = rotary(q, torch.zeros(1, 1, dtype=torch.long))[0][0, 0, 0]
    for g in range(kv_heads):
        for j in range(n_keys):
            virtual = max(n_init + j, start - distance)
            for h in range(g * heads // kv_heads, (g + 1) * heads // kv_heads):
                for t in range(c):
                    gap = torch.tensor([[start + t - virtual]])
                    cos, sin = rotary(q, gap)
                    qi = q[h, t][None, None, None]
                    q_at, _ = apply_rotary_pos_emb(qi, qi, cos / scale, sin / scale)
                    dot = float(q_at.flatten() @ keys[g, j])
                    want[g, j // bs] = max(float(want[g, j // bs]), dot)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
