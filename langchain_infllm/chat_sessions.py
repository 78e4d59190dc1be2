"""Which engine session a chat call uses, and the exact tokens behind each AIMessage.

Session choice, first match wins:

1. an explicit ``session_id`` for the call (keyword argument, or
   ``config={"configurable": {"session_id": ...}}``);
2. the ``session_id`` field of the chat model;
3. LangGraph's ``thread_id`` (with the node path from ``checkpoint_ns``, task ids
   removed, so each graph node keeps one session per thread across steps);
4. the default session.

Choosing "wrong" is never incorrect, only slower: every call syncs the session to the
rendered prompt, which keeps the longest common prefix and computes the rest.

The token store is the chat core's (``chat_core.tokens``); it takes AIMessages as well
as message dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.messages import AIMessage

from langchain_infllm.chat_core.tokens import GeneratedTokenStore, as_message_dict, fingerprint
from langchain_infllm.chat_core.tokens import token_store_for as token_store_for

__all__ = [
    "DEFAULT_SESSION_ID",
    "THREAD_SESSION_PREFIX",
    "GeneratedTokenStore",
    "choose_session_id",
    "message_fingerprint",
    "session_key_from_config",
    "thread_session_key",
    "token_store_for",
]

DEFAULT_SESSION_ID = "default"
THREAD_SESSION_PREFIX = "thread:"


def _node_path(checkpoint_ns: str) -> str:
    """``"parent:<task>|model:<task>"`` -> ``"parent|model"`` (task ids change per step)."""
    parts = [part.split(":", 1)[0] for part in checkpoint_ns.split("|") if part]
    return "|".join(parts)


def thread_session_key(values: Mapping[str, Any]) -> str | None:
    """Session key from LangGraph's ``thread_id`` / ``checkpoint_ns`` in ``values``."""
    thread = values.get("thread_id")
    if thread is None or thread == "":
        return None
    key = f"{THREAD_SESSION_PREFIX}{thread}"
    ns = values.get("checkpoint_ns") or values.get("langgraph_checkpoint_ns")
    if isinstance(ns, str) and ns:
        path = _node_path(ns)
        if path:
            key = f"{key}|{path}"
    return key


def session_key_from_config(config: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(explicit session_id, thread key)`` found in a runnable config."""
    configurable = config.get("configurable") or {}
    metadata = config.get("metadata") or {}
    explicit = configurable.get("session_id")
    merged = {**metadata, **configurable}
    return (str(explicit) if explicit not in (None, "") else None), thread_session_key(merged)


def choose_session_id(
    *,
    explicit: str | None,
    field: str | None,
    thread_key: str | None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Apply the precedence documented in this module."""
    if explicit:
        return explicit
    if field:
        return field
    if thread_key:
        return thread_key
    if metadata:
        derived = thread_session_key(metadata)
        if derived:
            return derived
    return DEFAULT_SESSION_ID


def message_fingerprint(message: AIMessage) -> str:
    """What a chat template can see of an AIMessage: its text and its tool calls."""
    return fingerprint(as_message_dict(message))
