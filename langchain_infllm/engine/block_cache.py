"""Device-side cache of memory blocks whose master copy lives in host memory.

One cache per layer, owned by the engine and shared by every session: blocks carry
engine-wide ids, so a forked session reuses the blocks its parent already copied.
At most `capacity` blocks sit on the device; a block needed by the current chunk is
never evicted. On CUDA, misses are copied on a side stream so the copy overlaps the
local-window attention that runs meanwhile; `wait()` orders the gather after it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

CacheKey = Hashable
"""A block uid (the whole block, all KV heads) or `(uid, kv_head)` (one head's slice)."""


def _block_of(key: CacheKey) -> int:
    block = key[0] if isinstance(key, tuple) else key
    assert isinstance(block, int)
    return block


@dataclass
class CacheCounters:
    """Running totals; the session and the per-call stats read deltas of these."""

    hits: int = 0
    misses: int = 0
    bytes_copied: int = 0

    def snapshot(self) -> tuple[int, int, int]:
        return (self.hits, self.misses, self.bytes_copied)


class PendingFetch:
    """Blocks being made resident for one chunk; `gather()` waits for the copies."""

    def __init__(self, cache: DeviceBlockCache, slots: list[int], event: torch.cuda.Event | None):
        self._cache = cache
        self._slots = slots
        self._event = event

    def gather(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The blocks' resident K and V, `[kv_heads, block, dim]` each, in request order.

        Returned as lists so the caller concatenates them once with its other keys.
        """
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
        keys = [self._cache.slot_k[s] for s in self._slots]
        values = [self._cache.slot_v[s] for s in self._slots]
        return keys, values


class DeviceBlockCache:
    """LRU (or score-decayed `lru-s`) cache of block K/V on the compute device."""

    def __init__(
        self,
        capacity: int,
        device: torch.device,
        strategy: str = "lru",
        score_decay: float = 0.1,
        use_side_stream: bool = True,
    ) -> None:
        self.capacity = capacity
        self.device = device
        self.strategy = strategy
        self.score_decay = score_decay
        self.slot_k: list[torch.Tensor] = []
        self.slot_v: list[torch.Tensor] = []
        self._slot_of: OrderedDict[CacheKey, int] = OrderedDict()  # key -> slot, LRU order
        self._block_of_slot: dict[int, CacheKey] = {}
        self._scores: dict[CacheKey, float] = {}
        self._free: list[int] = []
        self.counters = CacheCounters()
        self._stream = (
            torch.cuda.Stream(device=device)
            if use_side_stream and device.type == "cuda"
            else None
        )

    @property
    def resident_bytes(self) -> int:
        """Device bytes allocated for cached blocks (never above the configured budget)."""
        return sum(t.numel() * t.element_size() for t in self.slot_k + self.slot_v)

    def __len__(self) -> int:
        return len(self._slot_of)

    def resident_ids(self) -> set[CacheKey]:
        """Keys of the blocks (or per-head slices) that occupy a device slot now."""
        return set(self._slot_of)

    def resident_blocks(self) -> set[int]:
        """Uids of the blocks of which anything (a whole block or a slice) is resident."""
        return {_block_of(key) for key in self._slot_of}

    def fetch(
        self,
        uids: list[CacheKey],
        host_k: list[torch.Tensor],
        host_v: list[torch.Tensor],
        weights: list[float] | None = None,
    ) -> PendingFetch:
        """Make the given blocks resident; copies start now, `gather()` returns them.

        `host_k[i]`/`host_v[i]` are the host copies of block (or slice) `uids[i]`.
        """
        if len(uids) > self.capacity:
            raise ValueError(f"{len(uids)} blocks requested but the cache holds {self.capacity}")
        needed = set(uids)
        self._decay_scores()
        slots: list[int] = []
        copies: list[tuple[int, int]] = []
        for i, uid in enumerate(uids):
            slot = self._slot_of.get(uid)
            if slot is not None:
                self.counters.hits += 1
                self._slot_of.move_to_end(uid)
            else:
                self.counters.misses += 1
                slot = self._free_slot(needed, host_k[i])
                self._slot_of[uid] = slot
                self._block_of_slot[slot] = uid
                copies.append((i, slot))
            self._scores[uid] = self._scores.get(uid, 0.0) + (weights[i] if weights else 1.0)
            slots.append(slot)
        event = self._copy(copies, host_k, host_v)
        return PendingFetch(self, slots, event)

    def _copy(
        self, copies: list[tuple[int, int]], host_k: list[torch.Tensor], host_v: list[torch.Tensor]
    ) -> torch.cuda.Event | None:
        if not copies:
            return None
        if self._stream is None:
            for i, slot in copies:
                self.slot_k[slot].copy_(host_k[i])
                self.slot_v[slot].copy_(host_v[i])
                self.counters.bytes_copied += 2 * host_k[i].numel() * host_k[i].element_size()
            return None
        # The side stream must not overwrite a slot the main stream may still be reading.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for i, slot in copies:
                self.slot_k[slot].copy_(host_k[i], non_blocking=True)
                self.slot_v[slot].copy_(host_v[i], non_blocking=True)
                self.counters.bytes_copied += 2 * host_k[i].numel() * host_k[i].element_size()
            event = torch.cuda.Event()
            event.record(self._stream)
        return event

    def _free_slot(self, needed: set[CacheKey], like: torch.Tensor) -> int:
        if self._free:
            return self._free.pop()
        if len(self.slot_k) < self.capacity:
            # Both allocated before either list grows: a failure leaves them in step.
            k = torch.empty(like.shape, dtype=like.dtype, device=self.device)
            v = torch.empty(like.shape, dtype=like.dtype, device=self.device)
            self.slot_k.append(k)
            self.slot_v.append(v)
            return len(self.slot_k) - 1
        victim = self._choose_victim(needed)
        slot = self._slot_of.pop(victim)
        self._scores.pop(victim, None)
        return slot

    def _choose_victim(self, needed: set[CacheKey]) -> CacheKey:
        candidates = [uid for uid in self._slot_of if uid not in needed]
        if not candidates:  # cannot happen while len(uids) <= capacity
            raise RuntimeError("block cache has no evictable slot")
        if self.strategy == "lru-s":
            return min(candidates, key=lambda uid: self._scores.get(uid, 0.0))
        return candidates[0]  # OrderedDict keeps least recently used first

    def _decay_scores(self) -> None:
        if self.strategy != "lru-s":
            return
        keep = 1.0 - self.score_decay
        for uid in self._scores:
            self._scores[uid] *= keep

    def score_state(self) -> dict[CacheKey, float] | None:
        """A copy of the `lru-s` scores (None for plain LRU, which keeps none)."""
        return dict(self._scores) if self.strategy == "lru-s" else None

    def restore_score_state(self, state: dict[CacheKey, float] | None) -> None:
        """Put back `score_state()` after a failed forward, for blocks still resident.

        Blocks the failed forward copied in stay resident with no score (as if never
        retrieved); blocks it evicted are not brought back, only their scores dropped.
        """
        if state is None:
            return
        self._scores = {uid: score for uid, score in state.items() if uid in self._slot_of}

    def forget(self, uids: set[int]) -> None:
        """Drop blocks that no session references any more (their slots become reusable),
        with every per-head slice of them."""
        if not uids:
            return
        for key in [key for key in self._slot_of if _block_of(key) in uids]:
            slot = self._slot_of.pop(key)
            self._block_of_slot.pop(slot, None)
            self._scores.pop(key, None)
            self._free.append(slot)
