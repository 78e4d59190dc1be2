"""The decode fast paths equal the reference paths, and their derived state survives every
mutation.

* `fast_decode` keeps the local window's keys rotated between seals
  (`LayerMemory.rotated_window`); the reference rotates the whole window every chunk.
  Only rounding can differ (keys and queries are rotated against another base): fp32
  logits within 1e-5, bf16 within 0.05 + 2% (a few bf16 ulps of the tiny model's logits);
  the blocks chosen are the same in fp32 for every layer, and in bf16 for layer 0 (whose
  queries and keys come straight from the embeddings, so rounding cannot move them).
* `direct_blocks` gathers the retrieved blocks from the contiguous store instead of the
  block cache: the same keys in the same order, so the results are bitwise equal.
* The rotated window and the block store are derived: after truncate, fork, save/load
  and a failed (rolled back) forward a session gives exactly what a session that never
  saw the mutation gives when fed the same tokens in the same calls.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from langchain_infllm import InfLLMConfig, InfLLMEngine
from langchain_infllm.engine import Session
from langchain_infllm.engine.memory import LayerMemory
from tests.tiny_models import tiny_pair

VOCAB = 97
# Odd sizes everywhere, so blocks, chunks and the window never line up.
BASE = dict(n_local=23, block_size=5, n_init=3, topk=3, max_cached_block=6,
            exc_block_size=7, chunk_size=19, trace="full")
REFERENCE = dict(fast_decode=False, direct_blocks=False)
FAST = dict(fast_decode=True, direct_blocks=True)


def engine_for(arch: str, dtype: torch.dtype, **changes: object) -> InfLLMEngine:
    model, _ = tiny_pair(arch, seed=11, dtype=dtype)
    return InfLLMEngine(model, None, InfLLMConfig.create(**{**BASE, **changes}))


def calls(rng: random.Random, prompt: int, decode: int) -> list[list[int]]:
    """A prompt in odd-sized appends, then single-token appends (decoding)."""
    out: list[list[int]] = []
    left = prompt
    while left:
        n = min(left, rng.choice([1, 3, 8, 13, 29]))
        out.append([rng.randrange(VOCAB) for _ in range(n)])
        left -= n
    out.extend([[rng.randrange(VOCAB)] for _ in range(decode)])
    return out


def run(session: Session, steps: list[list[int]]) -> list[tuple[torch.Tensor, list]]:
    """Logits and per-layer selections (head_block_ids) after every call."""
    results = []
    for ids in steps:
        out = session.append(ids)
        assert out.logits is not None
        chosen = [(r.layer, r.query_start, r.head_block_ids) for r in out.retrievals]
        results.append((out.logits.clone(), chosen))
    return results


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_paths_match_reference(arch: str, dtype: torch.dtype) -> None:
    steps = calls(random.Random(3), prompt=97, decode=41)
    ref = run(engine_for(arch, dtype, **REFERENCE).new_session(), steps)
    fast = run(engine_for(arch, dtype, **FAST).new_session(), steps)
    assert any(sel for _, sel in ref), "no call retrieved anything"
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (0.05, 0.02)
    for (ref_logits, ref_sel), (fast_logits, fast_sel) in zip(ref, fast, strict=True):
        torch.testing.assert_close(fast_logits, ref_logits, atol=atol, rtol=rtol)
        if dtype == torch.float32:
            assert fast_sel == ref_sel
        else:
            assert [s for s in fast_sel if s[0] == 0] == [s for s in ref_sel if s[0] == 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_blocks_are_bitwise_the_cached_blocks(dtype: torch.dtype) -> None:
    steps = calls(random.Random(4), prompt=88, decode=31)
    cached = run(engine_for("mistral", dtype, direct_blocks=False).new_session(), steps)
    direct = run(engine_for("mistral", dtype, direct_blocks=True).new_session(), steps)
    # Without records the decode step takes another selection path (no scores kept).
    untraced = run(engine_for("mistral", dtype, direct_blocks=True, trace="off").new_session(),
                   steps)
    for (a, sel_a), (b, sel_b), (c, _) in zip(cached, direct, untraced, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
        assert sel_a == sel_b


def test_direct_blocks_bypass_the_cache() -> None:
    engine = engine_for("llama", torch.float32, **FAST)
    session = engine.new_session()
    run(session, calls(random.Random(5), prompt=70, decode=5))
    assert session.n_blocks > BASE["topk"]  # type: ignore[operator]
    assert engine.cache_resident_bytes() == 0
    assert session.stats()["cache_misses"] == 0


def test_store_views_hold_the_keys_once() -> None:
    """On CPU the block tensors are views of the key index / value store."""
    engine = engine_for("llama", torch.float32, **FAST)
    session = engine.new_session()
    run(session, calls(random.Random(6), prompt=120, decode=0))
    layer = session.layers[0]
    index_k, index_v = layer.index_keys, layer.index_values
    assert index_k is not None and index_v is not None
    for b in range(layer.n_blocks):
        assert layer.block_k[b].untyped_storage().data_ptr() == (
            index_k.untyped_storage().data_ptr()
        )
        a, e = b * layer.block_size, (b + 1) * layer.block_size
        assert torch.equal(layer.block_k[b], index_k[:, a:e])
        assert torch.equal(layer.block_v[b], index_v[:, a:e])


def continue_both(a: Session, b: Session, steps: list[list[int]]) -> None:
    """Feed both the same calls: equal logits after each, equal memory at the end."""
    for ids in steps:
        out_a, out_b = a.append(ids), b.append(ids)
        assert out_a.logits is not None and out_b.logits is not None
        assert torch.equal(out_a.logits, out_b.logits)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.n_blocks == y.n_blocks and x.tail_start == y.tail_start
        for name in ("index_keys", "index_values", "init_k", "init_v", "tail_k", "tail_v"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        for bx, by in zip(x.block_k + x.block_v, y.block_k + y.block_v, strict=True):
            assert torch.equal(bx, by)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_derived_state_survives_truncate(dtype: torch.dtype) -> None:
    engine = engine_for("qwen2", dtype, **FAST)
    rng = random.Random(7)
    history = calls(rng, prompt=90, decode=17)
    tail = calls(rng, prompt=12, decode=15)
    mutated, fresh = engine.new_session(), engine.new_session()
    run(mutated, history)
    # Truncate back into the middle of the decode, then continue on both.
    keep = sum(len(ids) for ids in history[:-9])
    mutated.truncate(keep)
    for ids in history[:-9]:
        fresh.append(ids)
    continue_both(mutated, fresh, tail)
    # Truncate far back (to a call boundary): sinks and blocks go back to the tail.
    assert mutated.n_blocks > 0
    mutated.truncate(sum(len(ids) for ids in history[:2]))
    other = engine.new_session()
    run(other, history[:2])
    continue_both(mutated, other, tail)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_derived_state_survives_fork(dtype: torch.dtype) -> None:
    engine = engine_for("llama", dtype, **FAST)
    rng = random.Random(8)
    history = calls(rng, prompt=100, decode=15)
    parent, fresh = engine.new_session(), engine.new_session()
    run(parent, history)
    run(fresh, history)
    twin = parent.fork()
    fresh2 = engine.new_session()
    run(fresh2, history)
    # Both sides seal blocks of their own new tokens in turn after the fork, while the
    # shared store still has room: neither may write it in place (the other's blocks are
    # views of it).
    layer = parent.layers[0]
    assert layer.index_keys is not None
    assert layer.index_keys.shape[1] + 60 <= layer._index_k.shape[1]  # type: ignore[union-attr]
    for _ in range(5):
        continue_both(twin, fresh, calls(rng, prompt=5, decode=5))
        continue_both(parent, fresh2, calls(rng, prompt=4, decode=6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_derived_state_survives_save_load(dtype: torch.dtype, tmp_path: Path) -> None:
    engine = engine_for("qwen3", dtype, **FAST)
    rng = random.Random(9)
    history = calls(rng, prompt=83, decode=11)
    original = engine.new_session()
    run(original, history)
    path = original.save(tmp_path / "snap")
    loaded = engine.load_session(path)
    continue_both(original, loaded, calls(rng, prompt=14, decode=25))


def test_derived_state_survives_rollback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward that fails in the last layer (after the others appended, rotated and
    sealed) leaves no trace: the next calls give what they give without the failure."""
    engine = engine_for("mistral", torch.float32, **FAST)
    rng = random.Random(10)
    history = calls(rng, prompt=60, decode=8)
    failed, fresh = engine.new_session(), engine.new_session()
    run(failed, history)
    run(fresh, history)
    real = LayerMemory.seal
    last = failed.layers[-1]

    def seal_fails_last_layer(self: LayerMemory, *args: object, **kwargs: object) -> None:
        if self is last:
            raise RuntimeError("injected")
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LayerMemory, "seal", seal_fails_last_layer)
    for n in (1, 9):  # a decode step, then a multi-chunk append
        with pytest.raises(RuntimeError, match="injected"):
            failed.append([rng.randrange(VOCAB) for _ in range(n)])
    monkeypatch.setattr(LayerMemory, "seal", real)
    continue_both(failed, fresh, calls(rng, prompt=13, decode=17))


@pytest.mark.parametrize("queries", [1, 3, 16])
def test_half_precision_scan_matches_fp32(queries: int) -> None:
    """The maxkey scan (which picks its matmul layout by dtype and query count) gives the
    fp32 scores within bf16 rounding, on an index that is a view of a larger buffer."""
    from langchain_infllm.engine.retrieval import score_blocks

    gen = torch.Generator().manual_seed(queries)
    kvh, heads, d, bs, n = 3, 9, 64, 32, 37
    store = torch.randn(kvh, 2 * n * bs + 5, d, generator=gen).to(torch.bfloat16)
    index = store[:, : n * bs]
    q = torch.randn(heads, queries, d, generator=gen).to(torch.bfloat16)
    got = score_blocks("maxkey", q, reprs=torch.empty(0), index_keys=index, kv_heads=kvh,
                       block_size=bs)
    dots = torch.einsum("gjmd,gtd->gjmt", q.float().view(kvh, heads // kvh, queries, d),
                        index.float())
    expected = dots.amax(dim=(1, 2)).view(kvh, n, bs).amax(dim=2)
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.01)


def test_close_releases_the_block_store() -> None:
    """The blocks are views of the store, so a session left without blocks drops it (a
    store kept for reuse would hold the closed session's K/V)."""
    engine = engine_for("llama", torch.float32, **FAST)
    session = engine.new_session()
    run(session, calls(random.Random(12), prompt=90, decode=3))
    assert session.layers[0]._index_v is not None
    assert session.layers[0]._index_v.shape[1] > 0
    session.close()
    for layer in session.layers:
        assert layer._index_k is not None and layer._index_k.shape[1] == 0
        assert layer._index_v is not None and layer._index_v.shape[1] == 0
    # ... and stays usable.
    fresh = engine.new_session()
    steps = calls(random.Random(13), prompt=60, decode=9)
    assert [torch.equal(a, b) for (a, _), (b, _) in zip(run(session, steps), run(fresh, steps),
                                                        strict=True)] == [True] * len(steps)
