"""Stream a reply token by token while a callback handler prints the retrieval trace.

The prompt is a long list of notes, longer than the config's local window, so older
notes live in InfLLM's block memory and are retrieved while the answer is computed.

Run:  python examples/streaming_with_traces.py [--model NAME] [--config config/x.yaml]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.outputs import LLMResult

from langchain_infllm import ChatInfLLM

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


class PrintRetrievals(BaseCallbackHandler):
    """Prints InfLLM retrieval events and each call's retrieval summary."""

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if name.startswith("infllm"):
            print(f"\n[event {name}] {json.dumps(data, default=str)}")

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        # stream() sends no custom events; the summary arrives with the final message.
        message = getattr(response.generations[0][0], "message", None)
        info = (getattr(message, "response_metadata", None) or {}).get("infllm", {})
        print(
            f"\n[retrieval] retrievals={info.get('retrievals')} "
            f"blocks_retrieved={info.get('blocks_retrieved')} "
            f"unique_blocks={info.get('unique_blocks_retrieved')} "
            f"blocks_in_memory={info.get('blocks_in_memory')} "
            f"cache_hits={info.get('cache_hits')} cache_misses={info.get('cache_misses')}"
        )


def notes(count: int) -> str:
    return "\n".join(
        f"Note {i}: the locker in room {i} has the code {(i * 7919) % 9000 + 1000}."
        for i in range(1, count + 1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--config", default=str(CONFIG_DIR / "smollm2-cpu.yaml"))
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--notes", type=int, default=80, help="length of the long prompt")
    args = parser.parse_args()

    chat = ChatInfLLM(model=args.model, infllm_config=args.config, max_tokens=args.max_tokens)
    room = args.notes // 4
    messages = [
        SystemMessage("Answer from the notes, in one short sentence."),
        HumanMessage(f"{notes(args.notes)}\n\nWhat is the code of the locker in room {room}?"),
    ]
    last: AIMessageChunk | None = None
    print("assistant: ", end="", flush=True)
    for chunk in chat.stream(messages, config={"callbacks": [PrintRetrievals()]}):
        print(chunk.content, end="", flush=True)
        if chunk.chunk_position == "last":
            last = chunk
    assert last is not None, "the stream ends with a chunk marked 'last'"
    print("\nexpected:", (room * 7919) % 9000 + 1000)
    print("usage:", last.usage_metadata)
    print("infllm:", json.dumps(last.response_metadata["infllm"], indent=2))


if __name__ == "__main__":
    main()
