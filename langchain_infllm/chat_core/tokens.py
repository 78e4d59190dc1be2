"""The exact token ids generated for each assistant message, kept per engine.

Templates do not always re-render an assistant turn to the tokens the model produced,
so the renderer splices these back when a message returns (see ``prompt``).
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_infllm.chat_core.messages import content_text

__all__ = ["GeneratedTokenStore", "as_message_dict", "fingerprint", "token_store_for"]


def as_message_dict(message: Any) -> Mapping[str, Any]:
    """An assistant message as a dict: dicts as they are; objects shaped like
    LangChain's ``AIMessage`` (``content``, ``tool_calls``, ``invalid_tool_calls``,
    ``id``) read by attribute, so front ends need no conversion (and this no import)."""
    if isinstance(message, Mapping):
        return message
    try:
        text = content_text(getattr(message, "content", ""), index=0, role="assistant")
    except ValueError:
        text = str(getattr(message, "text", ""))
    return {
        "role": "assistant",
        "content": text,
        "id": getattr(message, "id", None),
        "tool_calls": [
            {"function": {"name": c.get("name") or "", "arguments": c.get("args") or {}}}
            for c in getattr(message, "tool_calls", None) or []
        ],
        "invalid_tool_calls": [dict(c) for c in getattr(message, "invalid_tool_calls", None) or []],
    }


def fingerprint(message: Mapping[str, Any]) -> str:
    """What a chat template can see of an assistant message dict: its text and calls.

    Used to check that a message which comes back under a known id still says what was
    generated (an edited message must be re-rendered, not spliced).
    """
    text = content_text(message.get("content"), index=0, role="assistant")
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        args = function.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                args = {}
        calls.append([function.get("name") or "", args if isinstance(args, dict) else {}])
    invalid = [
        [call.get("name") or "", call.get("args") or ""]
        for call in message.get("invalid_tool_calls") or []
    ]
    payload = json.dumps(
        [text.strip(), calls, invalid], sort_keys=True, ensure_ascii=False, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class GeneratedTokenStore:
    """Exact ids generated for assistant messages, by message id (LRU-bounded).

    A second index by fingerprint covers messages that come back without their id
    (an HTTP client re-sends text only); any entry with the same visible content is a
    faithful encoding of that message.
    """

    def __init__(self, max_messages: int = 20_000) -> None:
        self.max_messages = max_messages
        self._by_id: OrderedDict[str, tuple[str, tuple[int, ...]]] = OrderedDict()
        self._by_fingerprint: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_id)

    def remember(self, message: Any, token_ids: Sequence[int]) -> None:
        ids = tuple(int(t) for t in token_ids)
        if not ids:
            return
        d = as_message_dict(message)
        key = fingerprint(d)
        message_id = d.get("id")
        with self._lock:
            if message_id:
                self._by_id[message_id] = (key, ids)
                self._by_id.move_to_end(message_id)
            self._by_fingerprint[key] = ids
            self._by_fingerprint.move_to_end(key)
            while len(self._by_id) > self.max_messages:
                self._by_id.popitem(last=False)
            while len(self._by_fingerprint) > self.max_messages:
                self._by_fingerprint.popitem(last=False)

    def lookup(self, message: Any) -> tuple[int, ...] | None:
        d = as_message_dict(message)
        key = fingerprint(d)
        message_id = d.get("id")
        with self._lock:
            if message_id and message_id in self._by_id:
                stored, ids = self._by_id[message_id]
                if stored == key:
                    self._by_id.move_to_end(message_id)
                    return ids
                return None  # edited since it was generated: re-render it
            return self._by_fingerprint.get(key)


_STORES: weakref.WeakKeyDictionary[Any, GeneratedTokenStore] = weakref.WeakKeyDictionary()
_STORES_LOCK = threading.Lock()


def token_store_for(engine: Any) -> GeneratedTokenStore:
    """The store shared by every front end on ``engine`` (sessions live in the engine)."""
    with _STORES_LOCK:
        store = _STORES.get(engine)
        if store is None:
            store = GeneratedTokenStore()
            _STORES[engine] = store
        return store
