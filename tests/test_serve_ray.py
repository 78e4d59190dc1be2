"""Ray Serve scale-out: two replicas, sessions routed by id, one replica killed.

A local Ray cluster (2 CPUs) runs the ingress and two `ChatReplica`s on a tiny random
Qwen2 (saved to a folder with the Qwen tokenizer). Two sessions each stay on the replica
that served their first turn; then the replica holding one of them is killed, and that
session's next turn runs on the other replica from the shared snapshot: the same reply,
the same next-token log-probabilities and the same reused-token count as an
uninterrupted run of the same turns in this process, so nothing was recomputed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

TURNS = ["Hello, who are you?", "Tell me more.", "And then?"]
TOP = 5


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    from langchain_infllm.models.embedded import ensure_embedded_model
    from tests.tiny_models import tiny_chat_qwen2

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model("qwen2.5-coder-0.5b-instruct"))
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_chat_qwen2(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def config_dict() -> dict[str, Any]:
    from tests.shared_configs import TINY_CHAT_CONFIG

    return TINY_CHAT_CONFIG.model_dump(mode="json")


@pytest.fixture
def cluster(tiny_model_dir: Path, tmp_path: Path) -> Iterator[str]:
    from langchain_infllm.serve import ServeSettings
    from langchain_infllm.serve.background import free_port
    from langchain_infllm.serve.ray_app import build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            str(tiny_model_dir),
            config_dict(),
            spill_dir=str(tmp_path / "shared"),
            replicas=2,
            replica_cpus=0.5,
            threads=1,
            settings=ServeSettings(max_tokens_cap=8),
        )
        serve.run(app, name="infllm", route_prefix="/")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def ask(client: Any, model: str, session: str, history: list[dict[str, str]]) -> Any:
    """One turn; retried while the cluster notices a dead replica (5xx / refused)."""
    import openai

    deadline = time.monotonic() + 120
    while True:
        try:
            return client.chat.completions.create(
                model=model,
                messages=history,
                max_tokens=4,
                temperature=0,
                extra_headers={"X-Session-Id": session},
                extra_body={"infllm": {"next_token_logprobs": TOP}},
            )
        except (openai.InternalServerError, openai.APIConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def reference_run(
    model_dir: Path, histories: list[list[dict[str, str]]]
) -> list[tuple[str, int, list[dict[str, Any]]]]:
    """The same turns in this process, never interrupted: (text, cached, top logprobs)."""
    import torch

    from langchain_infllm.chat_core import GenerationParams, TextDelta, UsageEvent
    from langchain_infllm.serve.__main__ import build_core
    from langchain_infllm.serve.backend import next_token_logprobs

    torch.set_num_threads(1)
    core = build_core(str(model_dir), config_dict())
    params = GenerationParams(max_tokens=4, temperature=0.0)
    out = []
    for history in histories:
        text, cached = [], -1
        for event in core.run(history, params=params, session_id="ref"):
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, UsageEvent):
                cached = event.cached_tokens
        out.append(("".join(text), cached, next_token_logprobs(core, "ref", TOP)))
    return out


def test_sessions_follow_their_replica_and_survive_its_death(
    cluster: str, tiny_model_dir: Path
) -> None:
    import openai

    model = str(tiny_model_dir)
    client = openai.OpenAI(base_url=cluster, api_key="unused", max_retries=0, timeout=120)
    histories: dict[str, list[dict[str, str]]] = {"alpha": [], "beta": []}
    sent: dict[str, list[list[dict[str, str]]]] = {"alpha": [], "beta": []}
    replies: dict[str, list[Any]] = {"alpha": [], "beta": []}

    def turn(session: str, index: int) -> Any:
        history = histories[session]
        history.append({"role": "user", "content": f"{session}: {TURNS[index]}"})
        sent[session].append([dict(m) for m in history])
        reply = ask(client, model, session, history)
        history.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
        replies[session].append(reply)
        return reply

    def replica(reply: Any) -> str:
        return str((reply.model_extra or {})["infllm"]["replica"])

    for session in histories:
        turn(session, 0)
    time.sleep(1.5)  # replicas report the sessions they hold to Serve's routers
    for session in histories:
        turn(session, 1)
    # Routed consistently: each session's second turn ran where its first did.
    for session in histories:
        first, second = (replica(r) for r in replies[session])
        assert first == second, (session, first, second)

    victim = replica(replies["beta"][-1])
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    moved = turn("beta", 2)
    assert replica(moved) != victim
    turn("alpha", 2)

    # Beta continued elsewhere exactly as an uninterrupted run of the same turns.
    expected = reference_run(tiny_model_dir, sent["beta"])
    for reply, (text, cached, top) in zip(replies["beta"], expected, strict=True):
        assert reply.choices[0].message.content == text
        assert reply.usage.prompt_tokens_details.cached_tokens == cached
        got = reply.model_extra["infllm"]["next_token_logprobs"]
        assert [g["token_id"] for g in got] == [t["token_id"] for t in top]
        for g, t in zip(got, top, strict=True):
            assert g["logprob"] == pytest.approx(t["logprob"], abs=1e-4)
    # Nothing of beta's history was recomputed on the new replica.
    assert moved.usage.prompt_tokens_details.cached_tokens >= replies["beta"][1].usage.prompt_tokens
