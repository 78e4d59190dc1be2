"""Scale-out on Ray Serve: N replicas, each holding a `ChatCore`; a session's requests go
to the replica that holds it; every session is saved to a shared folder after each
request, so when a replica dies its sessions continue on another with nothing recomputed.

::

    python -m langchain_infllm.serve.ray_app --model NAME --config config/X.yaml \\
        --replicas 2 --spill-dir /shared/sessions [--host 127.0.0.1 --port 8000]

Routing uses Serve's model multiplexing keyed by session id: the ingress (the same
FastAPI app as the single-process server) reads ``X-Session-Id`` or ``user`` and calls
the replicas with ``multiplexed_model_id=<session id>``; Serve sends it to a replica
that has "loaded" that id (the session), else to the one with the fewest sessions, which
then loads it from the shared folder. Requests without a session id go to any replica
(best prefix match among that replica's sessions). Only plain dicts cross processes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ray import serve

from langchain_infllm.serve.app import ServeSettings, backend_error, create_app
from langchain_infllm.serve.backend import LocalBackend, engine_of
from langchain_infllm.serve.errors import APIError

logger = logging.getLogger(__name__)

REPLICA_DEPLOYMENT = "ChatReplica"
INGRESS_DEPLOYMENT = "ChatIngress"
SESSIONS_PER_REPLICA = 64


def snapshot_path(spill_dir: str | Path, session_id: str) -> Path:
    """Where a session's snapshot lives in the shared folder (readable name + digest, so
    ids differing only in unsafe characters never collide)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", session_id)[:80]
    digest = hashlib.sha256(session_id.encode()).hexdigest()[:16]
    return Path(spill_dir) / f"{safe}-{digest}"


def error_event(exc: BaseException) -> dict[str, Any]:
    """An exception as an event: it crosses the process boundary as plain data and the
    ingress turns it back into the same HTTP error."""
    err = exc if isinstance(exc, APIError) else backend_error(exc)
    return {
        "type": "error",
        "status": err.status,
        "message": err.message,
        "error_type": err.type,
        "param": err.param,
        "code": err.code,
    }


class _Held:
    """What Serve's multiplexing keeps per session on a replica; when Serve evicts it
    (least recently used), the session's memory is released (it is on the shared disk)."""

    def __init__(self, replica: ChatReplica, session_id: str) -> None:
        self.replica = replica
        self.session_id = session_id

    def __del__(self) -> None:
        try:
            self.replica.release(self.session_id)
        except Exception:  # never raise out of a finaliser
            logger.debug("could not release session %s", self.session_id, exc_info=True)


class ChatReplica:
    """One engine + chat core; sessions come and go by multiplexed id."""

    def __init__(
        self,
        model: str,
        config: str | dict[str, Any] | None,
        spill_dir: str,
        threads: int | None = None,
    ) -> None:
        from langchain_infllm.serve.__main__ import build_core

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.core = build_core(model, config)
        self.backend = LocalBackend(self.core)
        self.engine = engine_of(self.core)
        self.spill_dir = Path(spill_dir)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()
        logger.info("replica %s serving %s", self.replica_id, self.core.model_name)

    @serve.multiplexed(max_num_models_per_replica=SESSIONS_PER_REPLICA)
    async def _hold(self, session_id: str) -> _Held:
        """Called when Serve routes a session here that this replica does not hold:
        adopt it from the shared folder (the latest snapshot wins over a local copy)."""
        await asyncio.to_thread(self._adopt, session_id)
        return _Held(self, session_id)

    def _adopt(self, session_id: str) -> None:
        from langchain_infllm.engine.persistence import committed_path

        path = committed_path(snapshot_path(self.spill_dir, session_id))
        if not (path / "manifest.json").is_file():
            return  # a new session
        store = self.engine.sessions
        if session_id in store:
            store.drop(session_id)
        began = time.perf_counter()
        session = self.engine.load_session(path, session_id)
        logger.info(
            "replica %s adopted session %s (%d tokens) in %.2f s",
            self.replica_id,
            session_id,
            len(session),
            time.perf_counter() - began,
        )

    def release(self, session_id: str) -> None:
        """Free a session's memory here (Serve evicted it); its snapshot stays shared."""
        store = self.engine.sessions
        if session_id in store:
            store.spill(session_id)

    def _save(self, session_id: str) -> None:
        store = self.engine.sessions
        if session_id in store:
            store.get_or_create(session_id).save(snapshot_path(self.spill_dir, session_id))

    async def chat(self, job: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one job's events; the session is on the shared disk before the finish
        event goes out, so a client that saw the reply can continue anywhere."""
        session_id = serve.get_multiplexed_model_id() or None
        try:
            if session_id is not None:
                await self._hold(session_id)
            async for event in self.backend.stream({**job, "session_id": session_id}):
                if event["type"] == "finish":
                    if session_id is not None:
                        await asyncio.to_thread(self._save, session_id)
                    yield {"type": "extra", "replica": self.replica_id}
                yield event
        except Exception as exc:
            yield error_event(exc)

    def health(self) -> dict[str, Any]:
        return {"replica": self.replica_id, "sessions": self.core.session_ids()}


class RayBackend:
    """The ingress's backend: jobs streamed from `ChatReplica`s through a Serve handle."""

    def __init__(self, handle: Any, model_name: str, replicas: int) -> None:
        self.handle = handle
        self.model_name = model_name
        self.replicas = replicas

    async def stream(self, job: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        session_id = job.get("session_id")
        options: dict[str, Any] = {"stream": True}
        if session_id:
            options["multiplexed_model_id"] = session_id
        response = self.handle.options(**options).chat.remote(dict(job))
        finished = False
        try:
            async for event in response:
                yield event
            finished = True
        finally:
            if not finished:
                response.cancel()  # the client went away: stop the replica's generation

    async def aclose(self) -> None:
        """Replicas save every session after each request; nothing is left to spill."""

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "replicas": self.replicas}


@serve.ingress()
class ChatIngress:
    """The OpenAI HTTP front: auth, limits and schema checks happen here, once."""

    def __init__(
        self, replicas: Any, model_name: str, num_replicas: int, settings: dict[str, Any]
    ) -> None:
        self._backend = RayBackend(replicas, model_name, num_replicas)
        self._settings = ServeSettings(**settings)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self._backend, self._settings)


def build_app(
    model: str,
    config: str | dict[str, Any] | None,
    *,
    spill_dir: str,
    replicas: int = 2,
    model_name: str | None = None,
    replica_cpus: float = 1.0,
    replica_gpus: float = 0.0,
    threads: int | None = 1,
    settings: ServeSettings | None = None,
) -> Any:
    """The Serve application: an ingress over `replicas` chat replicas."""
    settings = settings or ServeSettings()
    replica = (
        serve.deployment(name=REPLICA_DEPLOYMENT)(ChatReplica)
        .options(
            num_replicas=replicas,
            ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        )
        .bind(model, config, str(Path(spill_dir).resolve()), threads)
    )
    ingress = serve.deployment(name=INGRESS_DEPLOYMENT)(ChatIngress).options(
        ray_actor_options={"num_cpus": 0}
    )
    return ingress.bind(
        replica,
        model_name or model,
        replicas,
        {
            "api_key": settings.api_key,
            "max_request_bytes": settings.max_request_bytes,
            "max_tokens_cap": settings.max_tokens_cap,
            "max_concurrent_sessions": settings.max_concurrent_sessions,
        },
    )


def main(argv: Sequence[str] | None = None) -> None:
    import os

    import ray

    parser = argparse.ArgumentParser(
        prog="python -m langchain_infllm.serve.ray_app",
        description="OpenAI-compatible chat server on Ray Serve, sessions routed by id.",
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", default=None)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--spill-dir", required=True, help="folder every replica can read and write (shared disk)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("INFLLM_API_KEY"))
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--max-concurrent-sessions", type=int, default=64)
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--replica-gpus", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app(
        args.model,
        args.config,
        spill_dir=args.spill_dir,
        replicas=args.replicas,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus,
        threads=args.threads,
        settings=ServeSettings(
            api_key=args.api_key or None,
            max_tokens_cap=args.max_tokens,
            max_concurrent_sessions=args.max_concurrent_sessions,
        ),
    )
    serve.run(app, name="infllm", route_prefix="/", blocking=True)


if __name__ == "__main__":
    main()
