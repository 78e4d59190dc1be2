"""Interactive terminal chat on a persistent InfLLM session.

    python -m langchain_infllm.chat --model-path qwen2.5-coder-0.5b-instruct \\
        --inf-llm-config-path config/cpu-small.yaml

Replies stream as they are generated. The conversation lives in one engine session, so
each turn computes only its new tokens; a status line after every reply says how many
prompt tokens were reused and how many computed. Ctrl-C during a reply stops it (what
was said so far stays in the conversation); Ctrl-D or ``/quit`` leaves.

Sampling starts from the model's own ``generation_config`` (temperature, top_p,
repetition penalty); a model that ships no repetition penalty gets
:data:`CHAT_REPETITION_PENALTY`, so a small model does not loop on one sentence.

Commands: ``/reset``, ``/save PATH``, ``/load PATH``, ``/stats``, ``/help``, ``/quit``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import signal
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    message_chunk_to_message,
    messages_from_dict,
    messages_to_dict,
)

from langchain_infllm.config import ConfigError, InfLLMConfig, model_path_from_yaml
from langchain_infllm.engine.persistence import SessionFileError

if TYPE_CHECKING:
    from langchain_infllm.chat_models import ChatInfLLM
    from langchain_infllm.engine import InfLLMEngine

CHAT_REPETITION_PENALTY = 1.1
"""Penalty for models whose generation config has none (HF's common chat value)."""

logger = logging.getLogger(__name__)

DEFAULT_SESSION_ID = "cli"
SESSION_DIR = "session"
MESSAGES_FILE = "messages.json"
FORMAT = "langchain-infllm.chat/1"
POLL_SECONDS = 0.05

HELP = """\
Commands:
  /reset        forget the conversation (and its engine session)
  /save PATH    save the conversation and its context memory to the folder PATH
  /load PATH    load a conversation saved with /save (same model and config)
  /stats        session counters: tokens held, computed, reused, memory blocks
  /help         this text
  /quit         leave (Ctrl-D does too)
Ctrl-C during a reply stops the reply; the conversation keeps what was said."""


class ChatCLIError(Exception):
    """A problem to report to the user in one line (no traceback)."""


# ============================================================================ turns


@dataclass
class TurnResult:
    """What one streamed reply produced."""

    text: str = ""
    message: AIMessage | None = None
    last: AIMessageChunk | None = None
    interrupted: bool = False
    error: BaseException | None = None


def stream_reply(
    chat: ChatInfLLM,
    messages: Sequence[BaseMessage],
    write: Callable[[str], None],
) -> TurnResult:
    """Stream one reply, writing text as it comes; Ctrl-C stops it cleanly.

    The model runs in a worker thread and the main thread only prints, so a Ctrl-C
    (delivered to the main thread) never lands inside the engine: it asks the worker
    to stop after its current token, and the stream is closed there. The engine session
    then holds the prompt plus exactly the tokens generated so far.
    """
    chunks: queue.Queue[tuple[str, Any]] = queue.Queue()
    stop = threading.Event()
    history = list(messages)

    def work() -> None:
        stream = chat.stream(history)
        try:
            for chunk in stream:
                chunks.put(("chunk", chunk))
                if stop.is_set():
                    break
        except Exception as exc:  # reported by the main thread
            chunks.put(("error", exc))
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # runs the model's cleanup in this thread, not the main one
            chunks.put(("done", None))

    worker = threading.Thread(target=work, name="infllm-chat-reply", daemon=True)
    worker.start()
    result = TurnResult()
    aggregate: AIMessageChunk | None = None
    finished = False
    while not finished:
        try:
            try:
                kind, value = chunks.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if kind == "chunk":
                aggregate = value if aggregate is None else aggregate + value
                if value.chunk_position == "last":
                    result.last = value
                if value.text:
                    result.text += value.text
                    write(value.text)
            elif kind == "error":
                result.error = value
            else:
                finished = True
        except KeyboardInterrupt:
            stop.set()
            result.interrupted = True
    worker.join()
    if result.interrupted or aggregate is None or result.error is not None:
        result.message = AIMessage(content=result.text) if result.text else None
    else:
        message = message_chunk_to_message(aggregate)
        result.message = message if isinstance(message, AIMessage) else None
    return result


def format_turn_stats(turn: int, last: AIMessageChunk) -> str:
    """One status line: prompt tokens reused / computed, tokens generated, timings."""
    usage: dict[str, Any] = dict(last.usage_metadata or {})
    details: dict[str, Any] = dict(usage.get("input_token_details") or {})
    info = last.response_metadata.get("infllm", {})
    return (
        f"[turn {turn}: reused {details.get('cache_read', 0)} tokens, "
        f"computed {details.get('cache_creation', 0)}, "
        f"generated {usage.get('output_tokens', 0)}; "
        f"context {info.get('context_tokens', '?')} tokens; "
        f"prefill {float(info.get('prefill_seconds', 0.0)):.2f} s, "
        f"decode {float(info.get('decode_seconds', 0.0)):.2f} s]"
    )


# ============================================================================ the chat


@dataclass
class ChatCLI:
    """The conversation, its engine session and the slash commands."""

    chat: ChatInfLLM
    engine: InfLLMEngine
    session_id: str = DEFAULT_SESSION_ID
    system: str | None = None
    out: TextIO = field(default_factory=lambda: sys.stdout)
    messages: list[BaseMessage] = field(default_factory=list)
    turns: int = 0

    def __post_init__(self) -> None:
        self.messages = self._initial_messages()

    # ------------------------------------------------------------------ output
    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def say(self, text: str) -> None:
        self.write(text + "\n")

    # ------------------------------------------------------------------ turns
    def _initial_messages(self) -> list[BaseMessage]:
        return [SystemMessage(self.system)] if self.system else []

    def ask(self, text: str) -> None:
        """One user turn: stream the reply and report what was reused."""
        self.messages.append(HumanMessage(text))
        self.write("assistant: ")
        result = stream_reply(self.chat, self.messages, self.write)
        self.write("\n")
        if result.error is not None:
            self.messages.pop()  # the turn failed; the session is still consistent
            self.say(f"error: {type(result.error).__name__}: {result.error}")
            return
        if result.message is not None:
            self.messages.append(result.message)
        else:
            self.messages.pop()
        self.turns += 1
        if result.interrupted or result.last is None:
            held = len(self.engine.session(self.session_id))
            self.say(f"[turn {self.turns}: interrupted; the session holds {held} tokens]")
        else:
            self.say(format_turn_stats(self.turns, result.last))

    # ------------------------------------------------------------------ commands
    def handle(self, line: str) -> bool:
        """Run one input line; False means quit."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.ask(line)
            return True
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        commands: dict[str, Callable[[str], bool | None]] = {
            "/reset": self.cmd_reset,
            "/save": self.cmd_save,
            "/load": self.cmd_load,
            "/stats": self.cmd_stats,
            "/help": self.cmd_help,
            "/quit": self.cmd_quit,
            "/exit": self.cmd_quit,
        }
        action = commands.get(command)
        if action is None:
            self.say(f"unknown command {command}; /help lists the commands")
            return True
        try:
            return action(argument) is not False
        except ChatCLIError as exc:
            self.say(f"error: {exc}")
            return True
        except Exception as exc:  # a command never ends the chat; its state is unchanged
            logger.debug("command %s failed", command, exc_info=True)
            self.say(f"error: {command} failed: {type(exc).__name__}: {exc}")
            return True

    def cmd_help(self, _: str) -> None:
        self.say(HELP)

    def cmd_quit(self, _: str) -> bool:
        return False

    def cmd_reset(self, _: str) -> None:
        self.engine.sessions.drop(self.session_id)
        self.messages = self._initial_messages()
        self.turns = 0
        self.say("[conversation reset]")

    def cmd_stats(self, _: str) -> None:
        stats = self.engine.session(self.session_id).stats()
        self.say(f"[stats] model: {self.chat.model_name}; session: {self.session_id}")
        self.say(f"[stats] turns: {self.turns}; messages: {len(self.messages)}")
        for key in (
            "tokens",
            "blocks",
            "tokens_computed",
            "tokens_reused",
            "cache_hits",
            "cache_misses",
            "host_bytes",
            "device_bytes",
        ):
            self.say(f"[stats] {key}: {stats.get(key)}")

    def cmd_save(self, argument: str) -> None:
        if not argument:
            raise ChatCLIError("usage: /save PATH")
        folder = Path(argument).expanduser()
        session = self.engine.session(self.session_id)
        if len(session) == 0:
            raise ChatCLIError("nothing to save yet")
        payload = {
            "format": FORMAT,
            "model": self.chat.model_name,
            "turns": self.turns,
            "messages": messages_to_dict(self.messages),
        }
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _check_ours(folder / MESSAGES_FILE)  # before anything is written
            # The snapshot refuses a session/ folder it did not write, and replaces its
            # own atomically; messages.json is replaced atomically too.
            session.save(folder / SESSION_DIR)
            _write_atomically(folder / MESSAGES_FILE, json.dumps(payload))
        except OSError as exc:
            raise ChatCLIError(f"cannot save to {folder}: {exc}") from None
        self.say(f"[saved {len(self.messages)} messages, {len(session)} tokens to {folder}]")

    def cmd_load(self, argument: str) -> None:
        if not argument:
            raise ChatCLIError("usage: /load PATH")
        folder = Path(argument).expanduser()
        # Everything is read and checked before the conversation or the session changes:
        # a bad /load reports one line and leaves both as they were.
        messages, turns = _read_saved_chat(folder)
        try:
            session = self.engine.load_session(folder / SESSION_DIR, session_id=self.session_id)
        except SessionFileError as exc:
            raise ChatCLIError(str(exc)) from None
        except Exception as exc:  # anything else: still one line, nothing replaced
            logger.debug("session load failed", exc_info=True)
            raise ChatCLIError(f"cannot load {folder / SESSION_DIR}: {exc}") from None
        self.messages = messages
        self.turns = turns
        self.say(f"[loaded {len(messages)} messages, {len(session)} tokens from {folder}]")

    # ------------------------------------------------------------------ loop
    def run(self, read: Callable[[str], str] = input) -> None:
        """Read lines until /quit or end of input."""
        self.say("Type a message, or /help for commands.")
        while True:
            try:
                line = read("you> ")
            except EOFError:
                self.write("\n")
                return
            except KeyboardInterrupt:  # at the prompt: drop the line, like a shell
                self.write("\n")
                continue
            if not self.handle(line):
                return


# ============================================================================ files

MAX_MESSAGES_BYTES = 256 << 20


def _check_ours(path: Path) -> None:
    """Refuse to overwrite a `messages.json` that /save did not write."""
    if not os.path.lexists(path):
        return
    try:
        _read_saved_chat(path.parent)
    except ChatCLIError as exc:
        raise FileExistsError(
            f"{path} was not written by /save; not overwriting it ({exc})"
        ) from None


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _read_saved_chat(folder: Path) -> tuple[list[BaseMessage], int]:
    """The messages and turn count /save wrote to `folder`; ChatCLIError if unusable."""
    path = folder / MESSAGES_FILE
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a folder, a FIFO, a device: never opened
            raise ChatCLIError(f"{path} is not a regular file")
        if info.st_size > MAX_MESSAGES_BYTES:
            raise ChatCLIError(f"{path} is {info.st_size} bytes; not a saved chat")
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChatCLIError(f"{folder} holds no saved chat (no {MESSAGES_FILE})") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise ChatCLIError(f"cannot read {path}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ChatCLIError(f"{path} was not written by /save")
    turns = payload.get("turns", 0)
    if type(turns) is not int or turns < 0:
        raise ChatCLIError(f"{path}: turns must be a non-negative integer, got {turns!r}")
    raw = payload.get("messages")
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
        raise ChatCLIError(f"{path}: messages must be a list of objects")
    try:
        messages = messages_from_dict(raw)
    except Exception as exc:  # pydantic and langchain raise many kinds
        raise ChatCLIError(f"{path}: unreadable messages: {exc}") from None
    return messages, turns


# ============================================================================ entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m langchain_infllm.chat",
        description="Interactive chat on a persistent InfLLM session.",
    )
    parser.add_argument(
        "--model-path",
        "--model",
        dest="model",
        help="embedded model name, hub id or local folder (default: the config's model.path)",
    )
    parser.add_argument(
        "--inf-llm-config-path",
        "--config",
        dest="config",
        help="InfLLM YAML config (reference layout); default: built-in settings",
    )
    parser.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply")
    parser.add_argument(
        "--temperature", type=float, help="0 is greedy (default: the model's, else 0)"
    )
    parser.add_argument("--top-p", type=float, help="nucleus mass (default: the model's, else 1)")
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        help=f"1 is off (default: the model's, else {CHAT_REPETITION_PENALTY})",
    )
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--session-id", default=DEFAULT_SESSION_ID, help="engine session id")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: best available)")
    parser.add_argument("--dtype", help="bfloat16, float16 or float32 (default: auto)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    return parser


def load_chat(args: argparse.Namespace) -> ChatInfLLM:
    """Build the chat model and load its engine; raises ChatCLIError on bad input."""
    from langchain_infllm.chat_models import ChatInfLLM

    config: InfLLMConfig | None = None
    model: str | None = args.model
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise ChatCLIError(f"config file not found: {path}")
        try:
            config = InfLLMConfig.from_yaml(path)
            model = model or model_path_from_yaml(path)
        except ConfigError as exc:
            raise ChatCLIError(str(exc)) from None
    if not model:
        raise ChatCLIError("no model: pass --model-path (or a config whose model.path names one)")
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        raise ChatCLIError(f"model folder not found: {model}")
    try:
        chat = ChatInfLLM(
            model=model,
            infllm_config=config,
            max_tokens=args.max_tokens,
            temperature=0.0 if args.temperature is None else args.temperature,
            top_p=1.0 if args.top_p is None else args.top_p,
            repetition_penalty=args.repetition_penalty,
            session_id=args.session_id,
            device=args.device,
            dtype=args.dtype,
        )
    except ValueError as exc:
        raise ChatCLIError(str(exc)) from None
    try:
        chat.get_engine()
    except Exception as exc:  # any loader failure becomes one readable line
        logger.debug("model load failed", exc_info=True)
        raise ChatCLIError(f"cannot load model {model!r}: {exc}") from None
    return with_model_defaults(chat, args)


def with_model_defaults(chat: ChatInfLLM, args: argparse.Namespace) -> ChatInfLLM:
    """Options not given on the command line from the model's generation config."""
    from langchain_infllm.engine.sampling import generation_defaults

    defaults = generation_defaults(chat.get_engine().model)
    update: dict[str, float] = {}
    if getattr(args, "temperature", None) is None and "temperature" in defaults:
        update["temperature"] = defaults["temperature"]
    if getattr(args, "top_p", None) is None and "top_p" in defaults:
        update["top_p"] = defaults["top_p"]
    if getattr(args, "repetition_penalty", None) is None:
        update["repetition_penalty"] = defaults.get("repetition_penalty", CHAT_REPETITION_PENALTY)
    if update:
        logger.info("sampling defaults: %s", update)
    return chat.model_copy(update=update) if update else chat


def _quiet_libraries() -> None:
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Ctrl-C must stop a reply even when this process was started with SIGINT ignored
    # (as children of background jobs are), since Python then keeps it ignored.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        _quiet_libraries()
    if args.max_tokens < 1:
        print("error: --max-tokens must be at least 1", file=sys.stderr)
        return 2
    print("loading model ...", flush=True)
    began = time.perf_counter()
    try:
        chat = load_chat(args)
    except ChatCLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"{chat.model_name} loaded in {time.perf_counter() - began:.1f} s", flush=True)
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    ChatCLI(chat, chat.get_engine(), session_id=args.session_id, system=args.system).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
