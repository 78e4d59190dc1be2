"""langchain-infllm: a LangChain chat model on a persistent InfLLM engine."""

from langchain_infllm.config import ConfigError, InfLLMConfig

__all__ = ["ConfigError", "InfLLMConfig"]
__version__ = "0.1.0"
