"""Save a chat session to disk in one process and continue it in another.

Process 1 (``--step build``) chats, then saves the engine session (the context memory,
not just the text) and the messages. Process 2 (``--step resume``) loads both and asks
a follow-up: the saved prefix is reused (``cache_read``), only the new turn is computed.
Without ``--step`` the script runs both steps, the second in a fresh subprocess.

Run:  python examples/save_and_resume.py [--model NAME] [--config config/x.yaml] [--dir D]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from langchain_core.messages import (
    AIMessage,
    HumanMessage,
    SystemMessage,
    messages_from_dict,
    messages_to_dict,
)

from langchain_infllm import ChatInfLLM

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
SESSION_ID = "resume-demo"


def report(step: str, reply: AIMessage) -> None:
    details = (reply.usage_metadata or {}).get("input_token_details", {})
    print(f"[{step}] assistant: {reply.content}")
    print(
        f"[{step}] cache_read={details.get('cache_read')} "
        f"cache_creation={details.get('cache_creation')}"
    )


def build(chat: ChatInfLLM, folder: Path) -> None:
    messages = [
        SystemMessage("You are a concise assistant."),
        HumanMessage("My project is called Lighthouse; it indexes ship logs. Say hi."),
    ]
    reply = chat.invoke(messages)
    messages.append(reply)
    report("build", reply)
    # The session holds the rendered conversation; save it next to the messages.
    session = chat.get_engine().session(SESSION_ID)
    session.save(folder / "session")
    (folder / "messages.json").write_text(json.dumps(messages_to_dict(messages)))
    print(f"[build] saved {len(session)} context tokens to {folder}")


def resume(chat: ChatInfLLM, folder: Path) -> None:
    session = chat.get_engine().load_session(folder / "session", session_id=SESSION_ID)
    messages = messages_from_dict(json.loads((folder / "messages.json").read_text()))
    print(f"[resume] loaded {len(session)} context tokens and {len(messages)} messages")
    messages.append(HumanMessage("What is my project called? One sentence."))
    report("resume", chat.invoke(messages))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--config", default=str(CONFIG_DIR / "smollm2-cpu.yaml"))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dir", help="folder for the snapshot (default: a temporary one)")
    parser.add_argument("--step", choices=["build", "resume"], help="run only this step")
    args = parser.parse_args()

    if args.step is None:  # both steps, the second in a fresh process
        folder = args.dir or tempfile.mkdtemp(prefix="infllm-resume-")
        common = ["--model", args.model, "--config", args.config, "--dir", folder]
        common += ["--max-tokens", str(args.max_tokens)]
        for step in ("build", "resume"):
            subprocess.run([sys.executable, __file__, *common, "--step", step], check=True)
        return
    if args.dir is None:
        parser.error("--step needs --dir")
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    # The same session id in both processes: the chat model continues the loaded session.
    chat = ChatInfLLM(
        model=args.model,
        infllm_config=args.config,
        max_tokens=args.max_tokens,
        session_id=SESSION_ID,
    )
    (build if args.step == "build" else resume)(chat, folder)


if __name__ == "__main__":
    main()
