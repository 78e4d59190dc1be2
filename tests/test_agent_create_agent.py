"""A ``create_agent`` loop on the embedded Qwen2.5-Coder-0.5B: many steps, history never recomputed.

The agent re-sends its whole message list every step. The test checks that each step
reuses everything the session held after the previous step (``cache_read`` equals
the previous step's prompt plus its generated tokens), so a step only computes its new
tool result, and that both tools were really used.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from langchain_infllm.chat_models import ChatInfLLM
from tests.shared_configs import SMALL_AGENT_CONFIG

pytestmark = pytest.mark.real_model

MODEL = "qwen2.5-coder-0.5b-instruct"
LETTERS = "INFLLM"

SYSTEM = (
    "You spell a secret word by calling tools, one call per reply, never answering early.\n"
    "Repeat: call read_letter with the next position (1, 2, 3, ...), then call save_letter "
    "with the letter it gives you. Each tool result tells you the next call to make. When a "
    "result says the word is complete, reply with the word and no tool call."
)


@tool
def read_letter(position: int) -> str:
    """Read the letter of the secret word at a 1-based position."""
    if not 1 <= position <= len(LETTERS):
        return f"There is no letter at position {position}. Call read_letter with position 1."
    letter = LETTERS[position - 1]
    return f"Letter {position} is {letter}. Next call: save_letter with letter={letter!r}."


_saved: list[str] = []


@tool
def save_letter(letter: str) -> str:
    """Save one letter of the secret word."""
    _saved.append(letter)
    if len(_saved) >= len(LETTERS):
        return f"Saved {letter}. The word is complete: {''.join(_saved)}. Reply with it."
    return f"Saved {letter}. Next call: read_letter with position={len(_saved) + 1}."


def test_create_agent_many_steps_reuses_history() -> None:
    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver

    _saved.clear()
    llm = ChatInfLLM(
        model=MODEL,
        infllm_config=SMALL_AGENT_CONFIG,
        temperature=0,
        max_tokens=48,
    )
    agent = create_agent(
        llm, tools=[read_letter, save_letter], system_prompt=SYSTEM, checkpointer=InMemorySaver()
    )
    config: Any = {"configurable": {"thread_id": "spell"}, "recursion_limit": 60}
    began = time.perf_counter()
    state = agent.invoke(
        {"messages": [HumanMessage("Spell the secret word. Start with read_letter position 1.")]},
        config,
    )
    seconds = time.perf_counter() - began
    messages = state["messages"]
    steps = [m for m in messages if isinstance(m, AIMessage)]
    tool_results = [m for m in messages if isinstance(m, ToolMessage)]
    called = {call["name"] for step in steps for call in step.tool_calls}

    print(f"\n{len(steps)} model steps, {len(tool_results)} tool results in {seconds:.1f}s")
    for index, step in enumerate(steps):
        shown: Any = step.usage_metadata or {}
        details: Any = shown.get("input_token_details", {})
        print(
            f"step {index}: input {shown.get('input_tokens')}"
            f" cache_read {details.get('cache_read')}"
            f" computed {details.get('cache_creation')} output {shown.get('output_tokens')}"
            f" calls {[(c['name'], c['args']) for c in step.tool_calls]} text {step.text[:60]!r}"
            f" blocks {step.response_metadata['infllm']['blocks_in_memory']}"
            f" retrievals {step.response_metadata['infllm']['retrievals']}"
        )

    assert len(steps) >= 10, f"only {len(steps)} model steps"
    assert {"read_letter", "save_letter"} <= called
    assert "".join(_saved).startswith(LETTERS[:4])

    sessions = {step.response_metadata["infllm"]["session_id"] for step in steps}
    assert sessions == {"thread:spell|model"}

    previous_total = 0
    for index, step in enumerate(steps):
        usage = step.usage_metadata
        assert usage is not None
        details = usage["input_token_details"]
        assert details["cache_read"] + details["cache_creation"] == usage["input_tokens"]
        if index:
            # The whole previous history (prompt and generated tokens) is reused ...
            assert details["cache_read"] >= previous_total, f"step {index} recomputed history"
            # ... so a step computes only what is new since the last one.
            assert details["cache_creation"] == usage["input_tokens"] - previous_total
        previous_total = usage["total_tokens"]

    # The conversation outgrew the local window: late steps work from memory blocks.
    last = steps[-1].response_metadata["infllm"]
    assert last["context_tokens"] > SMALL_AGENT_CONFIG.n_local
    assert last["blocks_in_memory"] > 0
    assert last["retrievals"] > 0
