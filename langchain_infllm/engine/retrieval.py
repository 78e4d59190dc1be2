"""Which memory blocks a chunk of queries attends: block scoring and top-k selection.

Two methods, chosen by `InfLLMConfig.retrieval`:

* ``infllm`` (the paper, arXiv 2402.04617): each block keeps one representative key per
  query head (the mean of the `repr_topk` keys that drew the most attention while they
  were local); a block's score is the dot product of the chunk's mean query with its
  representatives, summed over all heads; one set of `topk` blocks serves every head.
* ``maxkey``: a block's score for one KV head is the largest dot product between the
  chunk's mean query (of any query head of that group) and any key of the block; each KV
  head attends its own `topk` blocks. The paper's representatives favour tokens that
  draw attention while local (message starts, template tokens, punctuation), which are
  the same in every block, so the block that holds a fact often ranks below them
  (benchmarks/RESULTS.md, recall diagnostic); scoring every key finds the block whose
  best key matches, which is what full attention would attend. It reads every sealed key
  once per chunk (the QK work of one query against the whole history, without softmax or
  values), from an index of sealed keys kept beside the representatives.

The scores are for ranking only; the attention itself is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch

from langchain_infllm.config import RetrievalMethod

RETRIEVAL_METHODS: tuple[RetrievalMethod, ...] = get_args(RetrievalMethod)


@dataclass(frozen=True)
class Selection:
    """Blocks chosen for one chunk and layer.

    `per_head[g]` lists the block indices (ascending) KV head `g` attends; with a method
    that shares one set across heads it has a single row. `blocks` is their union
    (ascending) with each block's best score in `scores`.
    """

    per_head: list[list[int]]
    blocks: list[int]
    scores: list[float]

    @property
    def shared(self) -> bool:
        return len(self.per_head) == 1


def score_blocks(
    method: RetrievalMethod,
    mean_q: torch.Tensor,
    *,
    reprs: torch.Tensor,
    index_keys: torch.Tensor | None,
    kv_heads: int,
    block_size: int,
) -> torch.Tensor:
    """Scores `[rows, n_blocks]` of every block for the chunk's mean query `[heads, d]`.

    `rows` is 1 for ``infllm`` (summed over heads) and `kv_heads` for ``maxkey``.
    `reprs` is `[n_blocks, heads, d]`; `index_keys` is `[kv_heads, n_blocks * block_size,
    d]` (the sealed keys in position order), needed by ``maxkey``.
    """
    if method == "infllm":
        q = mean_q.to(reprs.device, torch.float32)
        return torch.einsum("nhd,hd->n", reprs.to(torch.float32), q)[None]
    if method in ("maxkey", "maxmass"):
        if index_keys is None:
            raise ValueError(f"{method} retrieval needs the index of sealed keys")
        heads, d = mean_q.shape
        groups = heads // kv_heads
        n_blocks = index_keys.shape[1] // block_size
        q = mean_q.to(index_keys.device, index_keys.dtype).view(kv_heads, groups, d)
        # keys @ q^T, not q @ keys^T: the index is a view of a larger buffer, and only
        # this orientation runs without copying it first (10x faster on CPU).
        dots = torch.bmm(index_keys, q.transpose(1, 2)).to(torch.float32)  # [kvh, tokens, g]
        if method == "maxmass":
            dots = dots - dots.logsumexp(dim=1, keepdim=True)
        return dots.amax(dim=2).view(kv_heads, n_blocks, block_size).amax(dim=2)
    raise ValueError(f"unknown retrieval method {method!r}; expected one of {RETRIEVAL_METHODS}")


def select_blocks(scores: torch.Tensor, topk: int) -> Selection:
    """The `topk` best blocks of each row of `scores [rows, n_blocks]` (one host sync)."""
    k = min(topk, scores.shape[1])
    top = scores.topk(k, dim=1)
    order = top.indices.argsort(dim=1)
    indices = top.indices.gather(1, order)
    if scores.shape[0] == 1:
        blocks, best = indices[0], top.values.gather(1, order)[0]
    else:  # union over heads, each block with its best score among the heads choosing it
        blocks = torch.unique(indices)
        chosen = torch.full_like(scores, float("-inf"))
        chosen.scatter_(1, top.indices, top.values)
        best = chosen[:, blocks].amax(dim=0)
    return Selection(per_head=indices.tolist(), blocks=blocks.tolist(), scores=best.tolist())


def needs_key_index(method: RetrievalMethod) -> bool:
    """Whether the method scores against every sealed key (so the memory keeps an index)."""
    return method in ("maxkey", "maxmass")


def needs_attention_mass(method: RetrievalMethod) -> bool:
    """Whether the method's block summaries need the attention mass each key received
    while local (the paper's representatives do; the fused attention keeps none)."""
    return method == "infllm"


def selects_per_head(method: RetrievalMethod) -> bool:
    """Whether each KV head attends its own blocks (else one set serves all heads)."""
    return method != "infllm"
