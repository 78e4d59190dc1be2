"""LangGraph: a checkpointed chat graph whose threads map to their own engine sessions.

ChatInfLLM reads LangGraph's ``thread_id`` from the run config, so every thread gets a
session of its own: two interleaved conversations stay independent, and each turn
reuses its own thread's prefix (``cache_read``) even though the other thread ran since.

Run:  python examples/langgraph_checkpointer.py [--model NAME] [--config config/x.yaml]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph

from langchain_infllm import ChatInfLLM

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
SYSTEM = SystemMessage("You are a friendly assistant. Answer in one short sentence.")


def build_graph(chat: ChatInfLLM) -> Any:
    def respond(state: MessagesState) -> dict[str, Any]:
        # The node re-sends the whole history; the engine computes only the new part.
        return {"messages": [chat.invoke([SYSTEM, *state["messages"]])]}

    graph = StateGraph(MessagesState)
    graph.add_node("respond", respond)
    graph.add_edge(START, "respond")
    return graph.compile(checkpointer=InMemorySaver())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--config", default=str(CONFIG_DIR / "smollm2-cpu.yaml"))
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    chat = ChatInfLLM(model=args.model, infllm_config=args.config, max_tokens=args.max_tokens)
    app = build_graph(chat)
    turns = [
        ("alice", "Hi, I'm Alice and I love sailing."),
        ("bob", "Hello, I'm Bob; I grow tomatoes."),
        ("alice", "What is my hobby?"),
        ("bob", "What do I grow?"),
    ]
    for thread, text in turns:
        config = {"configurable": {"thread_id": thread}}
        state = app.invoke({"messages": [HumanMessage(text)]}, config)
        reply: AIMessage = state["messages"][-1]
        info = reply.response_metadata["infllm"]
        details = (reply.usage_metadata or {}).get("input_token_details", {})
        print(f"[{thread}] user: {text}")
        print(f"[{thread}] assistant: {reply.content}")
        print(
            f"[{thread}] session={info['session_id']} messages={len(state['messages'])} "
            f"cache_read={details.get('cache_read')} "
            f"cache_creation={details.get('cache_creation')} "
            f"context_tokens={info['context_tokens']}"
        )


if __name__ == "__main__":
    main()
