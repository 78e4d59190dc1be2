"""Per-layer InfLLM context memory: sinks, local tail, sealed blocks and their representatives.

Token positions of one layer's stream are laid out as

    [0, n_init_len)            initial tokens (attention sinks), on the device
    [n_init + b*bs, +bs)       sealed block b: K/V in host memory, representative on device
    [tail_start, length)       the tail: remainder + local window, on the device

Keys are stored un-rotated. A token leaves the window for good once every future query
is at least `n_local` away from it; such tokens first fill the sinks, then are sealed
into blocks of `block_size`. Blocks are immutable once sealed, which is what lets a
forked session share them and lets `truncate` rebuild the tail from stored K/V.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from langchain_infllm.engine.retrieval import RetrievalMethod, needs_key_index


@dataclass(frozen=True)
class LayerShape:
    """Head layout of one attention layer (GQA: `heads` is a multiple of `kv_heads`)."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


class LayerMemory:
    """The context memory of one attention layer for one session."""

    def __init__(
        self,
        shape: LayerShape,
        *,
        n_init: int,
        block_size: int,
        repr_topk: int,
        dtype: torch.dtype,
        device: torch.device,
        host_device: torch.device,
        pin_memory: bool,
        repr_on_host: bool,
        retrieval: RetrievalMethod = "infllm",
    ) -> None:
        self.shape = shape
        self.n_init = n_init
        self.block_size = block_size
        self.repr_topk = repr_topk
        self.dtype = dtype
        self.device = device
        self.host_device = host_device
        self.pin_memory = pin_memory and device.type == "cuda"
        self.repr_device = host_device if repr_on_host else device
        self.repr_on_host = repr_on_host  # counted as host bytes even where host == device
        kvh, d = shape.kv_heads, shape.head_dim
        self.init_k = torch.empty(kvh, 0, d, dtype=dtype, device=device)
        self.init_v = torch.empty(kvh, 0, d, dtype=dtype, device=device)
        self._tail_k = torch.empty(kvh, 0, d, dtype=dtype, device=device)
        self._tail_v = torch.empty(kvh, 0, d, dtype=dtype, device=device)
        self._tail_score = torch.empty(shape.heads, 0, dtype=torch.float32, device=device)
        self._lo = 0  # first valid tail slot in the buffers
        self._hi = 0  # one past the last valid tail slot
        self.tail_start = 0  # position of the first tail token
        self.block_uids: list[int] = []
        self.block_k: list[torch.Tensor] = []  # host, [kv_heads, block, dim] each
        self.block_v: list[torch.Tensor] = []
        self.block_scores: list[torch.Tensor] = []  # host, [heads, block] attention mass
        self._reprs = torch.empty(0, shape.heads, d, dtype=dtype, device=self.repr_device)
        self.retrieval: RetrievalMethod = retrieval
        # The sealed keys again, in position order, for scorers that read every key
        # (derived from block_k: never saved, rebuilt on load and truncate).
        self._index_k: torch.Tensor | None = (
            torch.empty(kvh, 0, d, dtype=dtype, device=self.repr_device)
            if needs_key_index(retrieval) else None
        )

    # ------------------------------------------------------------------ views
    @property
    def length(self) -> int:
        return self.tail_start + (self._hi - self._lo)

    @property
    def n_blocks(self) -> int:
        return len(self.block_uids)

    @property
    def tail_k(self) -> torch.Tensor:
        return self._tail_k[:, self._lo : self._hi]

    @property
    def tail_v(self) -> torch.Tensor:
        return self._tail_v[:, self._lo : self._hi]

    @property
    def tail_score(self) -> torch.Tensor:
        return self._tail_score[:, self._lo : self._hi]

    @property
    def reprs(self) -> torch.Tensor:
        """Representative keys, `[n_blocks, heads, head_dim]`."""
        return self._reprs[: self.n_blocks]

    @property
    def index_keys(self) -> torch.Tensor | None:
        """Sealed keys `[kv_heads, n_blocks * block_size, head_dim]`, when kept."""
        if self._index_k is None:
            return None
        return self._index_k[:, : self.n_blocks * self.block_size]

    def block_span(self, index: int) -> tuple[int, int]:
        start = self.n_init + index * self.block_size
        return start, start + self.block_size

    def device_bytes(self) -> int:
        """Bytes this layer holds on the compute device (sinks, tail buffers, representatives)."""
        tensors = [self.init_k, self.init_v, self._tail_k, self._tail_v, self._tail_score]
        if not self.repr_on_host:
            tensors.extend(self._summaries())
        return sum(t.numel() * t.element_size() for t in tensors)

    def host_bytes(self) -> int:
        tensors = self.block_k + self.block_v + self.block_scores
        if self.repr_on_host:
            tensors.extend(self._summaries())
        return sum(t.numel() * t.element_size() for t in tensors)

    def _summaries(self) -> list[torch.Tensor]:
        """What retrieval scores against: representatives and the key index, if kept."""
        return [self._reprs] + ([self._index_k] if self._index_k is not None else [])

    def summary_bytes(self) -> int:
        """Bytes allocated for retrieval summaries (they grow with the context)."""
        return sum(t.numel() * t.element_size() for t in self._summaries())

    # --------------------------------------------------------------- mutation
    def append_tail(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append new un-rotated keys/values `[kv_heads, n, dim]` with zero attention mass."""
        n = k.shape[1]
        self._reserve(n)
        self._tail_k[:, self._hi : self._hi + n] = k
        self._tail_v[:, self._hi : self._hi + n] = v
        self._tail_score[:, self._hi : self._hi + n] = 0.0
        self._hi += n

    def add_tail_scores(self, start: int, mass: torch.Tensor) -> None:
        """Add attention mass `[heads, n]` to tail tokens from position `start`."""
        a = self._lo + (start - self.tail_start)
        self._tail_score[:, a : a + mass.shape[1]] += mass

    def score_checkpoint(self, start: int, n_local: int) -> tuple[int, torch.Tensor]:
        """Copy the tail scores that queries from position `start` on can still change.

        A query at `q >= start` adds mass only to keys in `(q - n_local, q]`, so of the
        tokens already held only those at `>= start - n_local + 1` can gain mass.
        Returns `(position, scores [heads, n])` for `restore_scores`.
        """
        first = max(self.tail_start, start - n_local + 1, 0)
        a = self._lo + (first - self.tail_start)
        b = self._lo + (min(start, self.length) - self.tail_start)
        return first, self._tail_score[:, a:max(a, b)].clone()

    def restore_scores(self, checkpoint: tuple[int, torch.Tensor]) -> None:
        """Put back the scores of `score_checkpoint` (the layer must hold those tokens
        in its tail again, as it does after a rollback to the checkpoint's `start`)."""
        first, scores = checkpoint
        n = scores.shape[1]
        if n == 0:
            return
        if first < self.tail_start or first + n > self.length:
            raise RuntimeError(
                f"cannot restore scores of [{first}, {first + n}): the tail holds "
                f"[{self.tail_start}, {self.length})"
            )
        a = self._lo + (first - self.tail_start)
        self._tail_score[:, a : a + n] = scores

    def _reserve(self, n: int) -> None:
        capacity = self._tail_k.shape[1]
        if self._hi + n <= capacity:
            return
        used = self._hi - self._lo
        new_capacity = max(capacity, 2 * (used + n), 64)
        kvh, d = self.shape.kv_heads, self.shape.head_dim
        new_k = torch.empty(kvh, new_capacity, d, dtype=self.dtype, device=self.device)
        new_v = torch.empty_like(new_k)
        new_s = torch.empty(
            self.shape.heads, new_capacity, dtype=torch.float32, device=self.device
        )
        new_k[:, :used] = self.tail_k
        new_v[:, :used] = self.tail_v
        new_s[:, :used] = self.tail_score
        self._tail_k, self._tail_v, self._tail_score = new_k, new_v, new_s
        self._lo, self._hi = 0, used

    def seal(self, out_of_window_end: int, next_uid: Callable[[], int]) -> None:
        """Move tokens at positions `< out_of_window_end` out of the tail.

        They fill the sinks first, then full blocks; a partial block stays in the tail as
        the remainder until enough tokens have left the window.
        """
        while True:
            available = out_of_window_end - self.tail_start
            if available <= 0:
                return
            if self.init_k.shape[1] < self.n_init:
                take = min(self.n_init - self.init_k.shape[1], available, self._hi - self._lo)
                self.init_k = torch.cat([self.init_k, self.tail_k[:, :take]], dim=1)
                self.init_v = torch.cat([self.init_v, self.tail_v[:, :take]], dim=1)
                self._advance(take)
                continue
            if available < self.block_size:
                return
            self._seal_block(next_uid())

    def _advance(self, n: int) -> None:
        self._lo += n
        self.tail_start += n

    def _seal_block(self, uid: int) -> None:
        bs = self.block_size
        keys = self.tail_k[:, :bs]
        values = self.tail_v[:, :bs]
        scores = self.tail_score[:, :bs]
        self.add_sealed_block(
            uid,
            self._to_host(keys),
            self._to_host(values),
            scores.to(self.host_device, copy=True),
            self._representative(keys, scores),
        )
        self._advance(bs)

    def add_sealed_block(
        self,
        uid: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        scores: torch.Tensor,
        representative: torch.Tensor,
    ) -> None:
        """Register a sealed block (host K/V, attention mass, representative) and index it.

        Used when sealing and when a snapshot is loaded; the caller moves the tail.
        """
        self._append_repr(representative)
        if self._index_k is not None:
            self._append_index(keys)
        self.block_uids.append(uid)
        self.block_k.append(keys)
        self.block_v.append(values)
        self.block_scores.append(scores)

    def _append_index(self, keys: torch.Tensor) -> None:
        assert self._index_k is not None
        used = self.n_blocks * self.block_size
        need = used + keys.shape[1]
        if need > self._index_k.shape[1]:
            grown = torch.empty(
                self._index_k.shape[0], max(16 * self.block_size, 2 * need), self._index_k.shape[2],
                dtype=self.dtype, device=self.repr_device,
            )
            grown[:, :used] = self._index_k[:, :used]
            self._index_k = grown
        self._index_k[:, used:need] = keys.to(self.repr_device)

    def _representative(self, keys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Per query head, the mean key of the `repr_topk` tokens that drew the most mass."""
        top = scores.topk(self.repr_topk, dim=1).indices  # [heads, r]
        per_head_keys = keys.repeat_interleave(self.shape.groups, dim=0)  # [heads, bs, d]
        index = top[:, :, None].expand(-1, -1, self.shape.head_dim)
        chosen = per_head_keys.gather(1, index).to(torch.float32)
        return chosen.mean(dim=1).to(self.dtype)  # [heads, d]

    def _append_repr(self, rep: torch.Tensor) -> None:
        n = self.n_blocks
        if n == self._reprs.shape[0]:
            grown = torch.empty(
                max(16, 2 * n), *self._reprs.shape[1:], dtype=self.dtype, device=self.repr_device
            )
            grown[:n] = self._reprs[:n]
            self._reprs = grown
        self._reprs[n] = rep.to(self.repr_device)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if self.pin_memory:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t)
            return host
        return t.to(self.host_device, copy=True).contiguous()

    def truncate(self, p: int, out_of_window_end: int) -> None:
        """Forget positions `>= p` without recomputing anything before `p`.

        Blocks still fully out of the window at `p` stay sealed (K/V and representative
        untouched); later blocks and sinks past `out_of_window_end` go back to the tail,
        rebuilt from their stored K/V, so the stored K/V of positions `< p` are unchanged.
        """
        if p > self.length:
            raise ValueError(f"cannot truncate to {p}: the layer holds {self.length} tokens")
        if p == self.length:
            return
        keep_init = min(self.init_k.shape[1], out_of_window_end)
        keep_blocks = 0
        if keep_init == self.n_init:
            keep_blocks = min(self.n_blocks, max(0, (out_of_window_end - self.n_init))
                              // self.block_size)
        new_start = keep_init + keep_blocks * self.block_size
        parts_k = [self.init_k[:, keep_init:]]
        parts_v = [self.init_v[:, keep_init:]]
        parts_s = [
            torch.zeros(self.shape.heads, self.init_k.shape[1] - keep_init, device=self.device)
        ]
        for b in range(keep_blocks, self.n_blocks):
            parts_k.append(self.block_k[b].to(self.device))
            parts_v.append(self.block_v[b].to(self.device))
            parts_s.append(self.block_scores[b].to(self.device))
        parts_k.append(self.tail_k)
        parts_v.append(self.tail_v)
        parts_s.append(self.tail_score)
        keep = p - new_start
        tail_k = torch.cat(parts_k, dim=1)[:, :keep]
        tail_v = torch.cat(parts_v, dim=1)[:, :keep]
        tail_s = torch.cat(parts_s, dim=1)[:, :keep]
        self.init_k = self.init_k[:, :keep_init].clone()
        self.init_v = self.init_v[:, :keep_init].clone()
        del self.block_uids[keep_blocks:]
        del self.block_k[keep_blocks:]
        del self.block_v[keep_blocks:]
        del self.block_scores[keep_blocks:]
        self._tail_k = tail_k.contiguous()
        self._tail_v = tail_v.contiguous()
        self._tail_score = tail_s.contiguous()
        self._lo, self._hi = 0, keep
        self.tail_start = new_start

    def clone(self) -> LayerMemory:
        """A copy that shares the immutable sealed blocks and copies everything mutable."""
        twin = LayerMemory.__new__(LayerMemory)
        twin.__dict__.update(self.__dict__)
        twin.init_k = self.init_k.clone()
        twin.init_v = self.init_v.clone()
        twin._tail_k = self.tail_k.clone()
        twin._tail_v = self.tail_v.clone()
        twin._tail_score = self.tail_score.clone()
        twin._lo, twin._hi = 0, self._hi - self._lo
        twin.block_uids = list(self.block_uids)
        twin.block_k = list(self.block_k)
        twin.block_v = list(self.block_v)
        twin.block_scores = list(self.block_scores)
        twin._reprs = self.reprs.clone()
        index = self.index_keys
        twin._index_k = None if index is None else index.clone()
        return twin
