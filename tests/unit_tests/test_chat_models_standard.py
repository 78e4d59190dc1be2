"""langchain-tests' standard unit suite for ChatInfLLM (construction only: no model loads)."""

from __future__ import annotations

from typing import Any

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_infllm import InfLLMConfig
from langchain_infllm.chat_models import ChatInfLLM

SMALL_CONFIG = InfLLMConfig.create(
    block_size=64,
    n_init=64,
    n_local=1024,
    topk=8,
    repr_topk=4,
    max_cached_block=16,
    exc_block_size=256,
    chunk_size=2048,
)


class TestChatInfLLMUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatInfLLM]:
        return ChatInfLLM

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": "qwen2.5-coder-0.5b-instruct", "infllm_config": SMALL_CONFIG}

    @property
    def supports_model_override(self) -> bool:
        # One engine per instance: a call cannot switch to another model.
        return False
