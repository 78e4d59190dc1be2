"""The interactive chat (``python -m langchain_infllm.chat``) driven through a pseudo-terminal.

SmolLM2-135M on CPU; a real terminal (``pty``) so that Ctrl-C and Ctrl-D arrive the way
they do for a user.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["--model-path", "smollm2-135m-instruct"]
CONFIG = ["--inf-llm-config-path", str(ROOT / "config/smollm2-cpu.yaml")]
TURN = re.compile(
    r"\[turn (\d+): reused (\d+) tokens, computed (\d+), generated (\d+); context (\d+) tokens"
)
PROMPT = "you> "
LOAD_TIMEOUT = 120.0
REPLY_TIMEOUT = 90.0


class Terminal:
    """A child process on a pseudo-terminal, with expect-style reading."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env["TERM"] = "dumb"
        argv = [sys.executable, "-m", "langchain_infllm.chat", *args]
        pid, fd = pty.fork()
        if pid == 0:  # child: never return into pytest
            try:
                os.chdir(ROOT)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.output = ""
        self.position = 0
        self.status: int | None = None

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            return False
        self.output += data.decode("utf-8", "replace").replace("\r\n", "\n")
        return True

    def expect(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait for ``pattern`` after what earlier expects consumed."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, self.position)
            if match is not None:
                self.position = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(min(remaining, 1.0)):
                if match := regex.search(self.output, self.position):
                    self.position = match.end()
                    return match
                raise AssertionError(
                    f"no {regex.pattern!r} within {timeout} s; output:\n{self.output[-3000:]}"
                )

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def line(self, text: str) -> None:
        self.send(text + "\n")

    def turn(self, text: str) -> tuple[int, int, int, int, int]:
        """Send a message; return (turn, reused, computed, generated, context)."""
        self.expect(re.escape(PROMPT), REPLY_TIMEOUT)
        self.line(text)
        match = self.expect(TURN, REPLY_TIMEOUT)
        turn, reused, computed, generated, context = (int(g) for g in match.groups())
        return turn, reused, computed, generated, context

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.2)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
        raise AssertionError(f"the chat did not exit; output:\n{self.output[-3000:]}")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    term = Terminal(*MODEL, *CONFIG, "--max-tokens", "12")
    try:
        term.expect(r"loaded in [\d.]+ s", LOAD_TIMEOUT)
        yield term
    finally:
        term.close()


@pytest.mark.real_model
def test_turns_reuse_stats_save_load_reset(terminal: Terminal, tmp_path: Path) -> None:
    term = terminal
    n1, reused1, computed1, generated1, context1 = term.turn("Hi! My name is Ada.")
    assert (n1, reused1) == (1, 0) and computed1 > 0 and 0 < generated1 <= 12
    assert context1 == computed1 + generated1
    n2, reused2, computed2, _, context2 = term.turn("What is my name?")
    # The second turn reused everything the first one left in the session.
    assert n2 == 2 and reused2 >= context1 and computed2 < computed1 + 10

    term.expect(re.escape(PROMPT), REPLY_TIMEOUT)
    term.line("/stats")
    assert int(term.expect(r"\[stats\] tokens: (\d+)", 10).group(1)) == context2
    assert int(term.expect(r"\[stats\] tokens_reused: (\d+)", 10).group(1)) == reused2

    saved = tmp_path / "chat"
    term.expect(re.escape(PROMPT), 10)
    term.line(f"/save {saved}")
    assert int(term.expect(r"\[saved 4 messages, (\d+) tokens", 60).group(1)) == context2

    term.expect(re.escape(PROMPT), 10)
    term.line("/reset")
    term.expect(r"\[conversation reset\]", 10)
    _, reused_after_reset, *_ = term.turn("Hello again.")
    assert reused_after_reset == 0  # a fresh session

    term.expect(re.escape(PROMPT), 10)
    term.line(f"/load {saved}")
    assert int(term.expect(r"\[loaded 4 messages, (\d+) tokens", 60).group(1)) == context2
    _, reused3, *_ = term.turn("And what did I ask you first?")
    assert reused3 >= context2  # the loaded session continues without recomputing

    term.expect(re.escape(PROMPT), 10)
    term.line(f"/load {tmp_path / 'missing'}")
    term.expect(r"error: .*missing holds no saved chat", 10)
    term.expect(re.escape(PROMPT), 10)
    term.line("/help")
    term.expect(r"/save PATH", 10)
    term.expect(re.escape(PROMPT), 10)
    term.send("\x04")  # Ctrl-D at the prompt quits
    assert term.wait(30) == 0


@pytest.mark.real_model
def test_ctrl_c_interrupts_reply_and_keeps_session(tmp_path: Path) -> None:
    term = Terminal(*MODEL, *CONFIG, "--max-tokens", "400")
    try:
        term.expect(r"loaded in [\d.]+ s", LOAD_TIMEOUT)
        term.expect(re.escape(PROMPT), 10)
        term.line("Write a long story about a dragon who learns to bake bread.")
        term.expect(r"assistant: \S+ \S+ \S+", REPLY_TIMEOUT)
        term.send("\x03")  # Ctrl-C, as the terminal's line discipline delivers it
        held = int(term.expect(r"interrupted; the session holds (\d+) tokens", 180).group(1))
        # The chat is still usable and continues the interrupted session.
        n, reused, *_ = term.turn("Summarise it in five words.")
        assert n == 2 and reused > 0 and reused >= held - 4, term.output[-2000:]
        term.expect(re.escape(PROMPT), 10)
        term.line("/quit")
        assert term.wait(30) == 0
    finally:
        term.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*MODEL, "--inf-llm-config-path", "config/no-such.yaml"], "config file not found"),
        ([*MODEL, "--config", "{bad}"], "block_size: Input should be greater than 0"),
        (["--model", "./no/such/model", *CONFIG], "model folder not found"),
    ],
)
def test_bad_paths_fail_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  type: inf-llm\n  block_size: -1\n")
    done = subprocess.run(
        [sys.executable, "-m", "langchain_infllm.chat", *(a.format(bad=bad) for a in args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
