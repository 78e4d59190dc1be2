"""Session ids: checked in one low module that the store and persistence both use."""

from __future__ import annotations

__all__ = ["check_session_id"]


def check_session_id(session_id: object) -> str:
    """A session id is a non-empty string; anything else is refused before the store is
    touched (an int or "" key would break every later spill and lookup)."""
    if not isinstance(session_id, str):
        raise TypeError(
            f"session_id must be a non-empty string, got {type(session_id).__name__} {session_id!r}"
        )
    if not session_id:
        raise ValueError("session_id must be a non-empty string, got ''")
    return session_id
