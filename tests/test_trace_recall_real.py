"""The trace shows what the model recalled: a fact planted in one tool observation far
outside the local window is retrieved, and the handler attributes it to that message.

Real embedded model (Qwen2.5-Coder-0.5B-Instruct); the memory blocks behind the answer
must come from the planted observation, not from wherever the trace happens to point.
"""

from __future__ import annotations

import random

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from langchain_infllm import ChatInfLLM, RetrievalTraceHandler
from langchain_infllm.config import InfLLMConfig

pytestmark = pytest.mark.real_model

MODEL = "qwen2.5-coder-0.5b-instruct"
FACT_PAGE = 2
PAGES = 20
CODE = "QX-4471"

_WORDS = [
    "inventory", "shipment", "warehouse", "pallet", "forklift", "quarterly", "audit",
    "supplier", "invoice", "route", "driver", "schedule", "depot", "freight", "container",
    "manifest", "customs", "clearance", "storage", "bay",
]


def _filler(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words)).capitalize() + "."


def _conversation() -> list[BaseMessage]:
    rng = random.Random(3)
    messages: list[BaseMessage] = [
        SystemMessage("You are an operations assistant. Read pages with the read_page tool."),
        HumanMessage("Read the warehouse log page by page; I will ask about it afterwards."),
    ]
    for page in range(1, PAGES + 1):
        call_id = f"call_{page}"
        messages.append(
            AIMessage(
                "", tool_calls=[{"name": "read_page", "args": {"page": page}, "id": call_id}]
            )
        )
        text = _filler(rng, 170)
        if page == FACT_PAGE:
            text += f" The access code for the cold storage vault is {CODE}. " + _filler(rng, 40)
        messages.append(ToolMessage(f"Page {page}: {text}", tool_call_id=call_id))
    messages.append(
        HumanMessage("What is the access code for the cold storage vault? Answer with the code.")
    )
    return messages


def test_planted_observation_is_recalled_and_attributed() -> None:
    config = InfLLMConfig.from_yaml("config/cpu-small.yaml")
    chat = ChatInfLLM(model=MODEL, infllm_config=config, max_tokens=12, session_id="trace-recall")
    messages = _conversation()
    handler = RetrievalTraceHandler()
    answer = chat.invoke(messages, config={"callbacks": [handler]})

    meta = answer.response_metadata["infllm"]
    spans = {s["index"]: s for s in meta["message_spans"]}
    fact_index = 2 + 2 * (FACT_PAGE - 1) + 1  # system, human, then (call, observation) pairs
    fact = spans[fact_index]
    assert fact["role"] == "tool"
    # The planted page is far behind the window: the local attention cannot see it.
    assert meta["prompt_tokens"] - fact["end"] > 2 * config.n_local

    recalled = handler.recalled_messages(0)
    observations = [m for m in recalled if m["role"] == "tool"]
    assert observations, f"no tool observation recalled: {recalled}"
    ranked = [m["tool_call_id"] for m in observations]
    # The planted observation is among the most recalled observations.
    assert f"call_{FACT_PAGE}" in ranked[:3], ranked
    print("answer:", answer.content, "| recalled observations:", ranked[:5])
