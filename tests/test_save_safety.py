"""Saving never destroys what it did not create, and a crash at any instant of a save
leaves a path that loads the old snapshot or the new one (issue 14, class 1).

Each test fails without its protection: foreign folders and files at the path are kept
byte for byte; a subprocess is killed (``os._exit``) at every step of a save in turn
and the path is loaded afterwards; threads save to one path at once.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from langchain_infllm import InfLLMConfig, InfLLMEngine
from langchain_infllm.engine import Session, SessionFileError, persistence
from tests.shared_configs import TINY_ALL_BLOCKS
from tests.tiny_models import tiny_pair

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 97
SETTINGS: dict[str, Any] = dict(TINY_ALL_BLOCKS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine() -> InfLLMEngine:
    model, _ = tiny_pair("llama", seed=3)
    return InfLLMEngine(model, None, InfLLMConfig(**SETTINGS))


def _session(engine: InfLLMEngine, n: int, seed: int) -> Session:
    rng = random.Random(seed)
    session = engine.new_session()
    session.append([rng.randrange(VOCAB) for _ in range(n)])
    return session


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` with its bytes (None for folders)."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


# ------------------------------------------------------------------- foreign content
@pytest.mark.parametrize(
    "files",
    [
        {"notes.txt": b"my notes"},
        {"manifest.json": b'{"name": "my web app"}', "index.html": b"<html/>"},
        {"manifest.json": b'{"name": "my web app"}'},  # a manifest, but not ours
        {"tensors.safetensors": b"weights I trained"},
    ],
    ids=["user-files", "foreign-manifest", "foreign-manifest-alone", "tensors-alone"],
)
def test_save_refuses_a_folder_it_did_not_write(
    engine: InfLLMEngine, tmp_path: Path, files: dict[str, bytes]
) -> None:
    target = tmp_path / "work"
    target.mkdir()
    for name, data in files.items():
        (target / name).write_bytes(data)
    before = _tree(tmp_path)
    with pytest.raises(FileExistsError, match="not a session snapshot"):
        _session(engine, 30, 1).save(target)
    assert _tree(tmp_path) == before, "save changed a folder it did not write"


def test_save_refuses_a_snapshot_with_user_files_added(
    engine: InfLLMEngine, tmp_path: Path
) -> None:
    target = _session(engine, 30, 1).save(tmp_path / "snap")
    (target / "README.txt").write_text("what this snapshot is")
    before = _tree(tmp_path)
    with pytest.raises(FileExistsError, match="not a session snapshot"):
        _session(engine, 40, 2).save(target)
    assert _tree(tmp_path) == before


def test_save_refuses_a_file_at_the_path(engine: InfLLMEngine, tmp_path: Path) -> None:
    target = tmp_path / "thesis.tex"
    target.write_bytes(b"\\documentclass{article}")
    with pytest.raises(FileExistsError, match="not a folder"):
        _session(engine, 30, 1).save(target)
    assert sorted(os.listdir(tmp_path)) == ["thesis.tex"], "the file was moved aside"
    assert target.read_bytes() == b"\\documentclass{article}"


def test_save_into_an_empty_folder_and_over_its_own_snapshot(
    engine: InfLLMEngine, tmp_path: Path
) -> None:
    target = tmp_path / "snap"
    target.mkdir()
    first, second = _session(engine, 30, 1), _session(engine, 45, 2)
    first.save(target)
    assert engine.load_session(target).token_ids == first.token_ids
    second.save(target)
    assert engine.load_session(target).token_ids == second.token_ids
    assert sorted(os.listdir(tmp_path)) == ["snap"], "debris left next to the snapshot"


# ------------------------------------------------------------------- crash at any step
CRASH_SCRIPT = r"""
import json, os, random, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from langchain_infllm import InfLLMConfig, InfLLMEngine
from langchain_infllm.engine import SessionFileError, persistence
from tests.tiny_models import tiny_pair

root = Path(sys.argv[1])
settings = json.loads(sys.argv[2])
engine = InfLLMEngine(tiny_pair("llama", seed=3)[0], None, InfLLMConfig(**settings))
rng = random.Random(5)
old = engine.new_session("old")
old.append([rng.randrange(97) for _ in range(40)])
new = engine.new_session("new")
new.append([rng.randrange(97) for _ in range(57)])
results = []
for existing in (True, False):
    k = 0
    while True:
        work = root / f"{int(existing)}-{k}"
        work.mkdir()
        path = work / "snap"
        if existing:
            old.save(path)
        marker = root / f"{int(existing)}-{k}.step"
        pid = os.fork()
        if pid == 0:  # the saver: killed without any clean-up at its k-th step
            seen = [0]
            def hook(name, seen=seen, k=k, marker=marker):
                if seen[0] == k:
                    marker.write_text(name)
                    os._exit(17)
                seen[0] += 1
            try:
                persistence.save_session(new, path, on_step=hook)
            except BaseException:
                os._exit(1)
            os._exit(0)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        try:
            got = engine.load_session(path).token_ids
            loaded = {tuple(old.token_ids): "old", tuple(new.token_ids): "new"}.get(
                tuple(got), "other")
        except SessionFileError:
            loaded = "nothing"
        new.save(path)  # a later save recovers whatever the crash left
        after = engine.load_session(path).token_ids == new.token_ids
        results.append({
            "existing": existing, "k": k, "code": code, "loaded": loaded, "after": after,
            "step": marker.read_text() if marker.exists() else None,
            "debris": sorted(os.listdir(work)),
        })
        if code != 17:
            break
        k += 1
print("RESULTS " + json.dumps(results))
"""


def test_crash_at_every_step_of_save_leaves_old_or_new(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(tmp_path), json.dumps(SETTINGS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    for existing, allowed in ((True, {"old", "new"}), (False, {"nothing", "new"})):
        runs = [r for r in results if r["existing"] is existing]
        assert runs[-1]["code"] == 0 and runs[-1]["loaded"] == "new", runs[-1]
        crashed = runs[:-1]
        assert len(crashed) >= 4, f"too few steps reached: {crashed}"
        for r in crashed:
            assert r["code"] == 17, r
            assert r["loaded"] in allowed, f"crash at step {r['k']} ({r['step']}): {r}"
        if existing:  # the crash points straddle the renames: both outcomes were seen
            assert {r["loaded"] for r in crashed} == allowed, crashed
    steps = {r["step"] for r in results if r["existing"]}
    assert {"rename old", "rename staging"} <= steps, steps
    for r in results:
        assert r["after"], f"the save after a crash at {r['step']} did not recover: {r}"
        assert r["debris"] == ["snap"], f"debris after the crash at {r['step']}: {r}"


def test_load_after_a_crash_between_the_renames_reads_the_old_snapshot(
    engine: InfLLMEngine, tmp_path: Path
) -> None:
    """The state a crash between the renames leaves: only `.NAME.old` and `.NAME.new`."""
    old, new = _session(engine, 30, 1), _session(engine, 45, 2)
    path = old.save(tmp_path / "snap")
    staged = new.save(tmp_path / "staged")
    os.rename(path, tmp_path / ".snap.old")
    os.rename(staged, tmp_path / ".snap.new")
    assert engine.load_session(path).token_ids == old.token_ids
    new.save(path)
    assert engine.load_session(path).token_ids == new.token_ids
    assert sorted(os.listdir(tmp_path)) == ["snap"]


# ------------------------------------------------------------------- concurrent saves
def test_concurrent_saves_to_one_path(engine: InfLLMEngine, tmp_path: Path) -> None:
    sessions = [_session(engine, 20 + 7 * i, i) for i in range(4)]
    target = tmp_path / "snap"
    errors: list[BaseException] = []
    start = threading.Barrier(len(sessions))

    def work(session: Session) -> None:
        try:
            start.wait()
            for _ in range(6):
                session.save(target)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    loaded = engine.load_session(target).token_ids
    assert loaded in [s.token_ids for s in sessions]
    assert sorted(os.listdir(tmp_path)) == ["snap"]
    assert persistence.read_manifest(target)["token_ids"] == loaded


def test_loading_a_path_never_saved_to_is_refused(engine: InfLLMEngine, tmp_path: Path) -> None:
    """The recovery rule invents nothing: no snapshot, no backup, no session."""
    with pytest.raises(SessionFileError, match=r"no manifest\.json"):
        engine.load_session(tmp_path / "never-saved")
