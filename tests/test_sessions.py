"""Sessions (DESIGN.md sections 4 and 8): each protection has a test that fails without it.

* only new tokens go through the model (counted by a hook on the model, not by the engine);
* `sync` after a divergence and `truncate` rebuild the memory from stored K/V, exactly;
* `fork` shares sealed blocks and nothing mutable;
* snapshots round-trip bit for bit, and anything damaged or foreign is refused cleanly;
* the session store spills and reloads without loss;
* threads, closed streams, exceptions, KeyboardInterrupt and OOM never leave a session
  whose token list disagrees with its memory.

Everything runs on tiny random fp32 models with `topk` above the number of blocks, so
the dense oracle (`tests/dense_oracle.py`) is the reference whatever the chunking.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from langchain_infllm import InfLLMConfig, InfLLMEngine
from langchain_infllm.engine import (
    ContextLimitError,
    EngineOutOfMemoryError,
    Session,
    SessionFileError,
    persistence,
)
from langchain_infllm.engine import session as session_module
from tests.dense_oracle import dense_oracle_logits
from tests.tiny_models import tiny_pair

ATOL = 1e-4
VOCAB = 97
N_LOCAL, BLOCK, N_INIT = 16, 4, 2
SETTINGS: dict[str, Any] = dict(
    n_local=N_LOCAL,
    block_size=BLOCK,
    n_init=N_INIT,
    topk=64,  # above the number of blocks of every test: everything is retrieved
    max_cached_block=64,
    repr_topk=2,
    exc_block_size=5,
    chunk_size=11,
)
TIMEOUT = 60.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- helpers
def make_engine(
    arch: str = "llama", seed: int = 0, **overrides: Any
) -> tuple[InfLLMEngine, nn.Module]:
    model, reference = tiny_pair(arch, seed=seed)
    spill_dir = overrides.pop("spill_dir", None)
    engine = InfLLMEngine(
        model, None, InfLLMConfig(**{**SETTINGS, **overrides}), spill_dir=spill_dir
    )
    return engine, reference


def oracle(reference: nn.Module, ids: list[int]) -> torch.Tensor:
    """Dense-oracle logits at every position of `ids` (vanilla while it fits the window)."""
    if len(ids) <= N_LOCAL:  # the oracle needs a rotary table past n_local
        with torch.no_grad():
            return reference(torch.tensor([ids])).logits[0]
    return dense_oracle_logits(reference, ids, n_local=N_LOCAL, n_init=N_INIT, block_size=BLOCK)


def rand_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def pieces(rng: random.Random, total: int, high: int = 23) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(min(rng.randint(1, high), total - sum(sizes)))
    return sizes


def feed(session: Session, ids: list[int], rng: random.Random | None = None) -> None:
    """Append `ids` in random pieces (or all at once without `rng`)."""
    if rng is None:
        session.append(ids)
        return
    pos = 0
    for size in pieces(rng, len(ids)):
        session.append(ids[pos : pos + size])
        pos += size


def fresh_logits(engine: InfLLMEngine, ids: list[int]) -> torch.Tensor:
    session = engine.new_session()
    out = session.append(ids)
    assert out.logits is not None
    return out.logits


def lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class TokenCounter:
    """Counts the tokens that enter the model, independently of the engine's bookkeeping."""

    def __init__(self, engine: InfLLMEngine) -> None:
        self.calls: list[int] = []
        self.exc_sizes: list[int] = []
        self._handle = engine.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.calls.append(int(ids.shape[1]))
        ctx = kwargs.get("infllm_context")
        if ctx is not None:
            self.exc_sizes.append(int(ctx.exc_block_size))

    def take(self) -> int:
        total = sum(self.calls)
        self.calls.clear()
        return total

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def counter_factory() -> Iterator[Callable[[InfLLMEngine], TokenCounter]]:
    made: list[TokenCounter] = []

    def make(engine: InfLLMEngine) -> TokenCounter:
        made.append(TokenCounter(engine))
        return made[-1]

    yield make
    for c in made:
        c.close()


def layer_kv(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's full K/V by position: sinks, sealed blocks (host), then the tail."""
    keys = [layer.init_k, *(b.to(layer.device) for b in layer.block_k), layer.tail_k]
    values = [layer.init_v, *(b.to(layer.device) for b in layer.block_v), layer.tail_v]
    k, v = torch.cat(keys, dim=1), torch.cat(values, dim=1)
    assert k.shape[1] == v.shape[1] == layer.length
    return k.clone(), v.clone()


def state(session: Session) -> dict[str, Any]:
    """Everything that determines what a session computes next, copied."""
    return {
        "tokens": session.token_ids,
        "kv": [layer_kv(layer) for layer in session.layers],
        "scores": [
            torch.cat([*layer.block_scores, layer.tail_score], dim=1).clone()
            for layer in session.layers
        ],
        "reprs": [layer.reprs.clone() for layer in session.layers],
        "layout": [
            (layer.init_k.shape[1], layer.n_blocks, layer.tail_start) for layer in session.layers
        ],
        "logits": None if session.last_logits is None else session.last_logits.clone(),
    }


def assert_same_state(a: dict[str, Any], b: dict[str, Any], scores: bool = True) -> None:
    assert a["tokens"] == b["tokens"]
    assert a["layout"] == b["layout"]
    for (ka, va), (kb, vb) in zip(a["kv"], b["kv"], strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    if scores:
        for sa, sb in zip(a["scores"], b["scores"], strict=True):
            torch.testing.assert_close(sa, sb, atol=1e-5, rtol=0)
        for ra, rb in zip(a["reprs"], b["reprs"], strict=True):
            torch.testing.assert_close(ra, rb, atol=1e-5, rtol=0)
    if a["logits"] is None or b["logits"] is None:
        assert a["logits"] is None and b["logits"] is None
    else:
        assert torch.equal(a["logits"], b["logits"])


def assert_consistent(session: Session) -> None:
    """The session invariant: every layer holds exactly the consumed tokens."""
    for i, layer in enumerate(session.layers):
        assert layer.length == len(session), f"layer {i}: {layer.length} != {len(session)}"
        assert layer.tail_k.shape[1] == layer.tail_v.shape[1] == layer.tail_score.shape[1]
        assert layer.reprs.shape[0] == layer.n_blocks == len(layer.block_k)


def expected_layout(length: int) -> tuple[int, int, int]:
    """(sinks, blocks, tail_start) of a session that consumed `length` tokens."""
    out_of_window = max(0, length - N_LOCAL + 1)
    sinks = min(N_INIT, out_of_window)
    blocks = (out_of_window - N_INIT) // BLOCK if out_of_window >= N_INIT else 0
    return sinks, blocks, sinks + blocks * BLOCK


# ------------------------------------------------- 1. only new tokens are computed
@pytest.mark.parametrize(("arch", "seed"), [("llama", 0), ("qwen3", 1)])
def test_only_new_tokens_are_computed(
    arch: str, seed: int, counter_factory: Callable[[InfLLMEngine], TokenCounter]
) -> None:
    engine, reference = make_engine(arch, seed)
    counter = counter_factory(engine)
    rng = random.Random(seed)
    session = engine.new_session()
    held: list[int] = []
    kinds_seen = set()
    for step in range(20):
        kind = rng.choice(["append", "extend", "diverge", "prefix", "same"])
        if len(held) > 120 and kind in ("append", "extend"):
            kind = "diverge"
        if not held:
            kind = "append"
        before_total = engine.tokens_computed
        if kind == "append":
            new = rand_ids(rng, rng.randint(1, 30))
            result = session.append(new)
            want_computed, want_reused, held = len(new), 0, held + new
        else:
            if kind == "extend":
                prompt = held + rand_ids(rng, rng.randint(1, 30))
            elif kind == "diverge":
                cut = rng.randrange(len(held))
                other = rng.choice([t for t in range(VOCAB) if t != held[cut]])
                prompt = [*held[:cut], other, *rand_ids(rng, rng.randint(0, 25))]
            elif kind == "prefix":
                prompt = held[: rng.randint(1, len(held))]
            else:
                prompt = list(held)
            common = lcp(held, prompt)
            if prompt == held:
                want_computed, want_reused = 0, len(held)
            elif common == len(prompt):  # a strict prefix: recompute the last token's logits
                want_computed, want_reused = 1, len(prompt) - 1
            else:
                want_computed, want_reused = len(prompt) - common, common
            result = session.sync(prompt)
            held = prompt
        kinds_seen.add(kind)
        computed = counter.take()
        assert computed == want_computed, f"step {step} ({kind})"
        assert result.computed_tokens == want_computed
        assert result.reused_tokens == want_reused
        assert engine.tokens_computed - before_total == want_computed
        assert session.token_ids == held
        assert_consistent(session)
        assert result.logits is not None
        expected = oracle(reference, held)[-1]
        torch.testing.assert_close(result.logits, expected, atol=ATOL, rtol=0)
    assert session.n_blocks > 0
    assert {"append", "diverge", "prefix"} <= kinds_seen


# ------------------------------------------------------ 2. sync after a divergence
DIVERGENCE = ["start", "sink", "block", "block_edge", "remainder", "window", "prefix", "end"]


def _divergence_point(where: str, rng: random.Random, length: int) -> int:
    _, blocks, tail_start = expected_layout(length)
    assert blocks >= 3
    if where == "start":
        return 0
    if where == "sink":
        return 1
    if where == "block":
        b = rng.randrange(blocks - 1)
        return N_INIT + b * BLOCK + rng.randint(1, BLOCK - 1)
    if where == "block_edge":
        return N_INIT + rng.randrange(1, blocks) * BLOCK
    if where == "remainder":  # out of the window, not yet sealed
        lo, hi = tail_start, length - N_LOCAL
        assert lo < hi
        return rng.randint(lo + 1, hi)
    if where == "window":
        return rng.randint(length - N_LOCAL + 1, length - 1)
    if where == "prefix":
        return rng.randint(N_INIT + BLOCK, length - 1)
    return length


@pytest.mark.parametrize("where", DIVERGENCE)
@pytest.mark.parametrize(("arch", "seed"), [("llama", 2), ("qwen2", 3)])
def test_sync_after_divergence_matches_fresh_and_oracle(
    where: str, arch: str, seed: int, counter_factory: Callable[[InfLLMEngine], TokenCounter]
) -> None:
    engine, reference = make_engine(arch, seed)
    rng = random.Random(f"{where}{seed}")
    # 123 tokens: 26 blocks sealed, a 2-token remainder out of the window.
    history = rand_ids(rng, 123)
    session = engine.new_session()
    feed(session, history, rng)
    p = _divergence_point(where, rng, len(history))
    if where == "prefix":
        prompt = history[:p]
        want_computed = 1
    else:
        avoid = history[p] if p < len(history) else -1
        first = rng.choice([t for t in range(VOCAB) if t != avoid])
        prompt = [*history[:p], first, *rand_ids(rng, rng.randint(0, 24))]
        want_computed = len(prompt) - p
    counter = counter_factory(engine)
    result = session.sync(prompt)
    assert counter.take() == want_computed == result.computed_tokens
    assert result.reused_tokens == len(prompt) - want_computed
    assert session.token_ids == prompt
    assert_consistent(session)
    assert result.logits is not None
    expected = oracle(reference, prompt)
    torch.testing.assert_close(result.logits, fresh_logits(engine, prompt), atol=ATOL, rtol=0)
    torch.testing.assert_close(result.logits, expected[-1], atol=ATOL, rtol=0)
    # The rebuilt memory keeps working: continue past another window and compare again.
    more = rand_ids(rng, 37)
    feed(session, more, rng)
    torch.testing.assert_close(
        session.last_logits, oracle(reference, prompt + more)[-1], atol=ATOL, rtol=0
    )
    assert [layer.n_blocks for layer in session.layers] == [
        expected_layout(len(prompt + more))[1]
    ] * engine.num_layers


# --------------------------------------------------------------- 3. truncate is exact
TRUNCATE_AT = ["zero", "sink", "sink_full", "block", "block_edge", "remainder", "window", "last"]


def _truncate_point(where: str, rng: random.Random, length: int) -> int:
    _, blocks, tail_start = expected_layout(length)
    return {
        "zero": 0,
        "sink": 1,
        "sink_full": N_INIT,
        "block": N_INIT + rng.randrange(blocks) * BLOCK + rng.randint(1, BLOCK - 1),
        "block_edge": N_INIT + rng.randrange(1, blocks) * BLOCK,
        "remainder": rng.randint(tail_start + 1, length - N_LOCAL),
        "window": rng.randint(length - N_LOCAL + 1, length - 1),
        "last": length - 1,
    }[where]


@pytest.mark.parametrize("where", TRUNCATE_AT)
def test_truncate_keeps_prefix_kv_byte_identical(
    where: str, counter_factory: Callable[[InfLLMEngine], TokenCounter]
) -> None:
    engine, reference = make_engine("qwen3", seed=4)
    rng = random.Random(where)
    history = rand_ids(rng, 131)
    session = engine.new_session()
    feed(session, history, rng)
    p = _truncate_point(where, rng, len(history))
    before = [layer_kv(layer) for layer in session.layers]
    counter = counter_factory(engine)
    session.truncate(p)
    assert counter.take() == 0, "truncate must not run the model"
    assert session.token_ids == history[:p]
    assert session.last_logits is None
    assert_consistent(session)
    for layer, (k, v) in zip(session.layers, before, strict=True):
        k2, v2 = layer_kv(layer)
        assert torch.equal(k2, k[:, :p]) and torch.equal(v2, v[:, :p])
        # The same layout a session that only ever saw p tokens would have.
        assert (layer.init_k.shape[1], layer.n_blocks, layer.tail_start) == expected_layout(p)
    # Continuing from the truncated memory is the same as never having seen the rest.
    more = rand_ids(rng, 40)
    feed(session, more, rng)
    assert counter.take() == 40
    torch.testing.assert_close(
        session.last_logits, oracle(reference, history[:p] + more)[-1], atol=ATOL, rtol=0
    )


def test_truncate_rejects_out_of_range_and_keeps_state() -> None:
    engine, _ = make_engine()
    rng = random.Random(5)
    session = engine.new_session()
    feed(session, rand_ids(rng, 60), rng)
    snap = state(session)
    for bad in (-1, 61, 1000):
        with pytest.raises(ValueError, match="truncate"):
            session.truncate(bad)
    session.truncate(60)  # no-op
    assert_same_state(state(session), snap)


# ----------------------------------------------------------------------- 4. fork
def test_fork_shares_sealed_blocks_and_nothing_mutable() -> None:
    engine, _ = make_engine(seed=6)
    rng = random.Random(6)
    parent = engine.new_session()
    feed(parent, rand_ids(rng, 90), rng)
    twin = parent.fork()
    assert twin.session_id != parent.session_id
    assert twin.token_ids == parent.token_ids
    assert twin._tokens is not parent._tokens
    assert twin.last_logits is not None and parent.last_logits is not None
    assert torch.equal(twin.last_logits, parent.last_logits)
    assert twin.last_logits.data_ptr() != parent.last_logits.data_ptr()
    for a, b in zip(parent.layers, twin.layers, strict=True):
        assert a.n_blocks == b.n_blocks > 0
        for name in ("block_k", "block_v", "block_scores"):
            assert all(x is y for x, y in zip(getattr(a, name), getattr(b, name), strict=True))
            assert getattr(a, name) is not getattr(b, name)  # the lists themselves are not
        assert a.block_uids == b.block_uids and a.block_uids is not b.block_uids
        for name in ("init_k", "init_v", "tail_k", "tail_v", "tail_score", "reprs"):
            x, y = getattr(a, name), getattr(b, name)
            assert torch.equal(x, y)
            if x.numel():
                assert x.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()


@pytest.mark.parametrize("seed", [7, 8])
def test_fork_is_independent(seed: int) -> None:
    engine, reference = make_engine("mistral", seed=seed)
    rng = random.Random(seed)
    history = rand_ids(rng, 83)
    parent = engine.new_session()
    feed(parent, history, rng)
    frozen = state(parent)
    twin = parent.fork()
    # The fork seals new blocks, truncates into the shared ones and re-seals: the parent
    # (and its shared blocks) must not see any of it.
    fork_tail = rand_ids(rng, 45)
    feed(twin, fork_tail, rng)
    assert_same_state(state(parent), frozen)
    twin.sync(history[:37] + fork_tail)
    assert_same_state(state(parent), frozen)
    torch.testing.assert_close(
        twin.last_logits, oracle(reference, history[:37] + fork_tail)[-1], atol=ATOL, rtol=0
    )
    # The parent goes its own way; the fork is not affected either.
    fork_state = state(twin)
    parent_tail = rand_ids(rng, 29)
    feed(parent, parent_tail, rng)
    assert_same_state(state(twin), fork_state)
    for s, ids in ((parent, history + parent_tail), (twin, history[:37] + fork_tail)):
        assert s.token_ids == ids
        assert_consistent(s)
        torch.testing.assert_close(s.last_logits, fresh_logits(engine, ids), atol=ATOL, rtol=0)
        torch.testing.assert_close(s.last_logits, oracle(reference, ids)[-1], atol=ATOL, rtol=0)


# -------------------------------------------------------------- 5. save / load
def _continuation(session: Session, extra: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Logits after appending `extra`, then 6 greedy tokens."""
    out = session.append(extra)
    assert out.logits is not None
    logits = out.logits.clone()
    return logits, list(session.generate(6))


@pytest.fixture
def saved(tmp_path: Path) -> dict[str, Any]:
    """Two saved sessions of one engine: `path` holds sealed blocks, `short_path` only sinks
    and a tail."""
    engine, reference = make_engine("qwen2", seed=9)
    rng = random.Random(9)
    history = rand_ids(rng, 97)
    session = engine.new_session("alpha")
    feed(session, history, rng)
    path = session.save(tmp_path / "snap")
    short = engine.new_session("short")
    short.append(rand_ids(rng, 19))  # 2 sinks, a 2-token remainder, no block
    assert short.n_blocks == 0 and short.layers[0].init_k.shape[1] == N_INIT
    short_path = short.save(tmp_path / "short")
    return {
        "engine": engine,
        "reference": reference,
        "session": session,
        "path": path,
        "history": history,
        "state": state(session),
        "tmp": tmp_path,
        "short": short,
        "short_path": short_path,
        "short_state": state(short),
    }


def test_save_load_round_trip_same_engine(saved: dict[str, Any]) -> None:
    engine, session, path = saved["engine"], saved["session"], saved["path"]
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "tensors.safetensors"]
    loaded = engine.load_session(path)
    assert loaded.session_id == "alpha"
    assert_same_state(state(loaded), saved["state"])
    assert_consistent(loaded)
    extra = rand_ids(random.Random(10), 30)
    got = _continuation(loaded, extra)
    want = _continuation(session, extra)
    assert torch.equal(got[0], want[0])
    assert got[1] == want[1]
    assert loaded.token_ids == session.token_ids
    expected = oracle(saved["reference"], saved["history"] + extra)[-1]
    torch.testing.assert_close(got[0], expected, atol=ATOL, rtol=0)


def test_save_load_into_second_engine_with_same_weights(saved: dict[str, Any]) -> None:
    other, _ = make_engine("qwen2", seed=9)  # same weights, separate engine and caches
    loaded = other.load_session(saved["path"], session_id="beta")
    assert loaded.session_id == "beta" and "beta" in other.sessions
    assert_same_state(state(loaded), saved["state"])
    extra = rand_ids(random.Random(11), 30)
    got = _continuation(loaded, extra)
    want = _continuation(saved["session"], extra)
    assert torch.equal(got[0], want[0])
    assert got[1] == want[1]


def test_save_load_without_blocks_round_trips(saved: dict[str, Any]) -> None:
    """A session with sinks and a remainder but no sealed block round-trips too."""
    for engine in (saved["engine"], make_engine("qwen2", seed=9)[0]):
        loaded = engine.load_session(saved["short_path"])
        assert loaded.session_id == "short"
        assert_same_state(state(loaded), saved["short_state"])
        extra = rand_ids(random.Random(12), 20)  # seals the first blocks
        got = _continuation(loaded, extra)
        twin = saved["short"].fork()
        want = _continuation(twin, extra)
        assert torch.equal(got[0], want[0])
        assert got[1] == want[1]
        assert loaded.n_blocks > 0


def _assert_engine_still_usable(saved: dict[str, Any]) -> None:
    engine, session = saved["engine"], saved["session"]
    n = len(session)
    extra = rand_ids(random.Random(13), 7)
    out = session.append(extra)
    assert len(session) == n + 7
    assert_consistent(session)
    torch.testing.assert_close(
        out.logits, oracle(saved["reference"], saved["history"] + extra)[-1], atol=ATOL, rtol=0
    )
    other = engine.new_session()
    other.append(extra)
    assert_consistent(other)


def _copy_snapshot(saved: dict[str, Any], name: str, which: str = "path") -> Path:
    dst = saved["tmp"] / name
    dst.mkdir()
    for f in saved[which].iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _truncate_tensors(p: Path) -> None:
    f = p / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_tensor_byte(p: Path) -> None:
    f = p / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) * 2 // 3] ^= 0x40
    f.write_bytes(bytes(data))


def _edit_manifest(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(p: Path) -> None:
        manifest = json.loads((p / "manifest.json").read_text())
        edit(manifest)
        (p / "manifest.json").write_text(json.dumps(manifest))

    return apply


def _set(*keys: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value

    return edit


# name -> (damage, what the message must say, which snapshot). Damage found before the
# tensors are rebuilt uses the snapshot with blocks; the manifest-consistency cases use the
# one without, so that they do not depend on rebuilding blocks. A manifest whose content
# no longer matches the tensors may be caught by a consistency check or by a checksum.
INCONSISTENT = r"inconsistent|corrupt|checksum"
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "truncated_tensors": (_truncate_tensors, "checksum", "path"),
    "flipped_tensor_byte": (_flip_tensor_byte, "checksum", "path"),
    "missing_tensors": (lambda p: (p / "tensors.safetensors").unlink(), "missing", "path"),
    "missing_manifest": (lambda p: (p / "manifest.json").unlink(), "manifest", "path"),
    "garbage_manifest": (
        lambda p: (p / "manifest.json").write_text("{'no json"),
        "corrupt",
        "path",
    ),
    "binary_manifest": (
        lambda p: (p / "manifest.json").write_bytes(b"\xff\xfe\x00"),
        "corrupt",
        "path",
    ),
    "manifest_not_object": (
        lambda p: (p / "manifest.json").write_text("[1, 2]"),
        "JSON object",
        "path",
    ),
    "newer_format": (
        _edit_manifest(_set("format_version", value=persistence.FORMAT_VERSION + 1)),
        "newer",
        "path",
    ),
    "missing_format": (_edit_manifest(lambda m: m.pop("format_version")), "format version", "path"),
    "other_config_fingerprint": (
        _edit_manifest(_set("engine", "config_fingerprint", value="0" * 16)),
        "config_fingerprint",
        "path",
    ),
    "missing_layers": (_edit_manifest(lambda m: m.pop("layers")), INCONSISTENT, "path"),
    "wrong_token_count": (
        _edit_manifest(lambda m: m["token_ids"].append(3)),
        INCONSISTENT,
        "short_path",
    ),
    "wrong_tail_start": (
        _edit_manifest(lambda m: [meta.update(tail_start=3) for meta in m["layers"]]),
        INCONSISTENT,
        "short_path",
    ),
    "bad_token_id": (
        _edit_manifest(lambda m: m["token_ids"].__setitem__(0, "x")),
        INCONSISTENT,
        "short_path",
    ),
    "not_a_folder": (lambda p: None, "not a session snapshot", "path"),
    "file_instead_of_folder": (
        lambda p: [shutil.rmtree(p), p.write_text("{}")],
        "cannot read manifest",
        "path",
    ),
    "manifest_is_a_folder": (
        lambda p: [(p / "manifest.json").unlink(), (p / "manifest.json").mkdir()],
        "cannot read manifest",
        "path",
    ),
    "tensors_is_a_folder": (
        lambda p: [(p / "tensors.safetensors").unlink(), (p / "tensors.safetensors").mkdir()],
        "not a regular file",
        "path",
    ),
    "deeply_nested_manifest": (
        lambda p: (p / "manifest.json").write_text("[" * 100_000 + "]" * 100_000),
        "corrupt",
        "path",
    ),
    "nan_in_manifest": (
        lambda p: (p / "manifest.json").write_text(
            (p / "manifest.json").read_text().replace('"token_ids": [', '"token_ids": [NaN, ')
        ),
        "corrupt",
        "path",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_damaged_snapshot_is_refused_and_engine_stays_usable(
    saved: dict[str, Any], case: str
) -> None:
    damage, message, which = CORRUPTIONS[case]
    target = (
        saved["tmp"] / "nowhere" if case == "not_a_folder" else _copy_snapshot(saved, case, which)
    )
    damage(target)
    live_before = saved["engine"].sessions.live_ids()
    with pytest.raises(SessionFileError, match=message):
        saved["engine"].load_session(target, session_id="intruder")
    assert saved["engine"].sessions.live_ids() == live_before
    assert "intruder" not in saved["engine"].sessions
    _assert_engine_still_usable(saved)


@pytest.mark.parametrize("value", ["x", 5, None, [1]])
def test_manifest_with_wrong_engine_type_is_refused(saved: dict[str, Any], value: Any) -> None:
    target = _copy_snapshot(saved, "bad_engine", "short_path")
    _edit_manifest(_set("engine", value=value))(target)
    with pytest.raises(SessionFileError):
        saved["engine"].load_session(target)
    _assert_engine_still_usable(saved)


def test_flipped_token_id_in_manifest_is_refused(saved: dict[str, Any]) -> None:
    """One flipped byte in the manifest's token ids would make the session lie about its
    memory: `sync` would then reuse K/V computed for other tokens."""
    target = _copy_snapshot(saved, "flipped_manifest", "short_path")
    _edit_manifest(lambda m: m["token_ids"].__setitem__(5, (m["token_ids"][5] + 1) % VOCAB))(target)
    with pytest.raises(SessionFileError):
        saved["engine"].load_session(target)


def test_out_of_vocab_token_id_in_manifest_is_refused(saved: dict[str, Any]) -> None:
    target = _copy_snapshot(saved, "out_of_vocab", "short_path")
    _edit_manifest(lambda m: m["token_ids"].__setitem__(0, VOCAB + 5))(target)
    with pytest.raises(SessionFileError):
        saved["engine"].load_session(target)


@pytest.mark.parametrize(
    ("arch", "seed"),
    [("qwen2", 99), ("llama", 9), ("mistral", 9), ("qwen3", 9)],
    ids=["other_weights", "other_arch_llama", "other_arch_mistral", "other_arch_qwen3"],
)
def test_snapshot_from_another_model_is_refused(
    saved: dict[str, Any], arch: str, seed: int
) -> None:
    other, _ = make_engine(arch, seed)
    with pytest.raises(SessionFileError, match="another model"):
        other.load_session(saved["path"])
    other.new_session().append([1, 2, 3])
    _assert_engine_still_usable(saved)


def test_snapshot_from_model_with_other_layer_weights_is_refused(saved: dict[str, Any]) -> None:
    """A fine-tune that leaves embeddings and final norm alone is still another model."""
    model, _ = tiny_pair("qwen2", seed=9)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(1.5)
    other = InfLLMEngine(model, None, InfLLMConfig(**SETTINGS))
    with pytest.raises(SessionFileError, match="another model"):
        other.load_session(saved["path"])


@pytest.mark.parametrize(
    "overrides",
    [{"n_local": 20}, {"block_size": 8}, {"n_init": 4}, {"repr_topk": 3}, {"exc_block_size": 7}],
    ids=lambda o: next(iter(o)),
)
def test_snapshot_from_another_infllm_config_is_refused(
    saved: dict[str, Any], overrides: dict[str, Any]
) -> None:
    other, _ = make_engine("qwen2", seed=9, **overrides)
    with pytest.raises(SessionFileError, match="config_fingerprint"):
        other.load_session(saved["path"])
    _assert_engine_still_usable(saved)


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def test_crash_during_save_keeps_previous_snapshot(
    saved: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    session, path = saved["session"], saved["path"]
    previous = _files(path)
    session.append(rand_ids(random.Random(14), 25))  # the next save would differ
    real = persistence.save_file

    def crash(tensors: dict[str, torch.Tensor], filename: str, *a: Any, **k: Any) -> None:
        real(dict(list(tensors.items())[:3]), filename)  # half-written...
        raise OSError("disk full")  # ...then the crash

    monkeypatch.setattr(persistence, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        session.save(path)
    monkeypatch.undo()
    assert _files(path) == previous, "the previous snapshot was touched"
    leftovers = sorted(p.name for p in path.parent.iterdir())
    assert leftovers == ["short", "snap"], f"staging debris left: {leftovers}"
    # and the session itself is untouched by the failed save; saving again works
    assert len(session) == len(saved["history"]) + 25
    assert_consistent(session)
    session.save(path)
    assert persistence.read_manifest(path)["token_ids"] == session.token_ids


def test_snapshot_left_by_a_crashed_save_still_loads(
    saved: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    session, path = saved["session"], saved["path"]
    session.append(rand_ids(random.Random(14), 25))
    monkeypatch.setattr(
        persistence, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError, match="disk full"):
        session.save(path)
    monkeypatch.undo()
    loaded = saved["engine"].load_session(path)
    assert_same_state(state(loaded), saved["state"])


def test_failed_rename_keeps_previous_snapshot(
    saved: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = saved["path"]
    real = persistence.os.rename
    calls = []

    def flaky(src: Any, dst: Any) -> None:
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(persistence.os, "rename", flaky)
    with pytest.raises(OSError, match="rename failed"):
        saved["session"].save(path)
    monkeypatch.undo()
    assert (path / "manifest.json").exists(), "the previous snapshot is gone"
    assert persistence.read_manifest(path)["token_ids"] == saved["history"]


def _reseal(p: Path) -> None:
    """Recompute the manifest's content checksum, as a buggy or hostile writer would: the
    structural checks behind the checksum must still refuse what does not fit."""
    manifest = json.loads((p / "manifest.json").read_text())
    manifest[persistence.CONTENT_KEY] = persistence.content_sha256(manifest)
    (p / "manifest.json").write_text(json.dumps(manifest))


def _swap_tensor(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    """Rewrite one tensor of the file and fix both checksums."""

    def apply(p: Path) -> None:
        tensors = persistence.load_file(str(p / "tensors.safetensors"))
        tensors[name] = make(tensors[name]).contiguous()
        persistence.save_file(tensors, str(p / "tensors.safetensors"))
        manifest = json.loads((p / "manifest.json").read_text())
        manifest["tensors_sha256"] = persistence._sha256(p / "tensors.safetensors")
        (p / "manifest.json").write_text(json.dumps(manifest))
        _reseal(p)

    return apply


def _resealed(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(p: Path) -> None:
        _edit_manifest(edit)(p)
        _reseal(p)

    return apply


def _tail_start_3(m: dict[str, Any]) -> None:
    for meta in m["layers"]:
        meta["tail_start"] = 3


# name -> (damage with valid checksums, what the message must say, which snapshot)
RESEALED: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "out_of_vocab_token": (
        _resealed(lambda m: m["token_ids"].__setitem__(0, VOCAB + 5)),
        "vocabulary",
        "short_path",
    ),
    "negative_token": (
        _resealed(lambda m: m["token_ids"].__setitem__(1, -1)),
        "token id",
        "short_path",
    ),
    "string_token": (
        _resealed(lambda m: m["token_ids"].__setitem__(0, "x")),
        "token id",
        "short_path",
    ),
    "bool_token": (
        _resealed(lambda m: m["token_ids"].__setitem__(0, True)),
        "token id",
        "short_path",
    ),
    "token_ids_not_a_list": (_resealed(_set("token_ids", value="abc")), "token_ids", "short_path"),
    "extra_token": (_resealed(lambda m: m["token_ids"].append(3)), "tail_k", "short_path"),
    "missing_tokens": (
        _resealed(lambda m: m.__setitem__("token_ids", m["token_ids"][:-9])),
        "tail_start, n_blocks",
        "path",
    ),
    "wrong_tail_start": (
        _resealed(_tail_start_3),
        "tail_start",
        "short_path",
    ),
    "wrong_n_blocks": (
        _resealed(lambda m: m["layers"][1].update(n_blocks=m["layers"][1]["n_blocks"] - 1)),
        "tail_start, n_blocks",
        "path",
    ),
    "layer_meta_not_object": (
        _resealed(lambda m: m["layers"].__setitem__(0, [2, 0])),
        "metadata",
        "short_path",
    ),
    "layers_not_a_list": (_resealed(_set("layers", value={"a": 1})), "layers", "short_path"),
    "one_layer_missing": (_resealed(lambda m: m["layers"].pop()), "layers saved", "short_path"),
    "session_id_not_a_string": (_resealed(_set("session_id", value=7)), "session_id", "path"),
    "missing_content_checksum": (
        _edit_manifest(lambda m: m.pop(persistence.CONTENT_KEY)),
        "content checksum",
        "path",
    ),
    "older_format": (
        _resealed(_set("format_version", value=1)),
        "predates",
        "path",
    ),
    "block_k_wrong_shape": (
        _swap_tensor("layer0.block_k", lambda t: t[:, :, :-1]),
        "block_k",
        "path",
    ),
    "tail_k_wrong_dtype": (
        _swap_tensor("layer1.tail_k", lambda t: t.to(torch.float16)),
        "tail_k",
        "short_path",
    ),
    "reprs_missing_a_block": (_swap_tensor("layer0.reprs", lambda t: t[:-1]), "reprs", "path"),
    "logits_2d": (_swap_tensor("last_logits", lambda t: t[None]), "last_logits", "short_path"),
}


def _add_extra_tensor(p: Path) -> None:
    tensors = persistence.load_file(str(p / "tensors.safetensors"))
    tensors["layer0.intruder"] = torch.zeros(3)
    persistence.save_file(tensors, str(p / "tensors.safetensors"))
    _edit_manifest(_set("tensors_sha256", value=persistence._sha256(p / "tensors.safetensors")))(p)
    _reseal(p)


RESEALED["extra_tensor"] = (_add_extra_tensor, "unexpected", "short_path")


@pytest.mark.parametrize("case", list(RESEALED))
def test_malformed_snapshot_with_valid_checksums_is_refused(
    saved: dict[str, Any], case: str
) -> None:
    """Behind the checksums, every field and tensor is checked against the engine."""
    damage, message, which = RESEALED[case]
    target = _copy_snapshot(saved, f"resealed_{case}", which)
    damage(target)
    with pytest.raises(SessionFileError, match=message):
        saved["engine"].load_session(target, session_id="intruder")
    assert "intruder" not in saved["engine"].sessions
    _assert_engine_still_usable(saved)


def test_resealing_an_intact_snapshot_keeps_it_loadable(saved: dict[str, Any]) -> None:
    """The helper above damages nothing by itself: the refusals are the edits' doing."""
    target = _copy_snapshot(saved, "resealed_intact", "path")
    _reseal(target)
    _swap_tensor("layer0.init_k", lambda t: t)(target)
    loaded = saved["engine"].load_session(target)
    assert_same_state(state(loaded), saved["state"])


@pytest.mark.parametrize(
    "edit",
    [
        "scale_one_tensor",
        "nudge_one_interior_element",
        "swap_two_interior_rows",
        "swap_two_elements_of_a_row",
        "shift_bias",
    ],
)
def test_weights_fingerprint_sees_any_weight_change(edit: str) -> None:
    base, _ = tiny_pair("qwen2", seed=9)
    reference = InfLLMEngine(base, None, InfLLMConfig(**SETTINGS)).weights_fingerprint()
    model, _ = tiny_pair("qwen2", seed=9)
    assert InfLLMEngine(model, None, InfLLMConfig(**SETTINGS)).weights_fingerprint() == reference
    model, _ = tiny_pair("qwen2", seed=9)
    with torch.no_grad():
        w = model.model.layers[0].mlp.up_proj.weight
        if edit == "scale_one_tensor":
            model.model.layers[1].self_attn.o_proj.weight.mul_(1.5)
        elif edit == "nudge_one_interior_element":
            w[w.shape[0] // 2, w.shape[1] // 2] += 1e-3
        elif edit == "swap_two_interior_rows":
            w[[3, 5]] = w[[5, 3]].clone()
        elif edit == "swap_two_elements_of_a_row":
            w[4, [2, 7]] = w[4, [7, 2]].clone()
        else:
            model.model.layers[0].self_attn.q_proj.bias.add_(1e-4)
    assert InfLLMEngine(model, None, InfLLMConfig(**SETTINGS)).weights_fingerprint() != reference


# ----------------------------------------------------------------- 6. session store
def test_store_get_or_create() -> None:
    engine, _ = make_engine()
    a = engine.session("a")
    assert engine.session("a") is a
    assert len(a) == 0 and a.session_id == "a"
    b = engine.new_session("b")
    assert engine.session("b") is b
    anonymous = engine.new_session()
    assert anonymous.session_id not in engine.sessions
    assert sorted(engine.sessions.live_ids()) == ["a", "b"]
    engine.sessions.drop("a")
    assert "a" not in engine.sessions
    assert engine.session("a") is not a


def _fill(session: Session, rng: random.Random, n: int) -> None:
    feed(session, rand_ids(rng, n), rng)


def test_store_spills_lru_and_reloads_losslessly(tmp_path: Path) -> None:
    probe, _ = make_engine(seed=15)
    rng = random.Random(15)
    sample = probe.new_session()
    _fill(sample, random.Random(0), 80)
    per_session = sample.host_bytes()
    assert per_session > 0
    engine, reference = make_engine(
        seed=15, session_host_budget_bytes=int(per_session * 2.5), spill_dir=tmp_path / "spill"
    )
    histories: dict[str, list[int]] = {}
    snapshots: dict[str, dict[str, Any]] = {}
    for sid in ("a", "b", "c", "d"):
        s = engine.session(sid)
        histories[sid] = rand_ids(rng, 80)
        feed(s, histories[sid], rng)
        snapshots[sid] = state(s)
        engine.sessions.enforce_budget(keep=sid)
    spilled = engine.sessions.spilled_ids()
    assert spilled, "the budget holds about two sessions: the oldest must have spilled"
    assert "a" in spilled and "d" not in spilled
    assert engine.sessions.host_bytes() <= int(per_session * 2.5)
    assert any((tmp_path / "spill").iterdir())
    for sid in ("a", "b", "c", "d"):
        s = engine.session(sid)  # reloads a spilled one, maybe spilling another
        assert s.session_id == sid
        assert_same_state(state(s), snapshots[sid])
        extra = rand_ids(rng, 9)
        out = s.append(extra)
        torch.testing.assert_close(
            out.logits, oracle(reference, histories[sid] + extra)[-1], atol=ATOL, rtol=0
        )
        histories[sid] += extra
    # a reloaded session is the live one from then on
    assert engine.session("d").token_ids == histories["d"]


def test_spill_does_not_lose_appends_made_through_a_held_handle(tmp_path: Path) -> None:
    probe, _ = make_engine(seed=16)
    sample = probe.new_session()
    _fill(sample, random.Random(0), 80)
    engine, _ = make_engine(
        seed=16, session_host_budget_bytes=int(sample.host_bytes() * 1.5), spill_dir=tmp_path
    )
    rng = random.Random(16)
    handle = engine.session("a")
    _fill(handle, rng, 80)
    _fill(engine.session("b"), rng, 80)
    engine.session("b")  # over budget now: "a", the least recently used, spills
    assert engine.sessions.spilled_ids() == ["a"]
    handle.append([1, 2, 3])
    assert engine.session("a").token_ids == handle.token_ids


def _budget_engine(tmp_path: Path, seed: int, sessions: float) -> InfLLMEngine:
    """An engine whose store holds about `sessions` sessions of 80 tokens."""
    probe, _ = make_engine(seed=seed)
    sample = probe.new_session()
    _fill(sample, random.Random(0), 80)
    engine, _ = make_engine(
        seed=seed,
        session_host_budget_bytes=int(sample.host_bytes() * sessions),
        spill_dir=tmp_path / "spill",
    )
    return engine


def test_failed_reload_keeps_the_spilled_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _budget_engine(tmp_path, 16, 1.5)
    rng = random.Random(16)
    a = engine.session("a")
    _fill(a, rng, 80)
    held = state(a)
    engine.sessions.spill("a")
    assert engine.sessions.spilled_ids() == ["a"]

    def broken(*args: Any, **kwargs: Any) -> Session:
        raise SessionFileError("disk went away")

    def no_memory(*args: Any, **kwargs: Any) -> Any:
        raise EngineOutOfMemoryError("no memory to recompute either")

    # an unusable snapshot is recomputed from the token ids (tests/test_store_safety.py);
    # when that fails too, the session stays spilled and the snapshot is kept
    monkeypatch.setattr(persistence, "load_session", broken)
    monkeypatch.setattr(Session, "_append", no_memory)
    with pytest.raises(EngineOutOfMemoryError, match="recompute"):
        engine.session("a")
    assert "a" in engine.sessions and engine.sessions.spilled_ids() == ["a"]
    monkeypatch.undo()
    again = engine.session("a")  # the snapshot was kept: a later try succeeds
    assert again is a and not a.spilled
    assert_same_state(state(again), held)


def test_budget_is_enforced_after_appends(tmp_path: Path) -> None:
    """Growing a session through appends alone (no get or put) spills the others."""
    engine = _budget_engine(tmp_path, 16, 1.5)
    rng = random.Random(16)
    a = engine.session("a")
    _fill(a, rng, 80)
    b = engine.session("b")
    assert engine.sessions.spilled_ids() == []
    _fill(b, rng, 80)
    assert engine.sessions.spilled_ids() == ["a"]
    assert a.host_bytes() == 0 and a.token_ids  # released, tokens kept
    assert engine.sessions.host_bytes() <= engine.config.session_host_budget_bytes  # type: ignore[operator]
    # the session that grew is never the one spilled for its own growth
    _fill(b, rng, 40)
    assert not b.spilled


def _in_daemon(job: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            job()
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)  # a deadlock must not hang pytest
    thread.start()
    return thread, errors


def test_spill_skips_a_busy_session_and_never_waits_holding_the_store_lock(
    tmp_path: Path,
) -> None:
    engine = _budget_engine(tmp_path, 16, 1.5)
    rng = random.Random(16)
    a = engine.session("a")
    _fill(a, rng, 80)
    b = engine.session("b")
    a_state = state(a)
    holding, release = threading.Event(), threading.Event()

    def busy_with_a() -> None:
        with a.lock:  # a caller is in the middle of using "a"
            holding.set()
            release.wait(TIMEOUT)
            # ...and needs the store while it holds the session: no lock-order deadlock
            engine.session("c")

    owner, owner_errors = _in_daemon(busy_with_a)
    assert holding.wait(TIMEOUT)
    grower, grower_errors = _in_daemon(lambda: _fill(b, rng, 80))  # over budget now
    grower.join(TIMEOUT)
    assert not grower.is_alive(), "the store waited for a busy session"
    assert grower_errors == []
    assert engine.sessions.spilled_ids() == [], "a session in use was spilled"
    release.set()
    owner.join(TIMEOUT)
    assert not owner.is_alive(), "deadlock between the store lock and a session lock"
    assert owner_errors == []
    # "c" came in while "a" was still held: the store made room without touching "a"
    assert engine.sessions.spilled_ids() == ["b"]
    assert engine.sessions.spill("a") is not None  # free now: it spills
    assert_same_state(state(engine.session("a")), a_state)
    # a session this very thread holds is busy too (its RLock would let a spill in)
    with a.lock:
        assert engine.sessions.spill("a") is None
        assert not a.spilled
    assert_same_state(state(engine.session("a")), a_state)


def test_drop_frees_a_spilled_session_and_its_files(tmp_path: Path) -> None:
    engine = _budget_engine(tmp_path, 16, 1.5)
    a = engine.session("a")
    _fill(a, random.Random(3), 80)
    path = engine.sessions.spill("a")
    assert path is not None and path.exists()
    engine.sessions.drop("a")
    assert not path.exists() and "a" not in engine.sessions
    assert len(a) == 0 and not a.spilled  # the dropped object is an empty session
    assert len(engine.session("a")) == 0


# ------------------------------------------------------------------ 7. concurrency
def _run_threads(jobs: list[Callable[[], None]]) -> None:
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(job) for job in jobs]
        for f in futures:
            f.result(timeout=TIMEOUT)  # a deadlock fails here instead of hanging


def test_concurrent_sessions_and_shared_session() -> None:
    engine, _ = make_engine(seed=17)
    own = [engine.session(f"own{i}") for i in range(4)]
    shared = engine.session("shared")
    shared.append(rand_ids(random.Random(0), 12))
    generated: list[list[int]] = []
    appended: list[int] = []

    def own_worker(i: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(100 + i)
            for _ in range(6):
                op = rng.random()
                s = own[i]
                if op < 0.6 or len(s) == 0:
                    s.append(rand_ids(rng, rng.randint(1, 17)))
                elif op < 0.8:
                    s.sync(s.token_ids[: rng.randint(1, len(s))] + rand_ids(rng, 5))
                else:
                    list(s.generate(3))

        return run

    def shared_appender(i: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(200 + i)
            for _ in range(8):
                ids = rand_ids(rng, rng.randint(1, 9))
                shared.append(ids)
                appended.append(len(ids))

        return run

    def shared_generator() -> None:
        for _ in range(4):
            generated.append(list(shared.generate(4)))

    _run_threads(
        [own_worker(i) for i in range(4)]
        + [shared_appender(i) for i in range(2)]
        + [shared_generator]
    )
    assert not engine.model_lock.locked()
    for s in [*own, shared]:
        assert_consistent(s)
        assert s.last_logits is not None
        torch.testing.assert_close(
            s.last_logits, fresh_logits(engine, s.token_ids), atol=ATOL, rtol=0
        )
    assert sum(len(g) for g in generated) == 16
    # every append of the shared session landed exactly once, in one piece
    assert len(appended) == 16
    assert len(shared) == 12 + 16 + sum(appended)


def test_concurrent_sessions_sharing_a_small_cache_match_sequential_replay() -> None:
    """Threads share the per-layer block caches (capacity == topk, constant eviction); each
    thread's logits must equal, bit for bit, a sequential replay of its own operations."""
    settings = dict(topk=2, max_cached_block=2)
    engine, _ = make_engine("qwen2", 26, **settings)
    plans = []
    for i in range(4):
        rng = random.Random(300 + i)
        plans.append([rand_ids(rng, rng.randint(1, 13)) for _ in range(14)])
    got: dict[int, list[torch.Tensor]] = {}

    def worker(i: int) -> Callable[[], None]:
        def run() -> None:
            s = engine.new_session()
            got[i] = [s.append(ids).logits for ids in plans[i]]

        return run

    _run_threads([worker(i) for i in range(4)])
    replay, _ = make_engine("qwen2", 26, **settings)
    for i, plan in enumerate(plans):
        s = replay.new_session()
        for step, ids in enumerate(plan):
            assert torch.equal(s.append(ids).logits, got[i][step]), f"thread {i} step {step}"
    assert sum(c.counters.misses for c in engine.caches) > 100


def test_store_under_concurrent_get_or_create() -> None:
    engine, _ = make_engine(seed=18)

    def worker(i: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(i)
            for step in range(10):
                s = engine.session(f"s{(i + step) % 3}")
                with s.lock:
                    s.append(rand_ids(rng, 3))

        return run

    _run_threads([worker(i) for i in range(5)])
    assert sorted(engine.sessions.live_ids()) == ["s0", "s1", "s2"]
    assert sum(len(engine.session(f"s{j}")) for j in range(3)) == 5 * 10 * 3
    for j in range(3):
        s = engine.session(f"s{j}")
        assert_consistent(s)
        torch.testing.assert_close(
            s.last_logits, fresh_logits(engine, s.token_ids), atol=ATOL, rtol=0
        )


def test_generate_step_is_atomic_against_other_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _ = make_engine(seed=19)
    rng = random.Random(19)
    session = engine.new_session()
    session.append(rand_ids(rng, 20))
    foreign = rand_ids(rng, 5)
    real = session_module.sample_token
    intruder: list[threading.Thread] = []

    def slow_sample(*args: Any, **kwargs: Any) -> int:
        if not intruder:  # another thread appends while this step is sampling
            intruder.append(threading.Thread(target=session.append, args=(foreign,)))
            intruder[0].start()
            intruder[0].join(timeout=3.0)  # a locked step makes it wait
        return int(real(*args, **kwargs))

    monkeypatch.setattr(session_module, "sample_token", slow_sample)
    tokens = list(session.generate(2))
    intruder[0].join(timeout=TIMEOUT)
    assert not intruder[0].is_alive()
    ids = session.token_ids
    assert_consistent(session)
    assert len(ids) == 20 + len(foreign) + len(tokens)
    at = next(j for j in range(20, len(ids)) if ids[j : j + len(foreign)] == foreign)
    generated_at = [j for j in range(20, len(ids)) if not at <= j < at + len(foreign)]
    assert [ids[j] for j in generated_at] == tokens
    # greedy: every generated token is the argmax of the context it was appended to
    for j in generated_at:
        assert int(fresh_logits(engine, ids[:j]).argmax()) == ids[j], f"token at {j}"


def test_sync_over_max_context_leaves_the_session_untouched() -> None:
    engine, reference = make_engine(seed=27, max_context=40)
    rng = random.Random(27)
    session = engine.new_session()
    history = rand_ids(rng, 30)
    session.append(history)
    before = state(session)
    with pytest.raises(ContextLimitError, match="max_context is 40"):
        session.sync(history[:10] + rand_ids(rng, 31))  # 41 tokens: refused before truncating
    assert_same_state(state(session), before)
    assert session.stats()["tokens_reused"] == 0
    prompt = history[:10] + rand_ids(rng, 30)  # exactly the limit: fine
    out = session.sync(prompt)
    assert out.reused_tokens == 10 and session.token_ids == prompt
    torch.testing.assert_close(out.logits, oracle(reference, prompt)[-1], atol=ATOL, rtol=0)


# ------------------------------------------------------------------ 8. interruption
def test_closing_generate_early_keeps_yielded_tokens() -> None:
    engine, reference = make_engine(seed=20)
    rng = random.Random(20)
    prompt = rand_ids(rng, 75)
    session = engine.new_session()
    session.sync(prompt)
    stream = session.generate(20)
    yielded = [next(stream) for _ in range(3)]
    stream.close()
    assert session.token_ids == prompt + yielded
    assert_consistent(session)
    expected = oracle(reference, prompt + yielded)
    for i, t in enumerate(yielded):  # greedy: each token is the argmax at its position
        assert t == int(expected[len(prompt) - 1 + i].argmax())
    torch.testing.assert_close(session.last_logits, expected[-1], atol=ATOL, rtol=0)
    more = rand_ids(rng, 10)
    out = session.append(more)
    torch.testing.assert_close(
        out.logits, fresh_logits(engine, prompt + yielded + more), atol=ATOL, rtol=0
    )
    # a consumer that breaks out of its loop with an exception: same guarantee
    held = session.token_ids
    taken: list[int] = []
    with pytest.raises(LookupError):
        for t in session.generate(10):
            taken.append(t)
            if len(taken) == 2:
                raise LookupError("consumer gave up")
    assert session.token_ids == held + taken
    assert_consistent(session)


class Boom(RuntimeError):
    pass


def _failing(module: nn.Module, fail_on: set[int], exc: Callable[[], BaseException]) -> Any:
    real = module.forward
    calls = [0]

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] in fail_on:
            raise exc()
        return real(*args, **kwargs)

    return forward


Failure = tuple[Callable[[InfLLMEngine], nn.Module], int, Callable[[], BaseException]]
FAILURES: dict[str, Failure] = {
    # after layer 0's attention (it holds the chunk), before layer 1's
    "layer0_mlp": (lambda e: e.model.model.layers[0].mlp, 1, lambda: Boom("layer 0")),
    # both attentions ran, the model fails on its way out
    "layer1_mlp": (lambda e: e.model.model.layers[1].mlp, 1, lambda: Boom("layer 1")),
    "final_norm": (lambda e: e.model.model.norm, 1, lambda: Boom("norm")),
    "lm_head": (lambda e: e.model.lm_head, 1, lambda: Boom("lm_head")),
    "keyboard_interrupt": (lambda e: e.model.model.layers[1].mlp, 1, KeyboardInterrupt),
    # the second model call of a multi-call append (chunk_size 11)
    "second_call": (lambda e: e.model.model.layers[0].mlp, 2, lambda: Boom("call 2")),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_exception_inside_forward_leaves_session_consistent(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, reference = make_engine(seed=21)
    rng = random.Random(case)
    history = rand_ids(rng, 70)
    session = engine.new_session()
    feed(session, history, rng)
    before = state(session)
    module_of, nth, exc = FAILURES[case]
    module = module_of(engine)
    monkeypatch.setattr(module, "forward", _failing(module, {nth}, exc))
    new = rand_ids(rng, 30)  # three model calls of at most 11 tokens
    with pytest.raises(BaseException) as info:
        session.append(new)
    assert isinstance(info.value, KeyboardInterrupt | Boom)
    monkeypatch.undo()
    # All or nothing: model calls that completed before the failing one are undone too.
    assert session.token_ids == history
    assert_consistent(session)
    assert_same_state(state(session), before, scores=True)
    # continuing: the same as a session that never saw the failure
    rest = rand_ids(rng, 33)
    session.append(rest)
    ids = history + rest
    torch.testing.assert_close(session.last_logits, fresh_logits(engine, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(session.last_logits, oracle(reference, ids)[-1], atol=ATOL, rtol=0)


def test_failed_forward_leaves_no_attention_mass_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _ = make_engine(seed=22)
    rng = random.Random(22)
    history = rand_ids(rng, 70)
    session = engine.new_session()
    feed(session, history, rng)
    before = state(session)
    mlp = engine.model.model.layers[1].mlp
    monkeypatch.setattr(mlp, "forward", _failing(mlp, {1}, lambda: Boom("late")))
    with pytest.raises(Boom):
        session.append(rand_ids(rng, 9))
    assert_same_state(state(session), before, scores=True)
    # blocks the failed forward sealed (and fetched) are gone: so are their cache slots
    for i, cache in enumerate(engine.caches):
        assert cache.resident_blocks() <= set(session.block_uids(i))


def test_failed_forward_restores_lru_s_cache_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _ = make_engine(seed=22, cache_strategy="lru-s", score_decay=0.3)
    rng = random.Random(22)
    session = engine.new_session()
    feed(session, rand_ids(rng, 70), rng)
    before = [cache.score_state() for cache in engine.caches]
    assert all(before)
    mlp = engine.model.model.layers[1].mlp
    monkeypatch.setattr(mlp, "forward", _failing(mlp, {1}, lambda: Boom("late")))
    with pytest.raises(Boom):
        session.append(rand_ids(rng, 9))
    assert [cache.score_state() for cache in engine.caches] == before


def test_oom_retry_counts_attention_mass_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The failed try's queries must not leave mass behind for the retry to add to."""
    engine, _ = make_engine(seed=23, exc_block_size=8, chunk_size=64)
    rng = random.Random(23)
    session = engine.new_session()
    feed(session, rand_ids(rng, 60), rng)
    twin = session.fork()
    mlp = engine.model.model.layers[1].mlp  # layer 0's attention ran before the OOM
    monkeypatch.setattr(
        mlp, "forward", _failing(mlp, {1}, lambda: torch.OutOfMemoryError("simulated"))
    )
    new = rand_ids(rng, 30)
    session.append(new)
    monkeypatch.undo()
    twin.append(new)  # never failed (other execution chunks: equal up to rounding)
    for got, want in zip(state(session)["scores"], state(twin)["scores"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("where", ["layer0_mlp", "layer1_mlp"])
def test_oom_once_retries_with_smaller_execution_chunks(
    where: str,
    monkeypatch: pytest.MonkeyPatch,
    counter_factory: Callable[[InfLLMEngine], TokenCounter],
) -> None:
    engine, reference = make_engine(seed=23, exc_block_size=8, chunk_size=64)
    rng = random.Random(23)
    history = rand_ids(rng, 60)
    session = engine.new_session()
    feed(session, history, rng)
    module = FAILURES[where][0](engine)
    monkeypatch.setattr(
        module,
        "forward",
        _failing(module, {1}, lambda: torch.OutOfMemoryError("CUDA out of memory (simulated)")),
    )
    counter = counter_factory(engine)
    new = rand_ids(rng, 30)
    out = session.append(new)
    # The last token runs as a call of its own (`last_token_alone`), at the full size.
    assert counter.exc_sizes == [8, 4, 8], "one failed try, then half-size execution chunks"
    assert counter.calls == [29, 29, 1]
    assert out.computed_tokens == 30
    assert session.token_ids == history + new
    assert_consistent(session)
    torch.testing.assert_close(out.logits, oracle(reference, history + new)[-1], atol=ATOL, rtol=0)
    monkeypatch.undo()
    more = rand_ids(rng, 12)
    session.append(more)
    torch.testing.assert_close(
        session.last_logits, oracle(reference, history + new + more)[-1], atol=ATOL, rtol=0
    )


def test_oom_always_raises_engine_oom_and_keeps_session(
    monkeypatch: pytest.MonkeyPatch, counter_factory: Callable[[InfLLMEngine], TokenCounter]
) -> None:
    engine, reference = make_engine(seed=24, exc_block_size=8, chunk_size=64)
    rng = random.Random(24)
    history = rand_ids(rng, 60)
    session = engine.new_session()
    feed(session, history, rng)
    before = state(session)
    mlp = engine.model.model.layers[1].mlp
    monkeypatch.setattr(
        mlp,
        "forward",
        _failing(mlp, set(range(1, 100)), lambda: torch.OutOfMemoryError("CUDA out of memory")),
    )
    counter = counter_factory(engine)
    with pytest.raises(EngineOutOfMemoryError, match="60 earlier tokens") as info:
        session.append(rand_ids(rng, 20))
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert counter.exc_sizes == [8, 4, 2]
    assert_same_state(state(session), before, scores=False)
    assert_consistent(session)
    monkeypatch.undo()
    more = rand_ids(rng, 9)
    session.append(more)
    torch.testing.assert_close(
        session.last_logits, oracle(reference, history + more)[-1], atol=ATOL, rtol=0
    )


def test_keyboard_interrupt_during_generate_keeps_yielded_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine, reference = make_engine(seed=25)
    rng = random.Random(25)
    prompt = rand_ids(rng, 40)
    session = engine.new_session()
    session.append(prompt)
    mlp = engine.model.model.layers[1].mlp
    monkeypatch.setattr(mlp, "forward", _failing(mlp, {4}, KeyboardInterrupt))
    taken: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        for t in session.generate(10):
            taken.append(t)
    monkeypatch.undo()
    assert len(taken) == 3
    assert session.token_ids == prompt + taken
    assert_consistent(session)
    torch.testing.assert_close(
        session.last_logits, oracle(reference, prompt + taken)[-1], atol=ATOL, rtol=0
    )
    assert len(list(session.generate(2))) == 2
    assert_consistent(session)
