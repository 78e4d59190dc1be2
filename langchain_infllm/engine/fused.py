"""Attention of one chunk as two fused passes (local window, memory) merged by log-sum-exp.

Softmax over the union of two key sets equals the two partial softmaxes reweighted by
their log-sum-exps, so neither the logits nor the probabilities of the whole chunk are
ever materialised. On CPU this runs PyTorch's flash kernel
(`_scaled_dot_product_flash_attention_for_cpu`, which returns the log-sum-exp) in the
model's dtype; elsewhere a plain fp32 computation with the same contract. The paper's
representative keys need the attention mass each local key received: `local_mass`
recomputes it from the merged log-sum-exp, tile by tile, so the probabilities of the
whole chunk are never held either.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`q [B, L, d]` (already scaled), `k, v [B, S, d]`, additive `bias [L, S]` or None.

    Returns `(out [B, L, d] in v's dtype, lse [B, L] fp32)`. A row whose keys are all
    masked has lse -inf (the flash kernel itself reports 0 there; see `merge`).
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[:, None], k[:, None], v[:, None], 0.0, False,
            attn_mask=None if bias is None else bias[None, None], scale=1.0,
        )
        return out[:, 0], lse[:, 0]
    logits = torch.bmm(q.float(), k.float().transpose(1, 2))
    if bias is not None:
        logits = logits + bias.float()
    lse = logits.logsumexp(dim=-1)
    probs = torch.exp(logits - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
    return torch.bmm(probs, v.float()).to(v.dtype), lse


def merge(
    local: tuple[torch.Tensor, torch.Tensor],
    memory: tuple[torch.Tensor, torch.Tensor] | None,
    memory_rows_empty: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine the two partial attentions into the softmax over both key sets: the output
    (fp32) and the log-sum-exp over both `[B, L]`.

    `memory_rows_empty [L]` marks queries that see no memory key at all.
    """
    out_l, lse_l = local
    if memory is None:
        return out_l.float(), lse_l
    out_m, lse_m = memory
    if memory_rows_empty is not None:
        lse_m = lse_m.masked_fill(memory_rows_empty, NEG_INF)
    lse = torch.logaddexp(lse_l, lse_m)
    w_l = torch.exp(lse_l - lse)[..., None]
    w_m = torch.exp(lse_m - lse)[..., None]
    return out_l.float() * w_l + out_m.float() * w_m, lse


MASS_TILE_ROWS = 1024
"""Query rows per tile of `local_mass`: bounds its fp32 scratch to rows x local keys."""


def local_mass(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, lse: torch.Tensor, groups: int
) -> torch.Tensor:
    """Attention mass each local key received from the chunk: `[B * groups, S]`.

    `q [B, groups * c, d]` (scaled, in the dtype the kernel saw), `k [B, S, d]`, additive
    `bias [groups * c, S]` and the merged `lse [B, groups * c]`: each probability is
    `exp(q.k + bias - lse)`, recomputed in fp32 for a tile of rows at a time and summed
    over the chunk's queries of each query head (row `j * c + i` is query i of head j).
    """
    b, rows, _ = q.shape
    c = rows // groups
    mass = torch.zeros(b, groups, k.shape[1], dtype=torch.float32, device=q.device)
    k32 = k.float().transpose(1, 2)
    finite_lse = lse.clamp_min(torch.finfo(torch.float32).min)  # rows that see nothing
    for j in range(groups):  # one query head of each KV head at a time
        for a in range(j * c, (j + 1) * c, MASS_TILE_ROWS):
            e = min((j + 1) * c, a + MASS_TILE_ROWS)
            logits = torch.baddbmm(bias[a:e].float(), q[:, a:e].float(), k32)
            mass[:, j] += torch.exp(logits - finite_lse[:, a:e, None]).sum(dim=1)
    return mass.reshape(b * groups, -1)


def additive_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `visible`, -inf elsewhere, in `dtype` (what the kernels add to logits)."""
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return bias.masked_fill_(~visible, NEG_INF)
