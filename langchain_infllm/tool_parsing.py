"""Tool-call parsing, re-exported from the chat core (where it lives, LangChain-free).

The records it returns have the keys of LangChain's ``ToolCall`` / ``InvalidToolCall``
(typed dicts), so they go into ``AIMessage`` unchanged.
"""

from langchain_infllm.chat_core.tool_parsing import (
    InvalidToolCall,
    ParsedResponse,
    StreamEvent,
    TextEvent,
    ToolCall,
    ToolCallChunkData,
    ToolCallEvent,
    ToolCallStreamParser,
    generate_tool_call_id,
    parse_tool_calls,
    tool_call_prefill,
)

__all__ = [
    "InvalidToolCall",
    "ParsedResponse",
    "StreamEvent",
    "TextEvent",
    "ToolCall",
    "ToolCallChunkData",
    "ToolCallEvent",
    "ToolCallStreamParser",
    "generate_tool_call_id",
    "parse_tool_calls",
    "tool_call_prefill",
]
