"""Snapshot files are untrusted input (issue 14, class 5).

Each test fails without its protection: reads are bounded (an oversized manifest is
refused before it is read); a FIFO, socket or device at a snapshot's file names fails at
once instead of blocking; every tensor's values are checked against the model even when
both checksums were recomputed, the way a hostile writer would (NaN/inf anywhere,
negative attention mass, last logits not one finite row of the vocabulary). A refused
file changes nothing, and a good snapshot still loads afterwards.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from langchain_infllm import InfLLMConfig, InfLLMEngine
from langchain_infllm.engine import Session, SessionFileError, persistence
from tests.shared_configs import TINY_ALL_BLOCKS
from tests.tiny_models import tiny_pair

VOCAB = 97
SETTINGS: dict[str, Any] = dict(TINY_ALL_BLOCKS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One engine and a saved session holding sinks, sealed blocks, a tail and logits."""
    model, _ = tiny_pair("qwen2", seed=21)
    engine = InfLLMEngine(model, None, InfLLMConfig(**SETTINGS))
    rng = random.Random(21)
    session = engine.new_session("alpha")
    session.append([rng.randrange(VOCAB) for _ in range(61)])
    assert session.n_blocks > 0 and session.last_logits is not None
    path = session.save(tmp_path_factory.mktemp("snap") / "good")
    return {"engine": engine, "session": session, "path": path}


def _copy(snap: dict[str, Any], dst: Path) -> Path:
    shutil.copytree(snap["path"], dst)
    return dst


def _rewrite(target: Path, name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace one tensor and recompute both checksums the way `save_session` does, so
    only the value checks stand between the file and a session."""
    file = target / persistence.TENSORS
    tensors = persistence.load_file(str(file))
    tensors[name] = make(tensors[name].clone()).contiguous()
    persistence.save_file(tensors, str(file))
    manifest = json.loads((target / persistence.MANIFEST).read_text())
    manifest["tensors_sha256"] = persistence._sha256(file)
    manifest[persistence.CONTENT_KEY] = persistence.content_sha256(manifest)
    (target / persistence.MANIFEST).write_text(json.dumps(manifest))


def _poke(value: float, index: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    def make(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[index] = value
        return t

    return make


def _assert_good_snapshot_loads(snap: dict[str, Any]) -> None:
    """Nothing was changed: the stored session is the same object, the good file loads."""
    engine, session = snap["engine"], snap["session"]
    assert "intruder" not in engine.sessions
    assert engine.sessions.get_or_create("alpha") is session
    loaded = engine.load_session(snap["path"])
    assert loaded.token_ids == session.token_ids
    assert loaded.last_logits is not None and session.last_logits is not None
    assert torch.equal(loaded.last_logits, session.last_logits)
    more = [3, 1, 4, 1, 5]
    assert torch.equal(loaded.fork().append(more).logits, session.fork().append(more).logits)


def _refused(snap: dict[str, Any], target: Path, message: str) -> None:
    with pytest.raises(SessionFileError, match=message):
        snap["engine"].load_session(target, session_id="intruder")
    with pytest.raises(SessionFileError, match=message):  # nor over an existing session
        snap["engine"].load_session(target, session_id="alpha")
    _assert_good_snapshot_loads(snap)


NONFINITE = r"NaN or infinite"
# name -> (tensor, damage, what the message must say)
VALUES: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor], str]] = {
    "nan_in_block_k": ("layer0.block_k", _poke(float("nan"), 7), NONFINITE),
    "inf_in_block_v": ("layer1.block_v", _poke(float("inf"), 3), NONFINITE),
    "nan_in_init_k": ("layer0.init_k", _poke(float("nan")), NONFINITE),
    "neg_inf_in_tail_v": ("layer1.tail_v", _poke(float("-inf"), 5), NONFINITE),
    "nan_in_reprs": ("layer1.reprs", _poke(float("nan"), 2), NONFINITE),
    "inf_in_last_logits": ("last_logits", _poke(float("inf"), 11), NONFINITE),
    "nan_in_last_logits": ("last_logits", _poke(float("nan")), NONFINITE),
    "nan_in_block_scores": ("layer0.block_scores", _poke(float("nan"), 1), NONFINITE),
    "inf_in_tail_score": ("layer0.tail_score", _poke(float("inf")), NONFINITE),
    "negative_block_scores": ("layer1.block_scores", _poke(-0.5, 4), "negative attention mass"),
    "negative_tail_score": ("layer0.tail_score", _poke(-1e-3, 2), "negative attention mass"),
    "short_last_logits": ("last_logits", lambda t: t[:-1], "vocabulary has 97"),
    "long_last_logits": ("last_logits", lambda t: torch.cat([t, t[:5]]), "vocabulary has 97"),
}


@pytest.mark.parametrize("case", list(VALUES))
def test_tensor_values_are_checked_behind_valid_checksums(
    snap: dict[str, Any], tmp_path: Path, case: str
) -> None:
    name, make, message = VALUES[case]
    target = _copy(snap, tmp_path / case)
    _rewrite(target, name, make)
    _refused(snap, target, message)


def test_the_rewrite_helper_alone_keeps_the_snapshot_loadable(
    snap: dict[str, Any], tmp_path: Path
) -> None:
    """The refusals above are the damage's doing, not the helper's."""
    target = _copy(snap, tmp_path / "rewritten")
    _rewrite(target, "layer0.block_k", lambda t: t)
    assert snap["engine"].load_session(target).token_ids == snap["session"].token_ids


def _load_in_thread(engine: InfLLMEngine, target: Path, seconds: float = 20.0) -> BaseException:
    """Load in a thread; the test fails (rather than hangs) if the load blocks."""
    box: list[BaseException] = []

    def load() -> None:
        try:
            engine.load_session(target, session_id="intruder")
        except BaseException as exc:  # handed to the test
            box.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():  # unblock a reader stuck on a FIFO, then fail
        for name in (persistence.MANIFEST, persistence.TENSORS):
            fifo = target / name
            if fifo.is_fifo():
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
        worker.join(5)
        pytest.fail(f"loading {target} blocked")
    assert box, "a snapshot with a special file loaded"
    return box[0]


@pytest.mark.parametrize("name", [persistence.MANIFEST, persistence.TENSORS])
def test_fifo_in_a_snapshot_fails_fast(snap: dict[str, Any], tmp_path: Path, name: str) -> None:
    target = _copy(snap, tmp_path / "fifo")
    (target / name).unlink()
    os.mkfifo(target / name)
    exc = _load_in_thread(snap["engine"], target)
    assert isinstance(exc, SessionFileError) and "FIFO" in str(exc) and name in str(exc)
    _assert_good_snapshot_loads(snap)


def test_symlink_to_a_device_fails_fast(snap: dict[str, Any], tmp_path: Path) -> None:
    target = _copy(snap, tmp_path / "device")
    (target / persistence.MANIFEST).unlink()
    (target / persistence.MANIFEST).symlink_to("/dev/null")
    exc = _load_in_thread(snap["engine"], target)
    assert isinstance(exc, SessionFileError) and "character device" in str(exc)
    _assert_good_snapshot_loads(snap)


def test_socket_at_the_manifest_fails_fast(snap: dict[str, Any]) -> None:
    short = Path(tempfile.mkdtemp(prefix="sk"))  # unix socket paths are short
    try:
        target = _copy(snap, short / "s")
        (target / persistence.MANIFEST).unlink()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(target / persistence.MANIFEST))
            exc = _load_in_thread(snap["engine"], target)
        assert isinstance(exc, SessionFileError) and "socket" in str(exc)
    finally:
        shutil.rmtree(short)
    _assert_good_snapshot_loads(snap)


def test_oversized_manifest_is_refused_before_it_is_read(
    snap: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trailing spaces keep the JSON (and its content checksum) valid, so only the size
    bound refuses it; and it is refused from its size, without reading it."""
    target = _copy(snap, tmp_path / "huge")
    manifest = target / persistence.MANIFEST
    cap = persistence.manifest_cap(snap["engine"], (target / persistence.TENSORS).stat().st_size)
    assert cap < 8 << 20, "the cap must be a few MiB for a small session"
    with open(manifest, "ab") as fh:
        fh.truncate(cap + 1)
        fh.seek(0, os.SEEK_END)
    data = manifest.read_bytes().replace(b"\0", b" ")
    manifest.write_bytes(data)
    assert json.loads(data)["token_ids"] == snap["session"].token_ids  # still valid JSON
    reads: list[int] = []
    real_fdopen = os.fdopen

    def spy(fd: int, *args: Any, **kwargs: Any) -> Any:
        fh = real_fdopen(fd, *args, **kwargs)
        reads.append(fd)
        return fh

    monkeypatch.setattr(os, "fdopen", spy)
    with pytest.raises(SessionFileError, match="too large"):
        persistence.read_manifest(target, cap)
    assert not reads, "the oversized manifest was opened and read"
    monkeypatch.undo()
    _refused(snap, target, "too large")


def test_manifest_read_is_bounded_even_if_it_grows(snap: dict[str, Any], tmp_path: Path) -> None:
    """A file that grows after its size was checked still yields at most the cap."""
    target = _copy(snap, tmp_path / "grows")
    size = (target / persistence.MANIFEST).stat().st_size
    real_stat = persistence._regular_size

    def smaller(folder: Path, name: str) -> int | None:
        got = real_stat(folder, name)
        return 10 if name == persistence.MANIFEST else got

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(persistence, "_regular_size", smaller)
        with pytest.raises(SessionFileError, match="too large"):
            persistence.read_manifest(target, size - 1)
    assert persistence.read_manifest(target, size)["token_ids"] == snap["session"].token_ids


def test_a_long_session_is_within_the_cap(snap: dict[str, Any], tmp_path: Path) -> None:
    """The cap grows with the tensors: a real long session never hits it."""
    engine: InfLLMEngine = snap["engine"]
    session = Session(engine)
    session.append([i % VOCAB for i in range(700)])
    path = session.save(tmp_path / "long")
    size = (path / persistence.MANIFEST).stat().st_size
    cap = persistence.manifest_cap(engine, (path / persistence.TENSORS).stat().st_size)
    assert cap - persistence.MANIFEST_BASE_BYTES >= 16 * 700 > size // 2
    assert engine.load_session(path).token_ids == session.token_ids
