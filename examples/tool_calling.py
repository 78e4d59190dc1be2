"""Tool calling: bind two tools, run the calls the model makes, send the results back.

Run:  python examples/tool_calling.py [--model NAME] [--config config/x.yaml]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import BaseTool, tool

from langchain_infllm import ChatInfLLM

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    forecasts = {"paris": "sunny, 24 C", "london": "light rain, 16 C"}
    return forecasts.get(city.strip().lower(), "cloudy, 19 C")


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


TOOLS: dict[str, BaseTool] = {t.name: t for t in (get_weather, multiply)}


def usage(message: AIMessage) -> str:
    details = (message.usage_metadata or {}).get("input_token_details", {})
    return f"cache_read={details.get('cache_read')}, cache_creation={details.get('cache_creation')}"


def ask(chat: ChatInfLLM, messages: list[BaseMessage]) -> None:
    """One question: the model calls tools, we run them, the model answers with the results."""
    reply = chat.bind_tools(list(TOOLS.values())).invoke(messages)
    messages.append(reply)
    print(f"  [{len(reply.tool_calls)} tool call(s); {usage(reply)}]")
    if not reply.tool_calls:
        print("assistant:", reply.content)
        return
    for call in reply.tool_calls:
        result = TOOLS[call["name"]].invoke(call["args"])
        print(f"tool {call['name']}({call['args']}) -> {result}")
        messages.append(ToolMessage(str(result), tool_call_id=call["id"], name=call["name"]))
    # Small models tend to call the tool again when they still see it, so the answer
    # step runs without tools, in a session of its own: each of the two sessions keeps
    # reusing its own prefix (the tool definitions change the prompt's beginning).
    answer = chat.invoke(messages, config={"configurable": {"session_id": "answers"}})
    messages.append(answer)
    print(f"assistant: {answer.content}\n  [{usage(answer)}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--config", default=str(CONFIG_DIR / "cpu-small.yaml"))
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    chat = ChatInfLLM(model=args.model, infllm_config=args.config, max_tokens=args.max_tokens)
    messages: list[BaseMessage] = [
        SystemMessage(
            "You are a helpful assistant. Once a tool has returned its result, answer the user "
            "in one sentence without calling tools again."
        )
    ]
    # One conversation, two questions: every call re-sends the history, computing only
    # what is new (cache_read counts the reused prompt tokens).
    for question in ("What is the weather in Paris?", "What is 37 times 23?"):
        print("user:", question)
        messages.append(HumanMessage(question))
        ask(chat, messages)


if __name__ == "__main__":
    main()
