"""Which session a turn runs on when the caller names none: the best prefix match.

A session whose every token starts the new prompt is simply continued. A session that
shares only part of the prompt is forked (the fork shares its sealed blocks, so the
common prefix is not recomputed) and the original is left alone: it may be another
conversation. With no shared token at all, a fresh session is made.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

__all__ = ["MIN_SHARED_TOKENS", "choose_session", "common_prefix"]

MIN_SHARED_TOKENS = 16
"""A shorter overlap (a system prompt's first words) is not worth a fork."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def choose_session(
    engine: Any, prompt_ids: Sequence[int], busy: set[str]
) -> tuple[str, Any | None]:
    """``(session_id, fork_of)``: continue the session that is a prefix of the prompt,
    else fork the one sharing the longest prefix (``fork_of`` is then its session),
    else a new id with ``fork_of`` None. Sessions in ``busy`` are forked, never continued.
    """
    # The store has no public "peek without reloading" accessor: read its map directly
    # (token ids stay in memory even for spilled sessions).
    sessions = dict(engine.sessions._sessions)
    continued: tuple[int, str] | None = None
    forked: tuple[int, str] | None = None
    for sid, session in sessions.items():
        tokens = session.token_ids
        shared = common_prefix(tokens, prompt_ids)
        if shared < MIN_SHARED_TOKENS:
            continue
        if shared == len(tokens) and sid not in busy:
            if continued is None or shared > continued[0]:
                continued = (shared, sid)
        elif forked is None or shared > forked[0]:
            forked = (shared, sid)
    if continued is not None and (forked is None or continued[0] >= forked[0]):
        return continued[1], None
    new_id = f"chat-{uuid.uuid4().hex}"
    if forked is None:
        return new_id, None
    return new_id, sessions[forked[1]]
