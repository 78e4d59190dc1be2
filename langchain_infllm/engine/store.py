"""Sessions by id, within a host-memory budget: the least recently used spill to disk.

A spilled session is a normal snapshot (see `persistence`) in the spill folder; asking
for its id loads it back, so spilling loses nothing.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from langchain_infllm.engine.engine import InfLLMEngine
    from langchain_infllm.engine.session import Session

logger = logging.getLogger(__name__)


class SessionStore:
    """Get-or-create sessions by id; spill LRU ones when the host budget is exceeded."""

    def __init__(self, engine: InfLLMEngine, spill_dir: str | Path | None = None) -> None:
        self._engine = engine
        self._live: dict[str, Session] = {}
        self._spilled: dict[str, Path] = {}
        self._lock = threading.RLock()
        self._spill_dir = Path(spill_dir) if spill_dir else None

    @property
    def spill_dir(self) -> Path:
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="infllm-spill-"))
        return self._spill_dir

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._live or session_id in self._spilled

    def live_ids(self) -> list[str]:
        return list(self._live)

    def spilled_ids(self) -> list[str]:
        return list(self._spilled)

    def get_or_create(self, session_id: str) -> Session:
        from langchain_infllm.engine.session import Session

        with self._lock:
            session = self._live.get(session_id)
            if session is None and session_id in self._spilled:
                path = self._spilled.pop(session_id)
                session = self._engine.load_session(path)
                session.session_id = session_id
                shutil.rmtree(path, ignore_errors=True)
                logger.info("session %s reloaded from %s", session_id, path)
            if session is None:
                session = Session(self._engine, session_id)
            session.last_used = time.monotonic()
            self._live[session_id] = session
            self.enforce_budget(keep=session_id)
            return session

    def put(self, session: Session) -> None:
        with self._lock:
            self._spilled.pop(session.session_id, None)
            self._live[session.session_id] = session
            self.enforce_budget(keep=session.session_id)

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._live.pop(session_id, None)
            path = self._spilled.pop(session_id, None)
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)

    def host_bytes(self) -> int:
        return sum(s.host_bytes() for s in self._live.values())

    def enforce_budget(self, keep: str | None = None) -> None:
        """Spill least recently used sessions until live host bytes fit the budget."""
        budget = self._engine.config.session_host_budget_bytes
        if budget is None:
            return
        with self._lock:
            by_age = sorted(self._live.values(), key=lambda s: s.last_used)
            for session in by_age:
                if self.host_bytes() <= budget:
                    return
                if session.session_id == keep:
                    continue
                self.spill(session.session_id)

    def spill(self, session_id: str) -> Path:
        """Write a live session to disk and drop it from memory."""
        with self._lock:
            session = self._live[session_id]
            with session.lock:
                safe = re.sub(r"[^A-Za-z0-9_.-]", "_", session_id)[:80]
                path = self.spill_dir / f"{safe}-{abs(hash(session_id)) % 10**8}"
                session.save(path)
                self._spilled[session_id] = path
                del self._live[session_id]
            logger.info("session %s spilled to %s", session_id, path)
            return path
