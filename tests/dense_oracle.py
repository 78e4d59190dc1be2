"""An independent dense reference for InfLLM attention (DESIGN.md section 8).

It runs the unmodified model over the whole sequence in one call with its own
attention function: query i sees every key j <= i; keys closer than `n_local` are
rotated at their true relative distance (absolute positions, the model's own
`apply_rotary_pos_emb`), farther keys sit at the fixed distance `n_local`. When the
engine attended only some blocks, the visible far keys are restricted to the sinks,
the blocks the engine reports it selected for that layer and chunk, and the tokens
not yet sealed into a block when that chunk ran. Nothing here uses engine code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

ORACLE = "infllm_dense_oracle"


def _oracle_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    plan: dict[str, Any] = kwargs["oracle_plan"]
    n_local, n_init, bs = plan["n_local"], plan["n_init"], plan["block_size"]
    rotary = plan["rotary"]
    length = query.shape[2]
    # Rotary tables reach position n_local even when the sequence is shorter.
    cos, sin = rotary(value, torch.arange(max(length, n_local + 1))[None])
    # Position ids were zero, so q/k are raw (times the rope attention scaling s, which
    # cos/sin below also carry): rescale to avoid counting s twice.
    s = rotary.attention_scaling
    q_raw, k_raw = query / s, key / s
    q_near, k_near = apply_rotary_pos_emb(q_raw, k_raw, cos[:, :length], sin[:, :length])
    far_cos = cos[:, n_local : n_local + 1].expand(-1, length, -1)
    far_sin = sin[:, n_local : n_local + 1].expand(-1, length, -1)
    q_far, _ = apply_rotary_pos_emb(q_raw, q_raw, far_cos, far_sin)
    k_far = k_raw * s  # position 0: identity rotation, scaled like every rotated key
    groups = query.shape[1] // key.shape[1]
    k_near, k_far, v = (repeat_kv(t, groups) for t in (k_near, k_far, value))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    near = (q_near @ k_near.transpose(-1, -2)) * scale
    allowed = _far_allowed(plan, module.layer_idx, length, n_init, bs, key.shape[1])
    if plan.get("memory_positions") == "compact":
        far = _compact_far_logits(plan, q_raw, k_raw, allowed, groups, length) * scale
    elif plan.get("memory_distance"):
        far = _exact_far_logits(plan, q_near, k_raw, groups, length) * scale
    else:
        far = (q_far @ k_far.transpose(-1, -2)) * scale
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    is_near = (i - j >= 0) & (i - j < n_local)
    visible_far = (i - j >= n_local) & allowed.repeat_interleave(groups, dim=0)
    logits = torch.where(is_near, near, far)
    logits = logits.masked_fill(~(is_near | visible_far), float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1).to(v.dtype)
    return (probs @ v).transpose(1, 2), None


def _exact_far_logits(
    plan: dict[str, Any], q: torch.Tensor, k_raw: torch.Tensor, groups: int, length: int
) -> torch.Tensor:
    """`memory_positions: exact`: a far key j, seen from the execution chunk that starts
    at s, sits at position max(j, s - D); queries keep their own positions."""
    rotary, cap = plan["rotary"], plan["memory_distance"]
    logits = torch.empty(q.shape[0], q.shape[1], length, length, dtype=q.dtype)
    j = torch.arange(length)
    for start, end in plan["exec_chunks"]:
        virtual = torch.clamp(j, min=start - cap)[None]
        cos, sin = rotary(k_raw, virtual)
        _, k_far = apply_rotary_pos_emb(k_raw, k_raw, cos, sin)  # cos carries the scaling
        k_far = repeat_kv(k_far, groups)
        logits[:, :, start:end] = q[:, :, start:end] @ k_far.transpose(-1, -2)
    return logits


def _compact_far_logits(
    plan: dict[str, Any],
    q_raw: torch.Tensor,
    k_raw: torch.Tensor,
    allowed: torch.Tensor,
    groups: int,
    length: int,
) -> torch.Tensor:
    """`memory_positions: compact`: the far keys an execution chunk [s, e) may see
    through KV head h (sinks, its blocks, keys not yet sealed, all at least n_local
    behind the chunk's last query) sit at positions 0, 1, ... in their order; query i at
    (their count - 1) + n_local + (i - s); with `position_group` g, key r at r // g and
    the first query at (count - 1) // g + n_local."""
    rotary, n_local = plan["rotary"], plan["n_local"]
    logits = torch.full((q_raw.shape[0], q_raw.shape[1], length, length), float("nan"))
    j = torch.arange(length)
    for start, end in plan["exec_chunks"]:
        for h in range(k_raw.shape[1]):
            far = torch.nonzero(allowed[h, start] & (j <= end - 1 - n_local))[:, 0]
            if not len(far):
                continue
            group = plan["position_group"]
            k_cos, k_sin = rotary(k_raw, (torch.arange(len(far)) // group)[None])
            first = (len(far) - 1) // group + n_local
            q_cos, q_sin = rotary(q_raw, torch.arange(first, first + end - start)[None])
            heads = slice(h * groups, (h + 1) * groups)
            q_rot, _ = apply_rotary_pos_emb(
                q_raw[:, heads, start:end], q_raw[:, heads, start:end], q_cos, q_sin
            )
            _, k_rot = apply_rotary_pos_emb(
                k_raw[:, h : h + 1, far], k_raw[:, h : h + 1, far], k_cos, k_sin
            )
            logits[:, heads, start:end, far] = q_rot @ k_rot.transpose(-1, -2)
    return logits


def _far_allowed(
    plan: dict[str, Any], layer: int, length: int, n_init: int, bs: int, kv_heads: int
) -> torch.Tensor:
    """[kv_heads, length, length] bool: far key j may be attended by query i through
    KV head h (ignoring distance). A record's blocks apply to every head unless it lists
    the blocks of each KV head."""
    allowed = torch.ones(kv_heads, length, length, dtype=torch.bool)
    chunks = plan.get("chunks")
    if chunks is None:
        return allowed
    n_local = plan["n_local"]
    j = torch.arange(length)
    block_of = torch.where(j >= n_init, (j - n_init) // bs, -1)
    for start, end in chunks:
        sealed_blocks = max(0, (start - n_local + 1 - n_init) // bs)
        if start - n_local + 1 < n_init:
            sealed_blocks = 0
        rows = plan["selected"].get((layer, start), ((),))
        sealed = (block_of >= 0) & (block_of < sealed_blocks)
        for head in range(kv_heads):
            chosen = rows[head] if len(rows) > 1 else rows[0]
            ok = ~sealed | torch.isin(block_of, torch.tensor(chosen, dtype=torch.long))
            allowed[head, start:end] = ok[None, :]
    return allowed


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def dense_oracle_logits(
    model: PreTrainedModel,
    token_ids: list[int],
    *,
    n_local: int,
    n_init: int,
    block_size: int,
    records: list[Any] | None = None,
    chunks: list[tuple[int, int]] | None = None,
    memory_distance: int = 0,
    memory_positions: str = "fixed",
    position_group: int = 1,
    exec_chunks: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Logits at every position `[len, vocab]`; `records` restricts far keys per chunk.

    `memory_distance` > 0 models `memory_positions: exact` (far keys at their true
    position, at most that far from the first query of their `exec_chunks` chunk);
    `memory_positions="compact"` packs the far keys each chunk may see (`exec_chunks`)."""
    AttentionInterface.register(ORACLE, _oracle_attention)
    AttentionMaskInterface.register(ORACLE, _no_mask)
    model.set_attn_implementation(ORACLE)
    plan: dict[str, Any] = {
        "n_local": n_local,
        "n_init": n_init,
        "block_size": block_size,
        "rotary": model.model.rotary_emb,
        "memory_distance": memory_distance,
        "memory_positions": memory_positions,
        "position_group": position_group,
        "exec_chunks": exec_chunks or chunks,
    }
    if records is not None or chunks is not None:
        records = records or []
        plan["selected"] = {
            (r.layer, r.query_start): r.head_block_ids or (r.block_ids,) for r in records
        }
        plan["chunks"] = chunks or sorted({(r.query_start, r.query_end) for r in records})
    ids = torch.tensor([token_ids])
    try:
        with torch.no_grad():
            out = model(
                input_ids=ids,
                position_ids=torch.zeros_like(ids),
                use_cache=False,
                oracle_plan=plan,
            )
    finally:
        model.set_attn_implementation("eager")
    return out.logits[0]
