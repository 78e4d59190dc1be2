"""Every script in examples/ runs on the embedded small models and does what it says.

Each example runs in a subprocess with one torch thread (the machine is shared; several
threads per process slow everything down) and a small token budget.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
QWEN = ["--model", "qwen2.5-coder-0.5b-instruct", "--config", str(ROOT / "config/cpu-small.yaml")]
SMOL = ["--model", "smollm2-135m-instruct", "--config", str(ROOT / "config/smollm2-cpu.yaml")]
TIMEOUT = 240


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def ints(pattern: str, text: str) -> list[int]:
    return [int(x) for x in re.findall(pattern, text)]


def test_every_example_is_tested() -> None:
    tested = {
        "quickstart.py",
        "streaming_with_traces.py",
        "tool_calling.py",
        "structured_output.py",
        "save_and_resume.py",
        "langgraph_checkpointer.py",
        "serve_openai_client.py",
    }
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested
    for path in EXAMPLES.glob("*.py"):
        source = path.read_text()
        assert source.startswith('"""'), f"{path.name} needs a module docstring"
        assert '"--model"' in source and '"--config"' in source, path.name


def test_quickstart() -> None:
    out = run_example("quickstart.py", *QWEN, "--max-tokens", "16")
    (cache_read,) = ints(r"'cache_read': (\d+)", out[out.index("usage:") :])
    assert cache_read > 0, out  # the second call reused the first call's prompt


def test_streaming_with_traces() -> None:
    out = run_example("streaming_with_traces.py", *SMOL, "--max-tokens", "8")
    # The handler printed the retrieval summary of the streamed call ...
    (retrievals,) = ints(r"\[retrieval\] retrievals=(\d+)", out)
    assert retrievals > 0, out
    # ... and the last chunk carried the same summary in response_metadata["infllm"].
    info = json.loads(out[out.index("infllm:") + len("infllm:") :])
    assert info["retrievals"] == retrievals
    assert info["blocks_in_memory"] > 0 and info["tokens_computed"] > 1024
    assert 0 < info["tokens_generated"] <= 8


def test_tool_calling() -> None:
    out = run_example("tool_calling.py", *QWEN, "--max-tokens", "40")
    # Both tools were called with the right arguments and their results came back.
    assert "tool get_weather({'city': 'Paris'}) -> sunny, 24 C" in out, out
    assert "tool multiply({'a': 37, 'b': 23}) -> 851" in out, out
    answers = [line for line in out.splitlines() if line.startswith("assistant:")]
    assert len(answers) == 2 and "24" in answers[0] and "851" in answers[1], out
    # The second question's tool step reused the first question's prefix.
    reads = ints(r"cache_read=(\d+)", out)
    assert reads[2] > 200, out


def test_structured_output() -> None:
    out = run_example("structured_output.py", *QWEN)
    payload = json.loads(out[out.index("json:") + len("json:") :])
    assert set(payload) == {"name", "age", "city"}
    assert isinstance(payload["age"], int)
    assert "Garcia" in payload["name"] and payload["city"] == "Madrid", out


def test_save_and_resume(tmp_path: Path) -> None:
    out = run_example("save_and_resume.py", *SMOL, "--max-tokens", "12", "--dir", str(tmp_path))
    assert (tmp_path / "session" / "manifest.json").is_file()
    (saved,) = ints(r"\[build\] saved (\d+) context tokens", out)
    (loaded,) = ints(r"\[resume\] loaded (\d+) context tokens", out)
    (cache_read,) = ints(r"\[resume\] cache_read=(\d+)", out)
    assert loaded == saved
    # The fresh process reused the saved prefix instead of recomputing it.
    assert cache_read > 0 and cache_read >= saved - 2, out


def test_langgraph_checkpointer() -> None:
    out = run_example("langgraph_checkpointer.py", *SMOL, "--max-tokens", "8")
    rows = re.findall(
        r"\[(\w+)\] session=(\S+) messages=(\d+) cache_read=(\d+) cache_creation=\d+ "
        r"context_tokens=(\d+)",
        out,
    )
    assert [r[0] for r in rows] == ["alice", "bob", "alice", "bob"], out
    sessions = {thread: session for thread, session, *_ in rows}
    assert sessions["alice"] != sessions["bob"]
    (_, _, _, a1_read, a1_ctx), (_, _, _, b1_read, b1_ctx), a2, b2 = rows
    assert int(a1_read) == 0 and int(b1_read) == 0  # bob did not start from alice's session
    # Each thread's second turn reused all of its own first turn, though the other ran since.
    assert int(a2[3]) >= int(a1_ctx) - 1 and int(b2[3]) >= int(b1_ctx) - 1, out
    assert a2[2] == b2[2] == "4"  # the checkpointer kept both histories


def test_serve_openai_client() -> None:
    out = run_example("serve_openai_client.py", *SMOL, "--max-tokens", "8")
    found = re.search(r"second turn: prompt_tokens=(\d+) cached_tokens=(\d+)", out)
    assert found is not None, out
    prompt, cached = int(found[1]), int(found[2])
    assert 0 < cached < prompt, out  # the second turn of the session reused the first
    info = json.loads(out[out.index("infllm:") + len("infllm:") :].splitlines()[0])
    assert info["session_id"] == "demo" and info["tokens_reused"] == cached
    assert "ChatOpenAI:" in out, out
