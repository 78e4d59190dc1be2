"""Attention of one chunk as two fused passes (local window, memory) merged by log-sum-exp.

Softmax over the union of two key sets equals the two partial softmaxes reweighted by
their log-sum-exps, so neither the logits nor the probabilities of the whole chunk are
ever materialised. On CPU this runs PyTorch's flash kernel
(`_scaled_dot_product_flash_attention_for_cpu`, which returns the log-sum-exp) in the
model's dtype; elsewhere a plain fp32 computation with the same contract. This path
keeps no attention mass, so it serves the retrieval methods that do not need it (the
paper's representatives do; they keep the reference path in `attention.py`).
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
) -> torch.Tensor:
    """Combine the two partial attentions into the softmax over both key sets (fp32).

    `memory_rows_empty [L]` marks queries that see no memory key at all.
    """
    out_l, lse_l = local
    if memory is None:
        return out_l.float()
    out_m, lse_m = memory
    if memory_rows_empty is not None:
        lse_m = lse_m.masked_fill(memory_rows_empty, NEG_INF)
    lse = torch.logaddexp(lse_l, lse_m)
    w_l = torch.exp(lse_l - lse)[..., None]
    w_m = torch.exp(lse_m - lse)[..., None]
    return out_l.float() * w_l + out_m.float() * w_m


def additive_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `visible`, -inf elsewhere, in `dtype` (what the kernels add to logits)."""
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return bias.masked_fill_(~visible, NEG_INF)
