"""Rotary embeddings at small relative positions, taken from the model's own rotary module.

The engine calls the model with every position id set to zero, so queries and keys
reach the attention function un-rotated (scaled by the rotary `attention_scaling`, which
is 1 for plain RoPE). InfLLM then rotates them itself at relative positions below
`n_local + chunk`, which keeps fp32 phases exact at any context length and honours
whatever `rope_scaling` (Llama-3.1, YaRN, ...) the model's rotary module implements.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryTable:
    """cos/sin for positions `0 .. size-1`, normalised so position 0 is the identity."""

    def __init__(self, rotary_emb: nn.Module, size: int, head_dim: int, device: torch.device):
        positions = torch.arange(size, device=device)[None, :]
        probe = torch.zeros(1, size, head_dim, dtype=torch.float32, device=device)
        with torch.no_grad():
            cos, sin = rotary_emb(probe, positions)
        cos = cos[0].to(torch.float32)
        sin = sin[0].to(torch.float32)
        # At position 0, cos equals the module's attention scaling on every dimension; the
        # model has already applied that factor to q and k, so divide it out here.
        scale = cos[0, 0].item()
        if scale == 0.0:
            raise ValueError("rotary embedding returned cos=0 at position 0; unsupported rope")
        self.cos = cos / scale
        self.sin = sin / scale
        self.size = size

    def rotate(self, x: torch.Tensor, positions: torch.Tensor | int) -> torch.Tensor:
        """Rotate `x[..., seq, head_dim]` by `positions` (a 1-D tensor of length seq, or an int)."""
        if isinstance(positions, int):
            cos = self.cos[positions]
            sin = self.sin[positions]
        else:
            cos = self.cos[positions]
            sin = self.sin[positions]
        xf = x.to(torch.float32)
        half = xf.shape[-1] // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)
