"""InfLLM attention, registered with transformers' attention interface.

For each execution chunk of queries at positions `[s, e)` and each layer:

* local part: tail keys at positions `[max(tail_start, s - n_local + 1), e)`, rotated at
  their true relative distance; query i sees key j iff `0 <= i - j < n_local`;
* memory part: sinks + the `topk` blocks whose representative keys best match the
  chunk's mean query + the remainder (tail tokens already `>= n_local` behind); every
  memory key sits at distance `n_local` (keys un-rotated, query rotated by `n_local`),
  and query i sees memory key j iff `i - j >= n_local`;
* one softmax over both parts, so no key is seen twice and nothing is renormalised.

The engine passes an `InfLLMForwardContext` through the model's forward kwargs; no
transformers class is patched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from langchain_infllm.config import MemoryPositions
from langchain_infllm.engine.block_cache import DeviceBlockCache, PendingFetch
from langchain_infllm.engine.fused import (
    additive_bias,
    attention_with_lse,
    local_mass,
    merge,
)
from langchain_infllm.engine.memory import LayerMemory
from langchain_infllm.engine.records import RetrievalRecord
from langchain_infllm.engine.retrieval import (
    Selection,
    chunk_queries,
    needs_attention_mass,
    score_blocks,
    select_blocks,
    selection_of,
    top_block_ids,
    top_blocks,
)
from langchain_infllm.engine.rope import RotaryTable

ATTENTION_NAME = "infllm"


@dataclass
class InfLLMForwardContext:
    """Everything one model call needs: the session's layers and where the chunk sits."""

    layers: list[LayerMemory]
    caches: list[DeviceBlockCache]
    rope: RotaryTable
    start: int  # position of the first token of this model call
    n_local: int
    topk: int
    exc_block_size: int
    next_uid: Callable[[], int]
    record: Callable[[RetrievalRecord], None] | None = None
    calls: list[int] = field(default_factory=list)
    observe: Callable[[int, int, torch.Tensor, LayerMemory], None] | None = None
    """Diagnostics hook: `(layer, query_start, memory-side queries [heads, c, d], memory)`
    for every chunk that scores blocks (benchmarks/recall.py uses it)."""
    masks: dict[tuple[int, ...], ChunkMasks] = field(default_factory=dict)
    """Visibility masks per chunk layout; every layer of one call shares them."""
    fused: bool = True
    """Use the fused kernels where the retrieval method needs no attention mass."""
    query_group: int = 0
    """Queries per retrieval query (`retrieval.chunk_queries`; 0: the chunk mean)."""
    neighbours: int = 0
    """Blocks on each side a hit lends its score to (`retrieval.score_blocks`)."""
    fused_masks: dict[tuple[int, ...], FusedMasks] = field(default_factory=dict)
    fast_decode: bool = True
    """Fused path: reuse the window's rotated keys between seals (`LayerMemory.rotated_window`)."""
    direct_blocks: bool = False
    """Gather retrieved blocks straight from the layer's contiguous store where it has
    one (host == device), instead of copying them through the block cache."""
    memory_positions: MemoryPositions = "fixed"
    """Where memory keys sit (`InfLLMConfig.memory_positions`): 'fixed' at distance
    `n_local` (the paper), 'exact' at their true distance capped at `memory_distance`,
    'compact' in their order, packed next to each other just behind the window."""
    memory_distance: int = 0
    position_group: int = 1
    """'compact': consecutive memory keys that share one position."""


@dataclass(frozen=True)
class ChunkMasks:
    """Where visibility changes inside one chunk's logits (see `_mask_bands`)."""

    future: torch.Tensor  # [c, n_loc - right]: local keys ahead of the query
    right: int
    too_far: torch.Tensor  # [c, left]: local keys n_local or more behind the query
    too_near: torch.Tensor | None  # [c, n_rem]: remainder keys not yet n_local behind


def infllm_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention hook: `query [1, heads, n, d]` -> `[1, n, heads, d]`."""
    ctx = kwargs.get("infllm_context")
    if not isinstance(ctx, InfLLMForwardContext):
        raise RuntimeError(
            "the 'infllm' attention runs only inside InfLLMEngine (no infllm_context given)"
        )
    if query.shape[0] != 1:
        raise ValueError("InfLLM sessions process one sequence at a time (batch size 1)")
    layer_idx: int = module.layer_idx  # type: ignore[assignment]
    memory = ctx.layers[layer_idx]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = query[0], key[0], value[0]
    n = q.shape[1]
    outputs = []
    for a in range(0, n, ctx.exc_block_size):
        b = min(n, a + ctx.exc_block_size)
        outputs.append(
            attend_chunk(
                memory,
                ctx.caches[layer_idx],
                ctx,
                layer_idx,
                q[:, a:b],
                k[:, a:b],
                v[:, a:b],
                ctx.start + a,
                scale,
            )
        )
    out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
    return out.transpose(0, 1).unsqueeze(0), None


def attend_chunk(
    memory: LayerMemory,
    cache: DeviceBlockCache,
    ctx: InfLLMForwardContext,
    layer_idx: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    scaling: float,
) -> torch.Tensor:
    """Attend one execution chunk (`q [heads, c, d]`, new `k, v [kv_heads, c, d]`)."""
    n_local = ctx.n_local
    heads, c, d = q.shape
    kv_heads = k.shape[0]
    groups = heads // kv_heads
    end = start + c
    if memory.length != start:
        raise RuntimeError(f"layer {layer_idx} holds {memory.length} tokens, chunk starts {start}")
    memory.append_tail(k, v)
    tail_start = memory.tail_start
    out_dtype = q.dtype
    # Queries in fp32, scaled once (cheaper than scaling the logits).
    q = q.to(torch.float32) * scaling
    # Memory side: start the block copies first so they overlap the local attention.
    q_mem = ctx.rope.rotate(q, n_local, same=True)
    if ctx.observe is not None and memory.n_blocks > 0:
        ctx.observe(layer_idx, start, q_mem, memory)
    pending = None
    selection = None
    direct: tuple[torch.Tensor, torch.Tensor] | None = None
    direct_ids: torch.Tensor | None = None
    if ctx.topk > 0 and memory.n_blocks > 0:
        q_score, index_keys = q_mem, memory.index_keys
        if ctx.memory_positions == "exact" and index_keys is not None:
            # Exact positions: rank the blocks at the distances they will be attended at.
            q_score, index_keys = exact_scoring_inputs(
                ctx.rope, ctx.memory_distance, memory.n_init, q, index_keys, start
            )
        scores = score_blocks(
            memory.retrieval,
            chunk_queries(q_score, memory.retrieval, ctx.query_group),
            reprs=memory.reprs,
            index_keys=index_keys,
            kv_heads=kv_heads,
            block_size=memory.block_size,
            neighbours=ctx.neighbours,
        )
        before = cache.counters.snapshot()
        if ctx.direct_blocks and memory.index_values is not None:
            # Host memory is the device: no copies to make, so no cache and no host sync
            # unless a record wants the block ids.
            if ctx.record is None:
                direct_ids = top_block_ids(scores, ctx.topk)
            else:
                direct_ids, best_t = top_blocks(scores, ctx.topk)
                selection = selection_of(scores, direct_ids, best_t)
            direct = memory.gather_blocks(direct_ids)
        else:
            selection = select_blocks(scores, ctx.topk)
            pending = _fetch(cache, memory, selection)
        after = cache.counters.snapshot()
        if ctx.record is not None and selection is not None:
            chosen = selection.blocks
            ctx.record(
                RetrievalRecord(
                    layer=layer_idx,
                    query_start=start,
                    query_end=end,
                    block_ids=tuple(chosen),
                    scores=tuple(selection.scores),
                    block_spans=tuple(memory.block_span(i) for i in chosen),
                    hits=after[0] - before[0],
                    misses=after[1] - before[1],
                    bytes_copied=after[2] - before[2],
                    head_block_ids=None if selection.shared
                    else tuple(tuple(row) for row in selection.per_head),
                )
            )

    # Local side: true relative positions measured from the first local key.
    local_lo = max(tail_start, start - n_local + 1)
    tail_k, tail_v = memory.tail_k, memory.tail_v
    loc_k = tail_k[:, local_lo - tail_start : end - tail_start]
    loc_v = tail_v[:, local_lo - tail_start : end - tail_start]
    n_rem = max(0, end - n_local - tail_start)

    mem_k_parts: list[torch.Tensor] = [memory.init_k]
    mem_v_parts: list[torch.Tensor] = [memory.init_v]
    if direct is not None:
        mem_k_parts.append(direct[0])
        mem_v_parts.append(direct[1])
    elif pending is not None and selection is not None:
        blk_k, blk_v = pending.gather()
        if selection.shared:
            mem_k_parts.extend(blk_k)
            mem_v_parts.extend(blk_v)
        else:
            mem_k_parts.append(_per_head_blocks(blk_k, kv_heads))
            mem_v_parts.append(_per_head_blocks(blk_v, kv_heads))
    mem_k_parts.append(tail_k[:, :n_rem])
    mem_v_parts.append(tail_v[:, :n_rem])
    mem_k = torch.cat(mem_k_parts, dim=1)
    mem_v = torch.cat(mem_v_parts, dim=1)
    layout = (start, end, local_lo, tail_start, n_rem)
    if ctx.memory_positions == "compact":
        # The attended memory keys as one run ending `n_local` before the first query,
        # `position_group` consecutive keys per position: order kept, distances small.
        n_mem, g = mem_k.shape[1], ctx.position_group
        if g == 1:
            mem_k = ctx.rope.rotate(mem_k, 0)
        else:
            mem_k = ctx.rope.rotate_at(mem_k, _grouped_positions(n_mem, g, q.device))
        q_first = (n_mem - 1) // g + n_local
        q_far = ctx.rope.rotate(q, q_first).reshape(kv_heads, groups * c, d)
    elif ctx.memory_positions == "exact":
        blocks = direct_ids if direct is not None else _selected_blocks(selection, q.device)
        positions = memory_positions(memory, blocks, tail_start, n_rem, q.device)
        base = max(0, start - ctx.memory_distance)
        mem_k = ctx.rope.rotate_at(mem_k, positions.clamp_min(base) - base)
        q_far = ctx.rope.rotate(q, start - base).reshape(kv_heads, groups * c, d)
    else:
        q_far = q_mem.reshape(kv_heads, groups * c, d)
    if ctx.fused:
        # Local keys and queries rotated against one base; only their distance matters.
        if ctx.fast_decode:
            k_loc, base = memory.rotated_window(ctx.rope, start, local_lo, end)
        else:
            k_loc, base = ctx.rope.rotate(loc_k, 0), local_lo
        q_loc = ctx.rope.rotate(q, start - base).reshape(kv_heads, groups * c, d)
        keeps_mass = memory if needs_attention_mass(memory.retrieval) else None
        out = _fused_chunk(ctx, layout, q_loc, q_far, k_loc, loc_v, mem_k, mem_v, groups,
                           keeps_mass)
    else:
        q_loc = ctx.rope.rotate(q, start - local_lo).reshape(kv_heads, groups * c, d)
        out = _reference_chunk(ctx, memory, layout, q_loc, q_far, loc_k, loc_v, mem_k, mem_v)
    memory.seal(end - n_local + 1, ctx.next_uid)
    return out.reshape(heads, c, d).to(out_dtype)


def exact_scoring_inputs(
    rope: RotaryTable,
    distance: int,
    n_init: int,
    q: torch.Tensor,
    index_keys: torch.Tensor,
    start: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's queries `q [heads, c, d]` (first at `start`) and the sealed keys
    `index_keys [kv_heads, n, d]` rotated as `memory_positions: exact` attends them: each
    key at its true position, or `distance` behind the chunk's first query when farther.
    Ranking blocks at the distances they are attended at, not at the paper's fixed
    `n_local`, keeps the choice consistent with the attention that follows."""
    base = max(0, start - distance)
    true = torch.arange(index_keys.shape[1], device=q.device) + n_init
    keys = rope.rotate_at(index_keys, (true.clamp_min(base) - base)[None])
    return rope.rotate(q, start - base), keys


def _grouped_positions(n: int, group: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(n, device=device) // group)[None]


def _selected_blocks(selection: Selection | None, device: torch.device) -> torch.Tensor | None:
    """The fetched blocks as `[rows, k]` indices, in the order `_fetch` gathered them."""
    if selection is None:
        return None
    rows = [selection.blocks] if selection.shared else selection.per_head
    return torch.tensor(rows, dtype=torch.long, device=device)


def memory_positions(
    memory: LayerMemory,
    blocks: torch.Tensor | None,
    tail_start: int,
    n_rem: int,
    device: torch.device,
) -> torch.Tensor:
    """True positions `[rows, n_mem]` of the memory keys, in `mem_k`'s order: sinks, the
    retrieved blocks (`blocks [rows, k]`, one row per KV head or one shared row), the
    remainder of the tail."""
    rows = 1 if blocks is None else blocks.shape[0]
    parts = [torch.arange(memory.init_k.shape[1], device=device).expand(rows, -1)]
    if blocks is not None:
        offsets = torch.arange(memory.block_size, device=device)
        starts = memory.n_init + blocks * memory.block_size
        parts.append((starts[..., None] + offsets).reshape(rows, -1))
    parts.append(torch.arange(tail_start, tail_start + n_rem, device=device).expand(rows, -1))
    return torch.cat(parts, dim=1)


def _reference_chunk(
    ctx: InfLLMForwardContext,
    memory: LayerMemory,
    layout: tuple[int, int, int, int, int],
    q_loc: torch.Tensor,
    q_mem: torch.Tensor,
    loc_k: torch.Tensor,
    loc_v: torch.Tensor,
    mem_k: torch.Tensor,
    mem_v: torch.Tensor,
) -> torch.Tensor:
    """One softmax over both parts in fp32; adds the attention mass each local key got.

    Logits, softmax and the weighted sum run in fp32 whatever the model's dtype, and the
    attention mass that picks the paper's representative keys is accumulated at full
    precision. `q_* [kv_heads, groups * c, d]`; returns the same shape (fp32).
    """
    start, end, local_lo, tail_start, n_rem = layout
    f32 = torch.float32
    kv_heads, gc, _ = q_loc.shape
    c = end - start
    groups = gc // c
    n_loc, n_mem = loc_k.shape[1], mem_k.shape[1]
    k_loc = ctx.rope.rotate(loc_k.to(f32), 0)
    # One logits buffer for both parts, so a single softmax normalises over their union.
    logits = torch.empty(kv_heads, gc, n_loc + n_mem, dtype=f32, device=q_loc.device)
    torch.bmm(q_loc, k_loc.transpose(1, 2), out=logits[:, :, :n_loc])
    torch.bmm(q_mem, mem_k.to(f32).transpose(1, 2), out=logits[:, :, n_loc:])
    masks = _chunk_masks(ctx, start, end, local_lo, tail_start, n_rem, q_loc.device)
    _mask_bands(logits.view(kv_heads, groups, c, n_loc + n_mem), masks)
    probs = torch.softmax(logits, dim=-1)
    out = torch.bmm(probs[:, :, :n_loc], loc_v.to(f32))
    out.baddbmm_(probs[:, :, n_loc:], mem_v.to(f32))
    # Attention mass each local key received: the basis of representative keys.
    mass = probs[:, :, :n_loc].view(kv_heads, groups, c, n_loc).sum(dim=2)
    memory.add_tail_scores(local_lo, mass.reshape(kv_heads * groups, n_loc))
    return out


def _fused_chunk(
    ctx: InfLLMForwardContext,
    layout: tuple[int, int, int, int, int],
    q_loc: torch.Tensor,
    q_mem: torch.Tensor,
    k_loc: torch.Tensor,
    loc_v: torch.Tensor,
    mem_k: torch.Tensor,
    mem_v: torch.Tensor,
    groups: int,
    keeps_mass: LayerMemory | None,
) -> torch.Tensor:
    """Local and memory parts as two fused kernels in the model's dtype, merged by LSE.

    `k_loc` is already rotated against the same base as `q_loc`. With `keeps_mass` (the
    paper's representatives) the attention mass of each local key is added to that
    memory's tail scores, recomputed from the merged LSE (`fused.local_mass`)."""
    dtype = k_loc.dtype
    masks = _fused_masks(ctx, layout, mem_k.shape[1], groups, dtype, q_loc.device)
    q_loc = q_loc.to(dtype)
    local = attention_with_lse(q_loc, k_loc, loc_v, masks.local)
    far = None
    if mem_k.shape[1]:
        far = attention_with_lse(q_mem.to(dtype), mem_k, mem_v, masks.memory)
    out, lse = merge(local, far, masks.memory_rows_empty)
    if keeps_mass is not None:
        local_lo = layout[2]
        keeps_mass.add_tail_scores(local_lo, local_mass(q_loc, k_loc, masks.local, lse, groups))
    return out


@dataclass(frozen=True)
class FusedMasks:
    """Additive masks of one chunk layout for the fused kernels (rows: groups x queries)."""

    local: torch.Tensor  # [groups * c, n_loc]
    memory: torch.Tensor | None  # [groups * c, n_mem]; None when every memory key is visible
    memory_rows_empty: torch.Tensor | None  # [groups * c]: queries that see no memory key


def _fused_masks(
    ctx: InfLLMForwardContext,
    layout: tuple[int, int, int, int, int],
    n_mem: int,
    groups: int,
    dtype: torch.dtype,
    device: torch.device,
) -> FusedMasks:
    """The chunk's fused-kernel masks, built once and reused by every layer."""
    start, end, local_lo, tail_start, n_rem = layout
    key = (*layout, n_mem, groups)
    found = ctx.fused_masks.get(key)
    if found is not None:
        return found
    n_local = ctx.n_local
    qp = torch.arange(start, end, device=device)[:, None]
    kp = torch.arange(local_lo, end, device=device)[None, :]
    local = ((qp >= kp) & (qp - kp < n_local)).repeat(groups, 1)
    memory = empty = None
    if n_rem:
        rem = torch.arange(tail_start, tail_start + n_rem, device=device)[None, :]
        visible = torch.ones(end - start, n_mem, dtype=torch.bool, device=device)
        visible[:, n_mem - n_rem :] = (qp - rem) >= n_local
        if not bool(visible.all()):
            visible = visible.repeat(groups, 1)
            memory = additive_bias(visible, dtype)
            empty = ~visible.any(dim=1)
    masks = FusedMasks(additive_bias(local, dtype), memory, empty)
    ctx.fused_masks[key] = masks
    return masks


def _chunk_masks(
    ctx: InfLLMForwardContext,
    start: int,
    end: int,
    local_lo: int,
    tail_start: int,
    n_rem: int,
    device: torch.device,
) -> ChunkMasks:
    """The chunk's visibility masks, built once and reused by every layer.

    Local keys are the columns `[0, n_loc)`: the last `c` may lie in a query's future,
    the first `c` may be `n_local` or more behind it. The remainder (last `n_rem`
    columns) is visible only once a query is `n_local` ahead. Sinks and blocks in between
    are always visible, so they are never touched.
    """
    key = (start, end, local_lo, tail_start, n_rem)
    found = ctx.masks.get(key)
    if found is not None:
        return found
    n_local = ctx.n_local
    c = end - start
    n_loc = end - local_lo
    qp = torch.arange(start, end, device=device)[:, None]
    key_pos = torch.arange(local_lo, end, device=device)
    right = max(0, n_loc - c)
    left = min(c, n_loc)
    too_near = None
    if n_rem:
        rem_pos = torch.arange(tail_start, tail_start + n_rem, device=device)
        too_near = (qp - rem_pos[None, :]) < n_local
    masks = ChunkMasks(
        future=key_pos[None, right:] > qp,
        right=right,
        too_far=(qp - key_pos[None, :left]) >= n_local,
        too_near=too_near,
    )
    ctx.masks[key] = masks
    return masks


def _mask_bands(logits: torch.Tensor, masks: ChunkMasks) -> None:
    """Apply a chunk's masks in place to `logits [kv_heads, groups, c, n_loc + n_mem]`."""
    right = masks.right
    n_loc = right + masks.future.shape[1]
    logits[..., right:n_loc].masked_fill_(masks.future, float("-inf"))
    logits[..., : masks.too_far.shape[1]].masked_fill_(masks.too_far, float("-inf"))
    if masks.too_near is not None:
        n_rem = masks.too_near.shape[1]
        logits[..., logits.shape[-1] - n_rem :].masked_fill_(masks.too_near, float("-inf"))


def _fetch(
    cache: DeviceBlockCache, memory: LayerMemory, selection: Selection
) -> PendingFetch:
    """Start copying the selected blocks (or, per KV head, their slices) to the device."""
    uids, keys, values = memory.block_uids, memory.block_k, memory.block_v
    if selection.shared:
        chosen = selection.blocks
        return cache.fetch(
            [uids[i] for i in chosen],
            [keys[i] for i in chosen],
            [values[i] for i in chosen],
            selection.scores,
        )
    # each KV head fetches only its own slices
    wanted = [(b, g) for g, row in enumerate(selection.per_head) for b in row]
    return cache.fetch(
        [(uids[b], g) for b, g in wanted],
        [keys[b][g] for b, g in wanted],
        [values[b][g] for b, g in wanted],
    )


def _per_head_blocks(slices: list[torch.Tensor], kv_heads: int) -> torch.Tensor:
    """`[kv_heads, k * block, dim]` from per-head slices `[block, dim]` fetched head by
    head (each head's `k` blocks in order)."""
    stacked = torch.stack(slices)  # [kv_heads * k, block, dim]
    return stacked.view(kv_heads, -1, stacked.shape[-1])
