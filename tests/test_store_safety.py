"""The session store neither loses a session nor blames the wrong one (issue 14, class 3).

Each test fails without its protection:

* a spill snapshot that is deleted, corrupt or holds other tokens is not the end of the
  session: its token ids are known, so the memory is recomputed (with a warning), and a
  recompute that fails leaves the session spilled exactly as it was;
* a spill that fails (disk full, a file where the spill folder should be) never raises in
  the append or lookup of *another* session whose tokens were already committed: the
  victim stays resident and the failure is logged;
* a session id that is not a non-empty string is refused at the store boundary, and the
  store keeps working for everyone else.

Sessions are checked against a fresh session fed the same token ids.
"""

from __future__ import annotations

import errno
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from langchain_infllm import InfLLMConfig, InfLLMEngine
from langchain_infllm.engine import EngineOutOfMemoryError, Session, persistence
from tests.shared_configs import TINY_ALL_BLOCKS
from tests.tiny_models import tiny_pair

VOCAB = 97
SETTINGS: dict[str, Any] = dict(TINY_ALL_BLOCKS)
ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids(seed: int, n: int = 80) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


def _engine(spill_dir: Path, sessions: float | None = 1.5) -> InfLLMEngine:
    """An engine whose store holds about `sessions` sessions of 80 tokens."""
    model, _ = tiny_pair("llama", seed=31)
    budget = None
    if sessions is not None:
        probe = InfLLMEngine(model, None, InfLLMConfig(**SETTINGS)).new_session()
        probe.append(_ids(0))
        budget = int(probe.host_bytes() * sessions)
        model, _ = tiny_pair("llama", seed=31)
    config = InfLLMConfig(**SETTINGS, session_host_budget_bytes=budget)
    return InfLLMEngine(model, None, config, spill_dir=spill_dir)


def _assert_like_fresh(session: Session) -> None:
    """Same token ids, same last logits and continuation as a fresh session fed them."""
    fresh = Session(session.engine)
    fresh.append(session.token_ids)
    assert fresh.last_logits is not None and session.last_logits is not None
    torch.testing.assert_close(session.last_logits, fresh.last_logits, atol=ATOL, rtol=0)
    for layer in session.layers:
        assert layer.length == len(session)
    more = [5, 8, 13, 21]
    got = session.fork().append(more).logits
    want = fresh.append(more).logits
    assert got is not None and want is not None
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def _spilled(tmp_path: Path) -> tuple[InfLLMEngine, Session, Path]:
    engine = _engine(tmp_path / "spill", sessions=None)
    a = engine.session("a")
    a.append(_ids(1))
    path = engine.sessions.spill("a")
    assert path is not None and a.spilled and engine.sessions.spilled_ids() == ["a"]
    return engine, a, path


def _truncate_tensors(path: Path) -> None:
    f = path / persistence.TENSORS
    f.write_bytes(f.read_bytes()[:100])


def _foreign_tokens(path: Path) -> None:
    """A valid snapshot, but of another session's tokens."""
    engine = _engine(path.parent / "other", sessions=None)
    other = engine.new_session()
    other.append(_ids(99))
    shutil.rmtree(path)
    other.save(path)


DAMAGE = {
    "deleted": lambda p: shutil.rmtree(p),
    "corrupt": _truncate_tensors,
    "other_tokens": _foreign_tokens,
    "manifest_gone": lambda p: (p / persistence.MANIFEST).unlink(),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_unusable_spill_snapshot_is_recomputed_from_token_ids(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    engine, a, path = _spilled(tmp_path)
    tokens = a.token_ids
    DAMAGE[case](path)
    with caplog.at_level(logging.WARNING, logger="langchain_infllm.engine.session"):
        again = engine.session("a")
    assert again is a and not a.spilled
    assert a.token_ids == tokens
    assert any("recomputing" in r.getMessage() for r in caplog.records), caplog.text
    assert not path.exists(), "the unusable snapshot was left behind"
    _assert_like_fresh(a)


def test_a_held_handle_recomputes_too(tmp_path: Path) -> None:
    """Appending through a handle to a session whose snapshot vanished loses nothing."""
    _, a, path = _spilled(tmp_path)
    shutil.rmtree(path)
    tokens = a.token_ids
    a.append([1, 2, 3])
    assert a.token_ids == [*tokens, 1, 2, 3]
    _assert_like_fresh(a)


def test_a_failed_recompute_leaves_the_session_spilled_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, a, path = _spilled(tmp_path)
    shutil.rmtree(path)
    tokens = a.token_ids
    blocks = a.n_blocks
    real_forward = Session._forward
    calls: list[int] = []

    def fail_second_chunk(self: Session, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 3:  # part-way: some blocks were already sealed
            raise EngineOutOfMemoryError("no memory half-way through the recompute")
        real_forward(self, *args, **kwargs)

    monkeypatch.setattr(Session, "_forward", fail_second_chunk)
    with pytest.raises(EngineOutOfMemoryError, match="half-way"):
        engine.session("a")
    assert a.spilled and a.token_ids == tokens and a.n_blocks == blocks
    assert a.last_logits is None and a.host_bytes() == 0
    assert engine.sessions.spilled_ids() == ["a"]
    monkeypatch.undo()
    assert engine.session("a") is a and not a.spilled  # a later call succeeds
    assert a.token_ids == tokens
    _assert_like_fresh(a)


def _over_budget(engine: InfLLMEngine) -> tuple[Session, Session]:
    a = engine.session("a")
    a.append(_ids(1))
    b = engine.session("b")
    b.append(_ids(2, 40))
    assert engine.sessions.spilled_ids() == []
    return a, b


def test_spill_failure_does_not_raise_in_another_sessions_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = _engine(tmp_path / "spill")
    a, b = _over_budget(engine)
    saves: list[Path] = []

    def disk_full(session: Session, path: Path, **kwargs: Any) -> Path:
        saves.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(persistence, "save_session", disk_full)
    more = _ids(3, 40)
    with caplog.at_level(logging.WARNING, logger="langchain_infllm.engine.store"):
        result = b.append(more)  # pushes the store over budget: "a" should spill
    assert saves, "the budget check did not try to spill"
    assert result.computed_tokens == 40 and result.logits is not None
    assert b.token_ids == _ids(2, 40) + more  # committed once; no retry needed
    assert not a.spilled and engine.sessions.spilled_ids() == []
    assert any("could not spill session a" in r.getMessage() for r in caplog.records)
    assert engine.session("c") is not None  # a lookup over budget does not raise either
    tried = len(saves)
    b.append([7])
    assert len(saves) == tried, "a failing disk was retried on every append"
    _assert_like_fresh(a)
    _assert_like_fresh(b)

    monkeypatch.undo()  # the disk has room again: once the pause is over, spills resume
    engine.sessions.spill_retry_seconds = 0.0
    engine.sessions._spill_retry_at = 0.0
    b.append([9])
    assert "a" in engine.sessions.spilled_ids()
    assert engine.session("a").token_ids == _ids(1)


def test_spill_folder_that_cannot_be_created_does_not_blame_the_appender(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real file-system failure: a regular file where the spill folder's parent is."""
    (tmp_path / "blocker").write_text("not a folder")
    engine = _engine(tmp_path / "blocker" / "spill")
    a, b = _over_budget(engine)
    with caplog.at_level(logging.WARNING, logger="langchain_infllm.engine.store"):
        b.append(_ids(4, 40))
    assert b.token_ids == _ids(2, 40) + _ids(4, 40)
    assert not a.spilled
    assert any("could not spill" in r.getMessage() for r in caplog.records)
    _assert_like_fresh(a)


BAD_IDS: list[Any] = [5, None, "", b"a", 1.5, ["a"], ("a",)]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_bad_session_id_is_refused_and_poisons_nothing(tmp_path: Path, bad: Any) -> None:
    engine = _engine(tmp_path / "spill")
    snapshot = engine.new_session()
    snapshot.append(_ids(5, 20))
    saved = snapshot.save(tmp_path / "snap")
    calls = {
        "session": lambda: engine.session(bad),
        "get_or_create": lambda: engine.sessions.get_or_create(bad),
        "spill": lambda: engine.sessions.spill(bad),
        "drop": lambda: engine.sessions.drop(bad),
        "load": lambda: engine.load_session(saved, session_id=bad),
    }
    if bad is None:
        del calls["load"]  # None there means "the id the snapshot was saved with"
    for call in calls.values():
        with pytest.raises((TypeError, ValueError), match="session_id"):
            call()
    if bad not in (None, ""):  # Session() gives those a fresh id
        with pytest.raises(TypeError, match="session_id"):
            engine.new_session(bad)
    assert bad not in engine.sessions
    assert all(isinstance(k, str) and k for k in engine.sessions.live_ids())
    # everyone else carries on: appends that spill, reload and drop all work
    _, b = _over_budget(engine)
    b.append(_ids(6, 40))
    assert engine.sessions.spilled_ids() == ["a"]
    assert engine.session("a").token_ids == _ids(1)
    engine.sessions.drop("b")
    assert "b" not in engine.sessions
