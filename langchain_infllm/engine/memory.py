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
from langchain_infllm.engine.rope import RotaryTable


@dataclass(frozen=True)
class LayerShape:
    """Head layout of one attention layer (GQA: `heads` is a multiple of `kv_heads`)."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


# Every field a mutation may replace (see `LayerMemory.checkpoint`).
_STATE_FIELDS = (
    "init_k", "init_v", "_tail_k", "_tail_v", "_tail_score", "_lo", "_hi", "tail_start",
    "block_uids", "block_k", "block_v", "block_scores", "_reprs", "_index_k", "_index_v",
    "_store_owned",
)


@dataclass
class _RotatedWindow:
    """The tail's keys rotated at `position - base`, slot for slot beside the tail buffer.

    Derived state (never saved, never checkpointed): valid only while `source` is still
    the tail buffer, the slot of position p is still `p + offset`, and the layer still
    holds exactly the keys up to `end`; every `LayerMemory._commit` drops it.
    """

    source: torch.Tensor  # the `_tail_k` buffer these keys were rotated from
    keys: torch.Tensor  # same shape as `source`
    base: int  # position rotated by angle 0 (the tail start when built)
    offset: int  # slot of position p is p + offset
    first: int  # positions [first, end) are rotated
    end: int


@dataclass(frozen=True)
class LayerCheckpoint:
    """A layer's state before a forward (see `LayerMemory.checkpoint`)."""

    fields: dict[str, object]
    n_blocks: int
    scores: tuple[int, torch.Tensor]


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
        # Where the host is the compute device (CPU) the key index doubles as the block
        # store: `block_k[b]` / `block_v[b]` are views of `_index_k` / `_index_v`, so the
        # keys are held once and the retrieved blocks of every KV head are gathered with
        # one indexing op (`gather_blocks`). A store shared with a fork is never written
        # in place (`_store_owned` false): the next seal copies it first.
        self._index_v: torch.Tensor | None = (
            torch.empty(kvh, 0, d, dtype=dtype, device=host_device)
            if self._index_k is not None and device == host_device == self.repr_device
            else None
        )
        self._store_owned = True
        self._rot: _RotatedWindow | None = None

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

    @property
    def index_values(self) -> torch.Tensor | None:
        """Sealed values `[kv_heads, n_blocks * block_size, head_dim]`, where the block
        store is contiguous (host == device, a method with a key index)."""
        if self._index_v is None:
            return None
        return self._index_v[:, : self.n_blocks * self.block_size]

    def gather_blocks(self, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V `[kv_heads, k * block_size, head_dim]` of blocks `chosen [kv_heads, k]`
        (each KV head its own blocks, in the given order), straight from the contiguous
        store: a few tensor ops whatever `k`, no per-block Python."""
        keys, values = self._index_k, self._index_v
        if keys is None or values is None or not self.n_blocks:
            raise RuntimeError("gather_blocks needs the contiguous block store")
        # The whole store as rows of one block of one head (its capacity is a multiple
        # of the block size): index_select is ~3x cheaper than advanced indexing here.
        kvh, capacity, d = keys.shape
        bs = self.block_size
        per_head = capacity // bs
        rows = (chosen + torch.arange(kvh, device=chosen.device)[:, None] * per_head).view(-1)
        k = keys.view(kvh * per_head, bs, d).index_select(0, rows).view(kvh, -1, d)
        v = values.view(kvh * per_head, bs, d).index_select(0, rows).view(kvh, -1, d)
        return k, v

    def rotated_window(
        self, rope: RotaryTable, start: int, local_lo: int, end: int
    ) -> tuple[torch.Tensor, int]:
        """The tail keys at positions `[local_lo, end)` rotated at `position - base`, and
        `base` (the caller rotates its queries against the same base).

        `base` is the tail start, which moves only when tokens are sealed (every
        `block_size` tokens once the sinks are full), so a decoded token rotates only its
        own key; the whole window is rotated again when the base moves or the tail was
        rebuilt (truncate, rollback, load, fork). The rotated keys depend on the positions
        alone, never on the history of calls, so a session gives the same results as a
        fresh one fed the same tokens in the same calls. Angles stay below
        `n_local + block_size + chunk`, inside the rotary table.
        """
        base = self.tail_start
        offset = self._lo - base
        a, b = local_lo + offset, end + offset
        if end - base > rope.size:  # a layout the engine never makes; stay correct anyway
            return rope.rotate(self._tail_k[:, a:b], 0), local_lo
        rot = self._rot
        if (
            rot is not None and rot.source is self._tail_k and rot.offset == offset
            and rot.base == base and rot.first <= local_lo and rot.end == start
        ):
            s = start + offset
            rope.rotate(self._tail_k[:, s:b], start - base, out=rot.keys[:, s:b])
            rot.end = end
            return rot.keys[:, a:b], base
        keys = torch.empty_like(self._tail_k)
        rope.rotate(self._tail_k[:, a:b], local_lo - base, out=keys[:, a:b])
        self._rot = _RotatedWindow(self._tail_k, keys, base, offset, local_lo, end)
        return keys[:, a:b], base

    def block_span(self, index: int) -> tuple[int, int]:
        start = self.n_init + index * self.block_size
        return start, start + self.block_size

    def device_bytes(self) -> int:
        """Bytes this layer holds on the compute device (sinks, tail buffers, representatives)."""
        tensors = [self.init_k, self.init_v, self._tail_k, self._tail_v, self._tail_score]
        if self._rot is not None:
            tensors.append(self._rot.keys)
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
        self._commit({"_tail_k": new_k, "_tail_v": new_v, "_tail_score": new_s,
                      "_lo": 0, "_hi": used})

    def seal(self, out_of_window_end: int, next_uid: Callable[[], int]) -> None:
        """Move tokens at positions `< out_of_window_end` out of the tail.

        They fill the sinks first, then full blocks; a partial block stays in the tail as
        the remainder until enough tokens have left the window.

        All or nothing: every copy and allocation (the grown sinks, the host K/V, the
        representatives, the grown summary buffers) is made before any field changes, so
        an error or KeyboardInterrupt while sealing leaves the layer exactly as it was.
        """
        available = out_of_window_end - self.tail_start
        if available <= 0:
            return
        held = self._hi - self._lo
        sinks = self.init_k.shape[1]
        take = min(self.n_init - sinks, available, held) if sinks < self.n_init else 0
        n_new = (available - take) // self.block_size if sinks + take >= self.n_init else 0
        if take == 0 and n_new == 0:
            return
        fields: dict[str, object] = {}
        if take:
            fields["init_k"] = torch.cat([self.init_k, self.tail_k[:, :take]], dim=1)
            fields["init_v"] = torch.cat([self.init_v, self.tail_v[:, :take]], dim=1)
        if n_new:
            bs = self.block_size
            blocks = []
            for j in range(n_new):
                a = take + j * bs
                keys = self.tail_k[:, a : a + bs]
                values = self.tail_v[:, a : a + bs]
                scores = self.tail_score[:, a : a + bs]
                # With a contiguous store the block is copied there once, by _sealed_fields.
                blocks.append((
                    next_uid(),
                    keys if self._index_v is not None else self._to_host(keys),
                    values if self._index_v is not None else self._to_host(values),
                    scores.to(self.host_device, copy=True),
                    self._representative(keys, scores),
                ))
            fields.update(self._sealed_fields(blocks))
        moved = take + n_new * self.block_size
        fields["_lo"] = self._lo + moved
        fields["tail_start"] = self.tail_start + moved
        self._commit(fields)

    def _commit(self, fields: dict[str, object]) -> None:
        """Replace these fields in one step (a single C call: no KeyboardInterrupt can land
        between two of them). Callers prepare every value first; this cannot fail.

        Every mutation but appending comes through here, so this also drops the derived
        rotated window (`rotated_window` rebuilds it on next use)."""
        self.__dict__.update(fields, _rot=None)

    def _sealed_fields(
        self, blocks: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> dict[str, object]:
        """The fields that register `blocks` (uid, host K, host V, scores, representative),
        prepared without changing any: summary buffers are grown into new tensors, or
        written only past the blocks held now (slots no view of this layer shows)."""
        n = self.n_blocks
        reprs = self._reprs
        for i, (_, _, _, _, rep) in enumerate(blocks):
            reprs = self._append_repr(reprs, n + i, rep)
        fields: dict[str, object] = {"_reprs": reprs}
        fields["block_uids"] = self.block_uids + [b[0] for b in blocks]
        fields["block_scores"] = self.block_scores + [b[3] for b in blocks]
        if self._index_v is not None:
            fields.update(self._stored_blocks([(b[1], b[2]) for b in blocks]))
            return fields
        if self._index_k is not None:
            index = self._index_k
            for i, (_, keys, _, _, _) in enumerate(blocks):
                index = self._append_index(index, (n + i) * self.block_size, keys)
            fields["_index_k"] = index
        fields["block_k"] = self.block_k + [b[1] for b in blocks]
        fields["block_v"] = self.block_v + [b[2] for b in blocks]
        return fields

    def _stored_blocks(self, blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, object]:
        """The store fields with `blocks` (K, V) appended, prepared without changing any.

        Written in place past the blocks held now when this layer owns the store and it
        has room; else copied into a new store first, and the held blocks' views moved
        to it (so the old store is freed once no fork shares it).
        """
        keys_store, values_store = self._index_k, self._index_v
        assert keys_store is not None and values_store is not None
        bs, n = self.block_size, self.n_blocks
        used, need = n * bs, (n + len(blocks)) * bs
        block_k, block_v = list(self.block_k), list(self.block_v)
        owned = self._store_owned
        if not owned or need > keys_store.shape[1]:
            capacity = max(16 * bs, 2 * need)
            kvh, _, d = keys_store.shape
            grown_k = torch.empty(kvh, capacity, d, dtype=self.dtype, device=self.host_device)
            grown_v = torch.empty_like(grown_k)
            grown_k[:, :used] = keys_store[:, :used]
            grown_v[:, :used] = values_store[:, :used]
            keys_store, values_store = grown_k, grown_v
            block_k = [grown_k[:, i * bs : (i + 1) * bs] for i in range(n)]
            block_v = [grown_v[:, i * bs : (i + 1) * bs] for i in range(n)]
        for i, (k, v) in enumerate(blocks):
            a = used + i * bs
            keys_store[:, a : a + bs] = k
            values_store[:, a : a + bs] = v
            block_k.append(keys_store[:, a : a + bs])
            block_v.append(values_store[:, a : a + bs])
        return {"_index_k": keys_store, "_index_v": values_store, "_store_owned": True,
                "block_k": block_k, "block_v": block_v}

    def add_sealed_block(
        self,
        uid: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        scores: torch.Tensor,
        representative: torch.Tensor,
    ) -> None:
        """Register a sealed block (host K/V, attention mass, representative) and index it.

        Used when a snapshot is loaded; the caller moves the tail. All or nothing.
        """
        self._commit(self._sealed_fields([(uid, keys, values, scores, representative)]))

    def _append_index(self, index: torch.Tensor, used: int, keys: torch.Tensor) -> torch.Tensor:
        """`index` with `keys` written at `[used, used + n)`: grown into a new tensor when
        too small, else written in place past `used` (where no view reaches)."""
        need = used + keys.shape[1]
        if need > index.shape[1]:
            grown = torch.empty(
                index.shape[0], max(16 * self.block_size, 2 * need), index.shape[2],
                dtype=self.dtype, device=self.repr_device,
            )
            grown[:, :used] = index[:, :used]
            index = grown
        index[:, used:need] = keys.to(self.repr_device)
        return index

    def _representative(self, keys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Per query head, the mean key of the `repr_topk` tokens that drew the most mass."""
        top = scores.topk(self.repr_topk, dim=1).indices  # [heads, r]
        per_head_keys = keys.repeat_interleave(self.shape.groups, dim=0)  # [heads, bs, d]
        index = top[:, :, None].expand(-1, -1, self.shape.head_dim)
        chosen = per_head_keys.gather(1, index).to(torch.float32)
        return chosen.mean(dim=1).to(self.dtype)  # [heads, d]

    def _append_repr(self, reprs: torch.Tensor, n: int, rep: torch.Tensor) -> torch.Tensor:
        """`reprs` with `rep` in slot `n` (grown into a new tensor when full)."""
        if n == reprs.shape[0]:
            grown = torch.empty(
                max(16, 2 * n), *reprs.shape[1:], dtype=self.dtype, device=self.repr_device
            )
            grown[:n] = reprs[:n]
            reprs = grown
        reprs[n] = rep.to(self.repr_device)
        return reprs

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
        All or nothing (see `plan_truncate`).
        """
        self._commit(self.plan_truncate(p, out_of_window_end))

    def plan_truncate(self, p: int, out_of_window_end: int) -> dict[str, object]:
        """The fields `truncate(p, out_of_window_end)` sets, computed without changing any.

        Everything that can fail (device copies of unsealed blocks, the new tail) happens
        here; committing the result with `commit` is plain assignment. Only positions
        `< p` are moved back to the device.
        """
        if p > self.length:
            raise ValueError(f"cannot truncate to {p}: the layer holds {self.length} tokens")
        if p == self.length:
            return {}
        sinks = self.init_k.shape[1]
        keep_init = min(sinks, out_of_window_end)
        keep_blocks = 0
        if keep_init == self.n_init:
            keep_blocks = min(self.n_blocks, max(0, (out_of_window_end - self.n_init))
                              // self.block_size)
        new_start = keep_init + keep_blocks * self.block_size
        keep = p - new_start
        parts_k: list[torch.Tensor] = []
        parts_v: list[torch.Tensor] = []
        parts_s: list[torch.Tensor] = []

        def take(first: int, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor | None) -> None:
            n = min(k.shape[1], p - first)
            if n <= 0:
                return
            parts_k.append(k[:, :n].to(self.device))
            parts_v.append(v[:, :n].to(self.device))
            parts_s.append(
                torch.zeros(self.shape.heads, n, device=self.device) if s is None
                else s[:, :n].to(self.device)
            )

        take(keep_init, self.init_k[:, keep_init:], self.init_v[:, keep_init:], None)
        for b in range(keep_blocks, self.n_blocks):
            take(self.block_span(b)[0], self.block_k[b], self.block_v[b], self.block_scores[b])
        take(self.tail_start, self.tail_k, self.tail_v, self.tail_score)
        kvh, d = self.shape.kv_heads, self.shape.head_dim
        if not parts_k:
            parts_k.append(torch.empty(kvh, 0, d, dtype=self.dtype, device=self.device))
            parts_v.append(torch.empty(kvh, 0, d, dtype=self.dtype, device=self.device))
            parts_s.append(torch.empty(self.shape.heads, 0, device=self.device))
        tail_k = torch.cat(parts_k, dim=1)
        tail_v = torch.cat(parts_v, dim=1)
        tail_s = torch.cat(parts_s, dim=1)
        if tail_k.shape[1] != keep:
            raise RuntimeError(f"truncate rebuilt {tail_k.shape[1]} tail tokens, expected {keep}")
        fields: dict[str, object] = {}
        if self._index_v is not None and keep_blocks == 0:
            # No block left: let the store go (a view-less store would hold its K/V).
            fields.update(
                _index_k=torch.empty(kvh, 0, d, dtype=self.dtype, device=self.host_device),
                _index_v=torch.empty(kvh, 0, d, dtype=self.dtype, device=self.host_device),
                _store_owned=True,
            )
        return fields | {
            "init_k": self.init_k[:, :keep_init].clone(),
            "init_v": self.init_v[:, :keep_init].clone(),
            "block_uids": self.block_uids[:keep_blocks],
            "block_k": self.block_k[:keep_blocks],
            "block_v": self.block_v[:keep_blocks],
            "block_scores": self.block_scores[:keep_blocks],
            "_tail_k": tail_k,
            "_tail_v": tail_v,
            "_tail_score": tail_s,
            "_lo": 0,
            "_hi": keep,
            "tail_start": new_start,
        }

    def commit(self, fields: dict[str, object]) -> None:
        """Apply what `plan_truncate` prepared (cannot fail)."""
        self._commit(fields)

    # ----------------------------------------------------------- checkpoints
    def checkpoint(self, start: int, n_local: int) -> LayerCheckpoint:
        """What `rollback` needs to put this layer back as it is now, taken before a
        forward from position `start` (= `length`). Costs a copy of the window's scores.

        A forward only replaces fields (grown buffers, new sinks, new block lists), writes
        past the held tokens, or adds attention mass to the last `n_local` tokens; so the
        current field values plus those scores are the whole state.
        """
        return LayerCheckpoint(
            fields={k: self.__dict__[k] for k in _STATE_FIELDS},
            n_blocks=self.n_blocks,
            scores=self.score_checkpoint(start, n_local),
        )

    def rollback(self, checkpoint: LayerCheckpoint) -> list[int]:
        """Put the layer back as it was at `checkpoint` (assignments and one in-place copy
        into memory that is already allocated). Returns the uids of the blocks sealed since."""
        sealed = self.block_uids[checkpoint.n_blocks :]
        # The block lists are never changed in place (sealing and truncating build new
        # ones), so the lists held are exactly the blocks of then.
        self._commit(checkpoint.fields)
        self.restore_scores(checkpoint.scores)
        return sealed

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
        twin._rot = None
        if self._index_v is not None:
            # Both share the store (the blocks are views of it); neither writes it again.
            self._store_owned = twin._store_owned = False
            return twin
        index = self.index_keys
        twin._index_k = None if index is None else index.clone()
        return twin
