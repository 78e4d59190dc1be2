"""Which memory blocks a chunk of queries attends: block scoring and top-k selection.

The methods, chosen by `InfLLMConfig.retrieval`:

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
* ``maxmass``: ``maxkey`` on each query's log attention mass over every sealed key.
* ``maxshare``: ``maxkey`` with each query's block maxima turned into log shares
  (log-softmax over the blocks) before the max over the group's queries. A query whose
  best key type recurs in every block (a period, "The", a header in repetitive text)
  spreads its share over all of them, while a query that singles out one block keeps
  nearly all of it, so the block that only one query head looks for is not tied with a
  thousand copies of filler. Measured (benchmarks/RESULTS.md): it finds a pass key in
  repeated sentences that ``maxkey`` lost when the prompt's last token retrieved inside
  its chunk, but ties ``maxkey`` once that token runs alone (`last_token_alone`), so it
  is an option, not the default. The softmax runs over `[rows, n_blocks]`, not over
  every key as ``maxmass`` does.

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


def chunk_queries(q_mem: torch.Tensor, method: RetrievalMethod, group: int) -> torch.Tensor:
    """The retrieval queries `[heads, m, d]` of one chunk's memory-side queries `[heads, c, d]`.

    The paper scores with the chunk's mean query (``m = 1``). With `group` > 0 the
    per-head methods average every `group` consecutive queries instead and score each
    block by its best match over those means: a chunk mixes template tokens, names and
    filler, and one mean over all of them points at none (`group` = 1 is every query).
    """
    if group <= 0 or method == "infllm" or q_mem.shape[1] <= group:
        return q_mem.mean(dim=1, keepdim=True)
    heads, c, d = q_mem.shape
    full = c // group * group
    parts = [q_mem[:, :full].reshape(heads, c // group, group, d).mean(dim=2)]
    if full < c:
        parts.append(q_mem[:, full:].mean(dim=1, keepdim=True))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def score_blocks(
    method: RetrievalMethod,
    queries: torch.Tensor,
    *,
    reprs: torch.Tensor,
    index_keys: torch.Tensor | None,
    kv_heads: int,
    block_size: int,
    neighbours: int = 0,
) -> torch.Tensor:
    """Scores `[rows, n_blocks]` of every block for the retrieval queries.

    `queries` is `[heads, d]` (one query per head) or `[heads, m, d]` (`chunk_queries`);
    `rows` is 1 for ``infllm`` (summed over heads) and `kv_heads` for ``maxkey``.
    `reprs` is `[n_blocks, heads, d]`; `index_keys` is `[kv_heads, n_blocks * block_size,
    d]` (the sealed keys in position order), needed by ``maxkey``. With `neighbours` = n a
    block scores the best of itself and the n blocks on each side, so a hit also brings
    the text around it (a value and the words that name it often straddle a boundary).
    """
    if queries.dim() == 2:
        queries = queries[:, None]
    if method == "infllm":
        q = queries.mean(dim=1).to(reprs.device, torch.float32)
        scores = torch.einsum("nhd,hd->n", reprs.to(torch.float32), q)[None]
    elif needs_key_index(method):
        if index_keys is None:
            raise ValueError(f"{method} retrieval needs the index of sealed keys")
        heads, m, d = queries.shape
        n_blocks = index_keys.shape[1] // block_size
        # Head h = g * groups + j, so the heads of KV head g and their m queries are one row.
        q = queries.to(index_keys.device, index_keys.dtype)
        q = q.reshape(kv_heads, heads // kv_heads * m, d)
        # One 2-D GEMM per KV head: the index is a view of a larger buffer (it grows in
        # place), and a batched matmul copies all of it to make it contiguous first
        # (measured on CPU: the copy cost more than the product, at every decode step
        # and layer); each head's slice is contiguous and `mm` reads it in place.
        rows = [_head_scores(method, q[g], index_keys[g], n_blocks, block_size)
                for g in range(kv_heads)]
        scores = torch.stack(rows).to(torch.float32)
    else:
        raise ValueError(
            f"unknown retrieval method {method!r}; expected one of {RETRIEVAL_METHODS}"
        )
    if neighbours > 0 and scores.shape[1] > 1:
        scores = torch.nn.functional.max_pool1d(
            scores[:, None], 2 * neighbours + 1, stride=1, padding=neighbours
        )[:, 0]
    return scores


def _head_scores(
    method: RetrievalMethod, q: torch.Tensor, keys: torch.Tensor, n_blocks: int, block_size: int
) -> torch.Tensor:
    """One KV head's block scores `[n_blocks]` from its queries `q [r, d]` and sealed keys
    `keys [n_blocks * block_size, d]`."""
    dots = torch.mm(q, keys.T)  # [r, tokens]
    if method == "maxmass":
        dots = dots.to(torch.float32)
        dots = dots - dots.logsumexp(dim=1, keepdim=True)
    if method == "maxshare":
        best = dots.view(-1, n_blocks, block_size).amax(dim=2).to(torch.float32)
        return (best - best.logsumexp(dim=1, keepdim=True)).amax(dim=0)
    # A max is exact in any dtype: the caller casts only the [n_blocks] result.
    return dots.amax(dim=0).view(n_blocks, block_size).amax(dim=1)


def top_block_ids(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """`top_blocks` without the scores (two ops: what a decode step needs)."""
    return scores.topk(min(topk, scores.shape[1]), dim=1).indices.sort(dim=1).values


def top_blocks(scores: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `topk` best blocks of each row of `scores [rows, n_blocks]`, in ascending
    block order, and their scores (`[rows, k]` each; no host sync)."""
    k = min(topk, scores.shape[1])
    top = scores.topk(k, dim=1)
    order = top.indices.argsort(dim=1)
    return top.indices.gather(1, order), top.values.gather(1, order)


def select_blocks(scores: torch.Tensor, topk: int) -> Selection:
    """The `topk` best blocks of each row of `scores [rows, n_blocks]` (one host sync)."""
    return selection_of(scores, *top_blocks(scores, topk))


def selection_of(scores: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> Selection:
    """The `Selection` of `top_blocks`' `indices` and `values` (one host sync)."""
    if scores.shape[0] == 1:
        blocks, best = indices[0], values[0]
    else:  # union over heads, each block with its best score among the heads choosing it
        blocks = torch.unique(indices)
        chosen = torch.full_like(scores, float("-inf"))
        chosen.scatter_(1, indices, values)
        best = chosen[:, blocks].amax(dim=0)
    return Selection(per_head=indices.tolist(), blocks=blocks.tolist(), scores=best.tolist())


def needs_key_index(method: RetrievalMethod) -> bool:
    """Whether the method scores against every sealed key (so the memory keeps an index)."""
    return method in ("maxkey", "maxmass", "maxshare")


def needs_attention_mass(method: RetrievalMethod) -> bool:
    """Whether the method's block summaries need the attention mass each key received
    while local (the paper's representatives do; the fused attention keeps none)."""
    return method == "infllm"


def selects_per_head(method: RetrievalMethod) -> bool:
    """Whether each KV head attends its own blocks (else one set serves all heads)."""
    return method != "infllm"
