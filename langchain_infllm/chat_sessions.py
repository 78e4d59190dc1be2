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
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import AIMessage

DEFAULT_SESSION_ID = "default"
THREAD_SESSION_PREFIX = "thread:"


# ----------------------------------------------------------------------------- sessions


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


# ----------------------------------------------------------------------------- tokens


def message_fingerprint(message: AIMessage) -> str:
    """What a chat template can see of an AIMessage: its text and its tool calls.

    Used to check that a message which comes back under a known id still says what was
    generated (an edited message must be re-rendered, not spliced).
    """
    calls = [[call.get("name") or "", call.get("args") or {}] for call in message.tool_calls]
    invalid = [
        [call.get("name") or "", call.get("args") or ""] for call in message.invalid_tool_calls
    ]
    payload = json.dumps(
        [message.text.strip(), calls, invalid], sort_keys=True, ensure_ascii=False, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class GeneratedTokenStore:
    """Exact ids generated for assistant messages, by message id (LRU-bounded).

    A second index by fingerprint covers messages that come back without their id
    (callers that rebuild messages from text); any entry with the same visible content
    is a faithful encoding of that message.
    """

    def __init__(self, max_messages: int = 20_000) -> None:
        self.max_messages = max_messages
        self._by_id: OrderedDict[str, tuple[str, tuple[int, ...]]] = OrderedDict()
        self._by_fingerprint: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_id)

    def remember(self, message: AIMessage, token_ids: Sequence[int]) -> None:
        ids = tuple(int(t) for t in token_ids)
        if not ids:
            return
        fingerprint = message_fingerprint(message)
        with self._lock:
            if message.id:
                self._by_id[message.id] = (fingerprint, ids)
                self._by_id.move_to_end(message.id)
            self._by_fingerprint[fingerprint] = ids
            self._by_fingerprint.move_to_end(fingerprint)
            while len(self._by_id) > self.max_messages:
                self._by_id.popitem(last=False)
            while len(self._by_fingerprint) > self.max_messages:
                self._by_fingerprint.popitem(last=False)

    def lookup(self, message: AIMessage) -> tuple[int, ...] | None:
        fingerprint = message_fingerprint(message)
        with self._lock:
            if message.id and message.id in self._by_id:
                stored_fingerprint, ids = self._by_id[message.id]
                if stored_fingerprint == fingerprint:
                    self._by_id.move_to_end(message.id)
                    return ids
                return None  # edited since it was generated: re-render it
            return self._by_fingerprint.get(fingerprint)


_STORES: weakref.WeakKeyDictionary[Any, GeneratedTokenStore] = weakref.WeakKeyDictionary()
_STORES_LOCK = threading.Lock()


def token_store_for(engine: Any) -> GeneratedTokenStore:
    """The store shared by every chat model on ``engine`` (sessions live in the engine)."""
    with _STORES_LOCK:
        store = _STORES.get(engine)
        if store is None:
            store = GeneratedTokenStore()
            _STORES[engine] = store
        return store
