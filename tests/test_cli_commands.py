"""The terminal chat's /save and /load at function level (issue 14, classes 1 and 6).

A bad /load (missing path, corrupt snapshot, a messages file that is not ours) prints
one error line and leaves the conversation and its engine session exactly as they were;
/save never overwrites what it did not write. Tiny random model, no tokenizer needed:
the session is fed token ids directly and only /save and /load are exercised.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage

from langchain_infllm import InfLLMConfig, InfLLMEngine
from langchain_infllm.chat import MESSAGES_FILE, SESSION_DIR, ChatCLI
from langchain_infllm.chat_models import ChatInfLLM
from tests.shared_configs import TINY_ALL_BLOCKS
from tests.tiny_models import tiny_pair

SETTINGS: dict[str, Any] = dict(TINY_ALL_BLOCKS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cli() -> ChatCLI:
    model, _ = tiny_pair("llama", seed=4)
    engine = InfLLMEngine(model, None, InfLLMConfig(**SETTINGS))
    chat = ChatInfLLM(engine=engine, model="tiny")
    cli = ChatCLI(chat=chat, engine=engine, out=io.StringIO())
    rng = random.Random(4)
    engine.session(cli.session_id).append([rng.randrange(97) for _ in range(41)])
    cli.messages = [HumanMessage("hello"), AIMessage("hi there")]
    cli.turns = 1
    return cli


def _state(cli: ChatCLI) -> tuple[list[int], list[Any], int, Any]:
    session = cli.engine.session(cli.session_id)
    logits = session.last_logits
    return (session.token_ids, list(cli.messages), cli.turns,
            None if logits is None else logits.clone())


def _said(cli: ChatCLI) -> str:
    out = cli.out
    assert isinstance(out, io.StringIO)
    return out.getvalue()


def _saved_other(cli: ChatCLI, folder: Path) -> None:
    """A valid /save of a different conversation, to corrupt in the tests."""
    engine = cli.engine
    other = ChatCLI(chat=cli.chat, engine=engine, session_id="other", out=io.StringIO())
    engine.session("other").append([3, 1, 4, 1, 5, 9, 2, 6] * 5)
    other.messages = [HumanMessage("something else")]
    assert other.handle(f"/save {folder}")
    assert "saved" in _said(other)


def _damage_tensors(folder: Path) -> None:
    tensors = folder / SESSION_DIR / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])


def _payload(folder: Path, **changes: Any) -> None:
    path = folder / MESSAGES_FILE
    payload = json.loads(path.read_text())
    payload.update(changes)
    path.write_text(json.dumps(payload))


BAD_LOADS: dict[str, Callable[[Path], None]] = {
    "missing-folder": lambda f: None,
    "corrupt-snapshot": _damage_tensors,
    "snapshot-missing": lambda f: [
        os.remove(p) for p in (f / SESSION_DIR).iterdir()
    ] and os.rmdir(f / SESSION_DIR),
    "messages-not-json": lambda f: (f / MESSAGES_FILE).write_text("{not json"),
    "messages-a-folder": lambda f: [os.remove(f / MESSAGES_FILE), os.mkdir(f / MESSAGES_FILE)],
    "messages-a-fifo": lambda f: [os.remove(f / MESSAGES_FILE), os.mkfifo(f / MESSAGES_FILE)],
    "foreign-format": lambda f: _payload(f, format="something/1"),
    "turns-not-int": lambda f: _payload(f, turns="three"),
    "messages-not-list": lambda f: _payload(f, messages="hello"),
    "messages-bogus-type": lambda f: _payload(f, messages=[{"type": "bogus", "data": {}}]),
}


@pytest.mark.parametrize("case", list(BAD_LOADS))
def test_bad_load_reports_and_keeps_the_old_session(
    cli: ChatCLI, tmp_path: Path, case: str
) -> None:
    folder = tmp_path / "saved"
    if case != "missing-folder":
        _saved_other(cli, folder)
    BAD_LOADS[case](folder)
    before = _state(cli)
    assert cli.handle(f"/load {folder}") is True, "a bad /load ended the chat"
    said = _said(cli).strip().splitlines()
    assert said and said[-1].startswith("error: "), said
    after = _state(cli)
    assert after[:3] == before[:3], "a failed /load changed the conversation or session"
    assert before[3] is not None and after[3] is not None and torch.equal(before[3], after[3])


def test_save_then_load_round_trips(cli: ChatCLI, tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    before = _state(cli)
    assert cli.handle(f"/save {folder}")
    cli.messages, cli.turns = [], 0
    cli.engine.sessions.drop(cli.session_id)
    assert cli.handle(f"/load {folder}")
    assert "loaded 2 messages, 41 tokens" in _said(cli)
    assert _state(cli)[:3] == before[:3]
    assert cli.handle(f"/save {folder}")  # over its own save: allowed, and atomic
    assert sorted(os.listdir(folder)) == [MESSAGES_FILE, SESSION_DIR]


def test_save_keeps_a_session_folder_it_did_not_write(cli: ChatCLI, tmp_path: Path) -> None:
    folder = tmp_path / "project"
    (folder / SESSION_DIR).mkdir(parents=True)
    (folder / SESSION_DIR / "minutes.txt").write_text("meeting notes")
    assert cli.handle(f"/save {folder}")
    assert _said(cli).strip().splitlines()[-1].startswith("error: ")
    assert (folder / SESSION_DIR / "minutes.txt").read_text() == "meeting notes"
    assert sorted(os.listdir(folder / SESSION_DIR)) == ["minutes.txt"]
    assert not (folder / MESSAGES_FILE).exists()


def test_save_keeps_a_messages_file_it_did_not_write(cli: ChatCLI, tmp_path: Path) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / MESSAGES_FILE).write_text('{"my": "data"}')
    assert cli.handle(f"/save {folder}")
    assert _said(cli).strip().splitlines()[-1].startswith("error: ")
    assert (folder / MESSAGES_FILE).read_text() == '{"my": "data"}'
    assert sorted(os.listdir(folder)) == [MESSAGES_FILE], "save wrote next to foreign data"
