"""The engine against independent references (DESIGN.md section 8), on random inputs."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from langchain_infllm import InfLLMConfig, InfLLMEngine
from langchain_infllm.engine.retrieval import RETRIEVAL_METHODS
from tests.dense_oracle import dense_oracle_logits
from tests.tiny_models import ARCHS, tiny_pair

ATOL = 1e-4


def _pieces(rng: random.Random, total: int, low: int = 1, high: int = 23) -> list[int]:
    sizes = []
    while sum(sizes) < total:
        sizes.append(min(rng.randint(low, high), total - sum(sizes)))
    return sizes


def _exec_chunks(pieces: list[int], chunk_size: int, exc: int, last_alone: bool = True
                 ) -> list[tuple[int, int]]:
    """Execution chunks the engine should use for this append pattern: model calls of
    `chunk_size` tokens, with `last_alone` (`last_token_alone`, with retrieval on) the
    last token of each append a call of its own, and `exc` queries per chunk of a call."""
    chunks, pos = [], 0
    for size in pieces:
        calls = [min(chunk_size, size - a) for a in range(0, size, chunk_size)]
        if last_alone and calls[-1] > 1:
            calls[-1:] = [calls[-1] - 1, 1]
        for call in calls:
            for b in range(0, call, exc):
                chunks.append((pos + b, pos + min(call, b + exc)))
            pos += call
    return chunks


def _append_in_pieces(
    engine: InfLLMEngine, ids: list[int], pieces: list[int]
) -> tuple[list[tuple[int, torch.Tensor | None]], list[Any]]:
    """Append `ids` in `pieces` to a new session: (last position, logits) per append and
    the retrieval records of the whole run."""
    session = engine.new_session()
    outputs = []
    pos = 0
    for size in pieces:
        outputs.append((pos + size - 1, session.append(ids[pos : pos + size]).logits))
        pos += size
    return outputs, session.drain_retrievals()


@pytest.mark.parametrize("retrieval", RETRIEVAL_METHODS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_short_context_equals_vanilla(arch: str, retrieval: str) -> None:
    model, reference = tiny_pair(arch, seed=1)
    config = InfLLMConfig(n_local=128, block_size=16, n_init=8, topk=2, max_cached_block=4,
                          exc_block_size=16, chunk_size=40,
                          retrieval=retrieval)  # type: ignore[arg-type]
    engine = InfLLMEngine(model, None, config)
    rng = random.Random(arch)
    ids = [rng.randrange(97) for _ in range(127)]
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    session = engine.new_session()
    pos = 0
    for size in _pieces(rng, len(ids)):
        out = session.append(ids[pos : pos + size])
        pos += size
        assert out.logits is not None
        torch.testing.assert_close(out.logits, expected[pos - 1], atol=ATOL, rtol=0)
    assert session.n_blocks == 0


@pytest.mark.parametrize("retrieval", RETRIEVAL_METHODS)
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("seed", [0, 1])
def test_long_context_matches_dense_oracle_with_all_blocks(
    arch: str, seed: int, retrieval: str
) -> None:
    model, reference = tiny_pair(arch, seed=seed)
    config = InfLLMConfig(n_local=32, block_size=8, n_init=4, topk=64, max_cached_block=64,
                          repr_topk=3, exc_block_size=12, chunk_size=29,
                          retrieval=retrieval)  # type: ignore[arg-type]
    engine = InfLLMEngine(model, None, config)
    rng = random.Random(seed * 31 + len(arch))
    ids = [rng.randrange(97) for _ in range(171)]  # 5+ windows, not a multiple of anything
    expected = dense_oracle_logits(reference, ids, n_local=32, n_init=4, block_size=8)
    session = engine.new_session()
    pos = 0
    for size in _pieces(rng, len(ids)):
        out = session.append(ids[pos : pos + size])
        pos += size
        assert out.logits is not None
        torch.testing.assert_close(out.logits, expected[pos - 1], atol=ATOL, rtol=0)
    assert session.n_blocks == (171 - 32 + 1 - 4) // 8


@pytest.mark.parametrize(
    ("retrieval", "options"),
    [*((m, {}) for m in RETRIEVAL_METHODS), ("maxkey", {"query_group": 2, "neighbours": 1}),
     ("infllm", {"last_token_alone": False})],
    ids=[*RETRIEVAL_METHODS, "maxkey-groups-neighbours", "infllm-paper-chunking"],
)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "llama31"])
@pytest.mark.parametrize("topk", [0, 1, 3])
def test_long_context_matches_oracle_restricted_to_selection(
    arch: str, topk: int, retrieval: str, options: dict[str, int]
) -> None:
    """The engine equals dense attention restricted to the blocks it reports it attended:
    one set per layer (the paper's faithful mode) or each KV head's own set."""
    model, reference = tiny_pair(arch, seed=topk)
    config = InfLLMConfig(n_local=24, block_size=6, n_init=3, topk=topk, max_cached_block=4,
                          repr_topk=2, exc_block_size=7, chunk_size=19, trace="full",
                          retrieval=retrieval, **options)  # type: ignore[arg-type]
    engine = InfLLMEngine(model, None, config)
    rng = random.Random(100 + topk)
    ids = [rng.randrange(97) for _ in range(157)]
    pieces = _pieces(rng, len(ids))
    outputs, records = _append_in_pieces(engine, ids, pieces)
    if topk:
        assert records, "blocks were sealed, so retrievals must be recorded"
        rows = [row for r in records for row in (r.head_block_ids or (r.block_ids,))]
        assert all(len(row) <= topk for row in rows)
        assert any(len(row) == topk for row in rows)
        per_head = [r.head_block_ids for r in records if r.head_block_ids is not None]
        if retrieval == "infllm":
            assert not per_head
        else:  # each KV head reports its own blocks, and the heads do not always agree
            assert len(per_head) == len(records)
            assert topk == 1 or any(len(set(heads)) > 1 for heads in per_head)
    expected = dense_oracle_logits(
        reference, ids, n_local=24, n_init=3, block_size=6, records=records,
        chunks=_exec_chunks(pieces, 19, 7, last_alone=topk > 0 and config.last_token_alone),
    )
    for position, logits in outputs:
        torch.testing.assert_close(logits, expected[position], atol=ATOL, rtol=0)


def test_fewer_blocks_differs_from_all_blocks() -> None:
    """Guard on the oracle itself: restricting the selection must change the outputs."""
    _, reference = tiny_pair("llama", seed=3)
    rng = random.Random(3)
    ids = [rng.randrange(97) for _ in range(120)]
    full = dense_oracle_logits(reference, ids, n_local=24, n_init=3, block_size=6)
    none = dense_oracle_logits(reference, ids, n_local=24, n_init=3, block_size=6,
                               chunks=_exec_chunks([120], 19, 7))
    assert (full[-1] - none[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("retrieval", RETRIEVAL_METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tracks_dense_oracle(dtype: torch.dtype, retrieval: str) -> None:
    model, reference = tiny_pair("qwen2", seed=5, dtype=dtype)
    config = InfLLMConfig(n_local=32, block_size=8, n_init=4, topk=64, max_cached_block=64,
                          exc_block_size=16, chunk_size=64,
                          retrieval=retrieval)  # type: ignore[arg-type]
    engine = InfLLMEngine(model, None, config)
    rng = random.Random(5)
    ids = [rng.randrange(97) for _ in range(150)]
    expected = dense_oracle_logits(reference.float(), ids, n_local=32, n_init=4, block_size=8)
    out = engine.new_session().append(ids)
    assert out.logits is not None
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits, expected[-1], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_exact_positions_with_all_blocks_equal_the_unmodified_model(
    arch: str, direct: bool
) -> None:
    """`memory_positions: exact` with every block attended and no cap in reach is plain
    causal attention: the engine must equal the model run the usual way."""
    model, reference = tiny_pair(arch, seed=7)
    config = InfLLMConfig(n_local=24, block_size=6, n_init=3, topk=40, max_cached_block=40,
                          exc_block_size=7, chunk_size=19, retrieval="maxkey",
                          memory_positions="exact", direct_blocks=direct)
    engine = InfLLMEngine(model, None, config)
    rng = random.Random(len(arch))
    ids = [rng.randrange(97) for _ in range(163)]
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    session = engine.new_session()
    pos = 0
    for size in _pieces(rng, len(ids)):
        out = session.append(ids[pos : pos + size])
        pos += size
        assert out.logits is not None
        torch.testing.assert_close(out.logits, expected[pos - 1], atol=ATOL, rtol=0)
    assert session.n_blocks > 10


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize(("retrieval", "topk"), [("maxkey", 3), ("infllm", 2), ("maxkey", 40)])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama31"])
def test_exact_positions_match_oracle_with_a_capped_distance(
    arch: str, retrieval: str, topk: int, direct: bool
) -> None:
    """Exact positions capped at `max_memory_distance`, restricted to the reported
    blocks, against the dense oracle that places each far key at max(j, s - cap)."""
    model, reference = tiny_pair(arch, seed=topk)
    cap = 41
    config = InfLLMConfig(n_local=24, block_size=6, n_init=3, topk=topk, max_cached_block=40,
                          repr_topk=2, exc_block_size=7, chunk_size=19, trace="full",
                          retrieval=retrieval, memory_positions="exact",  # type: ignore[arg-type]
                          max_memory_distance=cap, direct_blocks=direct)
    engine = InfLLMEngine(model, None, config)
    rng = random.Random(200 + topk)
    ids = [rng.randrange(97) for _ in range(157)]
    pieces = _pieces(rng, len(ids))
    outputs, records = _append_in_pieces(engine, ids, pieces)
    chunks = _exec_chunks(pieces, 19, 7)
    expected = dense_oracle_logits(
        reference, ids, n_local=24, n_init=3, block_size=6, records=records, chunks=chunks,
        memory_distance=cap,
    )
    uncapped = dense_oracle_logits(
        reference, ids, n_local=24, n_init=3, block_size=6, records=records, chunks=chunks,
        memory_distance=10_000,
    )
    assert (expected - uncapped).abs().max() > 1e-3, "the cap must matter here"
    for position, logits in outputs:
        torch.testing.assert_close(logits, expected[position], atol=ATOL, rtol=0)


def test_exact_positions_cap_must_reach_past_the_window() -> None:
    with pytest.raises(ValueError, match="max_memory_distance"):
        InfLLMConfig(n_local=24, block_size=6, n_init=3, topk=2, max_cached_block=4,
                     memory_positions="exact", max_memory_distance=10)
    with pytest.raises(ValueError, match="max_memory_distance"):  # a knob of another mode
        InfLLMConfig(memory_positions="compact", max_memory_distance=8192)
    with pytest.raises(ValueError, match="position_group"):
        InfLLMConfig(memory_positions="exact", position_group=4)


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize(("retrieval", "topk"), [("maxkey", 3), ("infllm", 2), ("maxkey", 40)])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama31"])
def test_compact_positions_match_oracle(
    arch: str, retrieval: str, topk: int, direct: bool, group: int
) -> None:
    """`memory_positions: compact` against the dense oracle that packs, per chunk and KV
    head, the far keys it may see in their order just behind the window."""
    model, reference = tiny_pair(arch, seed=topk + 1)
    config = InfLLMConfig(n_local=24, block_size=6, n_init=3, topk=topk, max_cached_block=40,
                          repr_topk=2, exc_block_size=7, chunk_size=19, trace="full",
                          retrieval=retrieval, memory_positions="compact",  # type: ignore[arg-type]
                          position_group=group, direct_blocks=direct)
    engine = InfLLMEngine(model, None, config)
    rng = random.Random(300 + topk)
    ids = [rng.randrange(97) for _ in range(157)]
    pieces = _pieces(rng, len(ids))
    outputs, records = _append_in_pieces(engine, ids, pieces)
    chunks = _exec_chunks(pieces, 19, 7)
    expected = dense_oracle_logits(
        reference, ids, n_local=24, n_init=3, block_size=6, records=records, chunks=chunks,
        memory_positions="compact", position_group=group,
    )
    fixed = dense_oracle_logits(
        reference, ids, n_local=24, n_init=3, block_size=6, records=records, chunks=chunks,
    )
    assert (expected - fixed).abs().max() > 1e-3, "packing must differ from fixed positions"
    for position, logits in outputs:
        torch.testing.assert_close(logits, expected[position], atol=ATOL, rtol=0)
