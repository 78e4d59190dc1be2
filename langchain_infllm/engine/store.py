"""Sessions by id, within a host-memory budget: the least recently used spill to disk.

A spilled session keeps its `Session` object (and its token ids); only its memory goes
to a normal snapshot (see `persistence`) in the spill folder and is released. Any use of
the object, or asking the store for its id, loads the memory back, so spilling loses
nothing, and a caller that holds the object keeps a valid handle; a snapshot that is gone
or corrupt is recomputed from those token ids. A spill that fails (disk full) leaves the
session in memory and is logged, never raised in the append that asked for the budget.

Locking: the store lock guards the id map only. Nothing waits on a session lock while
holding the store lock: spilling only *tries* a session's lock and skips a session that
is busy (a caller holds it), and reloading happens outside the store lock. A session
may take the store lock while holding its own (after an append), never the reverse.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from langchain_infllm.engine.ids import check_session_id
from langchain_infllm.engine.session import Session

if TYPE_CHECKING:
    from langchain_infllm.engine.engine import InfLLMEngine

__all__ = ["SessionStore", "check_session_id"]

logger = logging.getLogger(__name__)

SPILL_RETRY_SECONDS = 5.0


class SessionStore:
    """Get-or-create sessions by id; spill LRU ones when the host budget is exceeded."""

    def __init__(self, engine: InfLLMEngine, spill_dir: str | Path | None = None) -> None:
        self._engine = engine
        self._sessions: dict[str, Session] = {}  # live and spilled alike
        self._lock = threading.RLock()
        self._enforcing = threading.Lock()  # one budget pass at a time
        self._spill_dir = Path(spill_dir) if spill_dir else None
        # After a spill fails (disk full, read-only folder), budget passes skip spilling
        # until then, so one bad disk does not cost a failed save on every append.
        self.spill_retry_seconds = SPILL_RETRY_SECONDS
        self._spill_retry_at = 0.0

    @property
    def spill_dir(self) -> Path:
        with self._lock:
            if self._spill_dir is None:
                self._spill_dir = Path(tempfile.mkdtemp(prefix="infllm-spill-"))
            return self._spill_dir

    def __contains__(self, session_id: object) -> bool:
        return isinstance(session_id, str) and session_id in self._sessions

    def _all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def live_ids(self) -> list[str]:
        return [s.session_id for s in self._all() if not s.spilled]

    def spilled_ids(self) -> list[str]:
        return [s.session_id for s in self._all() if s.spilled]

    def get_or_create(self, session_id: str) -> Session:
        """The session with this id, its memory reloaded if it was spilled.

        If the reload fails (`SessionFileError`), the session stays in the store, spilled,
        and a later call tries again.
        """
        check_session_id(session_id)
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                session = Session(self._engine, session_id)
                self._sessions[session_id] = session
            session.last_used = time.monotonic()
        session.ensure_resident()  # outside the store lock: it takes the session lock
        self.enforce_budget(keep=session_id)
        return session

    def put(self, session: Session) -> None:
        """Store `session` under its id (an object stored before under that id is left
        as it is for whoever still holds it)."""
        check_session_id(session.session_id)
        with self._lock:
            self._sessions[session.session_id] = session
        self.enforce_budget(keep=session.session_id)

    def drop(self, session_id: str) -> None:
        """Forget the session: its memory, spill files and device cache slots are freed
        (a caller still holding the object holds an empty session)."""
        check_session_id(session_id)
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            session.close()  # outside the store lock: it takes the session lock

    def note_growth(self, session: Session) -> None:
        """Called after `session` appended tokens: spill others if over budget."""
        if self._engine.config.session_host_budget_bytes is None:
            return
        if self._sessions.get(session.session_id) is session:
            self.enforce_budget(keep=session.session_id)

    def host_bytes(self) -> int:
        return sum(s.host_bytes() for s in self._all() if not s.spilled)

    def enforce_budget(self, keep: str | None = None) -> None:
        """Spill least recently used sessions until live host bytes fit the budget.

        Sessions that are busy (another caller holds their lock) are skipped, so the
        store may stay over budget until they are free; it never waits for them. A spill
        that fails is logged and the pass stops: the victim stays resident and whoever
        triggered the pass (an append whose tokens are already committed) is not blamed.
        """
        budget = self._engine.config.session_host_budget_bytes
        if budget is None or time.monotonic() < self._spill_retry_at:
            return
        with self._enforcing:
            by_age = sorted(
                (s for s in self._all() if not s.spilled), key=lambda s: s.last_used
            )
            for session in by_age:
                if self.host_bytes() <= budget:
                    return
                if session.session_id == keep:
                    continue
                try:
                    self.spill(session.session_id)
                except Exception:  # best effort: the session it tried is intact
                    self._spill_retry_at = time.monotonic() + self.spill_retry_seconds
                    logger.warning(
                        "could not spill session %s (it stays in memory; the store is over "
                        "its host budget; next try in %.0f s)",
                        session.session_id, self.spill_retry_seconds, exc_info=True,
                    )
                    return

    def spill(self, session_id: str) -> Path | None:
        """Write a live session's memory to disk and release it.

        Returns the snapshot folder, or None when the session is busy (its lock is held,
        by another thread or by this one further up the stack) and was left alone.
        """
        check_session_id(session_id)
        with self._lock:
            session = self._sessions[session_id]
        if _held_by_this_thread(session.lock) or not session.lock.acquire(blocking=False):
            logger.debug("session %s is busy; not spilled", session_id)
            return None
        try:
            if session.spilled or self._sessions.get(session_id) is not session:
                return None
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", session_id)[:80]
            digest = hashlib.sha256(session_id.encode()).hexdigest()[:12]
            path = self.spill_dir / f"{safe}-{digest}"
            session.spill_to(path)
        finally:
            session.lock.release()
        logger.info("session %s spilled to %s", session_id, path)
        return path



def _held_by_this_thread(lock: object) -> bool:
    """True if the calling thread holds this RLock (a try-acquire would succeed)."""
    is_owned = getattr(lock, "_is_owned", None)  # CPython's RLock; Condition relies on it
    return bool(is_owned()) if callable(is_owned) else False
