"""Plain records the engine reports: per-retrieval traces and per-call results.

They are dataclasses of Python scalars and tuples (logits excepted) so any layer above
(LangChain callbacks, JSON reports) can serialise them without touching torch state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class RetrievalRecord:
    """Blocks one layer attended for one execution chunk of queries `[query_start, query_end)`."""

    layer: int
    query_start: int
    query_end: int
    block_ids: tuple[int, ...]  # session-local block indices, ascending (union over heads)
    scores: tuple[float, ...]  # representative score of each selected block
    block_spans: tuple[tuple[int, int], ...]  # token positions [start, end) of each block
    hits: int  # selected blocks already on the device
    misses: int  # selected blocks copied from host memory
    bytes_copied: int
    head_block_ids: tuple[tuple[int, ...], ...] | None = None
    """Per KV head, the blocks that head attended (methods that select per head);
    None when every head attended `block_ids` (otherwise their union)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepResult:
    """What one `append` / `sync` did."""

    logits: torch.Tensor | None  # next-token logits after the last token, 1-D
    computed_tokens: int
    reused_tokens: int = 0
    seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    bytes_copied: int = 0
    retrievals: list[RetrievalRecord] = field(default_factory=list)
