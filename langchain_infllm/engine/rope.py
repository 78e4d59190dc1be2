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
        self._by_dtype: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {
            torch.float32: (self.cos, self.sin)
        }

    def _tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._by_dtype.get(dtype)
        if tables is None:
            tables = (self.cos.to(dtype), self.sin.to(dtype))
            self._by_dtype[dtype] = tables
        return tables

    def rotate(
        self,
        x: torch.Tensor,
        first: int,
        *,
        same: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rotate `x[..., seq, head_dim]` to positions `first, first+1, ...` (or all to
        `first` when `same`). Contiguous positions let us slice the tables, not gather.

        Computed in `x`'s dtype, as the Hugging Face models do; written into `out` (same
        shape, e.g. a slice of a cache) when given.
        """
        cos_table, sin_table = self._tables(x.dtype)
        if same:
            cos, sin = cos_table[first], sin_table[first]
        else:
            seq = x.shape[-2]
            cos, sin = cos_table[first : first + seq], sin_table[first : first + seq]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        result = torch.mul(x, cos, out=out) if out is not None else x * cos
        result.addcmul_(rotated, sin)
        return result

    def rotate_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate `x [rows, seq, head_dim]` to `positions [rows or 1, seq]` (any order).

        For keys gathered from scattered blocks (`memory_positions: exact`); a gather
        of the tables, where `rotate` slices them.
        """
        cos_table, sin_table = self._tables(x.dtype)
        cos, sin = cos_table[positions], sin_table[positions]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos).addcmul_(rotated, sin)
