"""Serving cost: throughput and time to first token for 1/4/16 concurrent agent sessions,
through the HTTP server vs in process (ChatCore, ChatInfLLM), and the HTTP hop itself.

    python -m benchmarks.serve_bench [--model smollm2-135m-instruct]
        [--config config/smollm2-cpu.yaml] [--concurrency 1 4 16] [--steps 4]

Each agent session is scripted (same for every mode): a system prompt and a task, then
`--steps` turns, each answered with `--max-tokens` tokens at most and followed by a
~`--observation-words` observation, so every step re-sends the whole history (the
engine computes only what is new). The server runs as its own process
(`python -m langchain_infllm.serve`) and is driven by the `openai` SDK's async client;
in-process modes run one thread per session. Writes benchmarks/results/serve.json and
a table in benchmarks/results/serve_notes.md. Refuses to run while /tmp/BENCH_LOCK
exists (someone else is measuring) and holds that lock while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, machine, write_results

LOCK = Path("/tmp/BENCH_LOCK")
ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are a careful log analyst. Answer in one short sentence."
WORDS = ("disk", "cache", "retry", "timeout", "worker", "queue", "shard", "lease", "ping")

logger = logging.getLogger("serve_bench")


def observation(session: int, step: int, words: int) -> str:
    """A deterministic, session-specific observation of about `words` words."""
    body = " ".join(WORDS[(session * 7 + step * 3 + i) % len(WORDS)] for i in range(words))
    return f"Observation {step} for job {session}: {body}. What is the most likely cause?"


def script(session: int, step: int, words: int, history: list[dict[str, Any]]) -> None:
    if not history:
        history.append({"role": "system", "content": SYSTEM})
    history.append({"role": "user", "content": observation(session, step, words)})


@contextmanager
def bench_lock() -> Iterator[None]:
    if LOCK.exists():
        raise SystemExit(f"{LOCK} exists: another benchmark is running; try later")
    LOCK.write_text(f"serve_bench pid {os.getpid()}\n")
    try:
        yield
    finally:
        LOCK.unlink(missing_ok=True)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def summarise(
    mode: str, sessions: int, wall: float, requests: list[dict[str, float]]
) -> dict[str, Any]:
    ttft = sorted(r["ttft"] for r in requests)
    tokens = sum(r["completion_tokens"] for r in requests)
    return {
        "mode": mode,
        "sessions": sessions,
        "requests": len(requests),
        "wall_s": round(wall, 3),
        "completion_tokens": int(tokens),
        "tokens_per_s": round(tokens / wall, 2) if wall else None,
        "requests_per_s": round(len(requests) / wall, 3) if wall else None,
        "ttft_median_s": round(statistics.median(ttft), 4),
        "ttft_p90_s": round(ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))], 4),
        "latency_median_s": round(statistics.median(r["latency"] for r in requests), 4),
        "cached_share": round(
            sum(r["cached_tokens"] for r in requests)
            / max(1, sum(r["prompt_tokens"] for r in requests)),
            3,
        ),
    }


# ---------------------------------------------------------------------- in-process modes
def run_threads(
    sessions: int,
    steps: int,
    one_step: Callable[[int, list[dict[str, Any]]], dict[str, float]],
    words: int,
) -> tuple[float, list[dict[str, float]]]:
    results: list[dict[str, float]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def agent(index: int) -> None:
        history: list[dict[str, Any]] = []
        try:
            for step in range(steps):
                script(index, step, words, history)
                row = one_step(index, history)
                with lock:
                    results.append(row)
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    began = time.perf_counter()
    threads = [threading.Thread(target=agent, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - began, results


def core_step(
    core: Any, params: Any, tag: str
) -> Callable[[int, list[dict[str, Any]]], dict[str, float]]:
    from langchain_infllm.chat_core import TextDelta, UsageEvent

    def step(index: int, history: list[dict[str, Any]]) -> dict[str, float]:
        began = time.perf_counter()
        first = None
        text: list[str] = []
        usage: Any = None
        for event in core.run(history, params=params, session_id=f"{tag}-{index}"):
            if isinstance(event, TextDelta):
                first = first or time.perf_counter()
                text.append(event.text)
            elif isinstance(event, UsageEvent):
                usage = event
        end = time.perf_counter()
        history.append({"role": "assistant", "content": "".join(text)})
        return {
            "ttft": (first or end) - began,
            "latency": end - began,
            "completion_tokens": usage.completion_tokens,
            "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.cached_tokens,
        }

    return step


def chat_infllm_step(llm: Any, tag: str) -> Callable[[int, list[dict[str, Any]]], dict[str, float]]:
    from langchain_core.messages import convert_to_messages

    def step(index: int, history: list[dict[str, Any]]) -> dict[str, float]:
        began = time.perf_counter()
        first = None
        full: Any = None
        for chunk in llm.stream(convert_to_messages(history), session_id=f"{tag}-{index}"):
            if chunk.content and first is None:
                first = time.perf_counter()
            full = chunk if full is None else full + chunk
        end = time.perf_counter()
        history.append({"role": "assistant", "content": str(full.content)})
        usage = full.usage_metadata or {}
        details = usage.get("input_token_details") or {}
        return {
            "ttft": (first or end) - began,
            "latency": end - began,
            "completion_tokens": usage.get("output_tokens", 0),
            "prompt_tokens": usage.get("input_tokens", 0),
            "cached_tokens": details.get("cache_read", 0),
        }

    return step


# ---------------------------------------------------------------------- server mode
async def server_agents(
    base_url: str, model: str, sessions: int, steps: int, max_tokens: int, words: int, tag: str
) -> tuple[float, list[dict[str, float]]]:
    import openai

    client: Any = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    results: list[dict[str, float]] = []

    async def agent(index: int) -> None:
        history: list[dict[str, Any]] = []
        for step in range(steps):
            script(index, step, words, history)
            began = time.perf_counter()
            first = None
            text: list[str] = []
            usage: Any = None
            stream = await client.chat.completions.create(
                model=model,
                messages=history,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"X-Session-Id": f"{tag}-{index}"},
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
            end = time.perf_counter()
            history.append({"role": "assistant", "content": "".join(text)})
            cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
            results.append(
                {
                    "ttft": (first or end) - began,
                    "latency": end - began,
                    "completion_tokens": usage.completion_tokens,
                    "prompt_tokens": usage.prompt_tokens,
                    "cached_tokens": cached,
                }
            )

    began = time.perf_counter()
    await asyncio.gather(*(agent(i) for i in range(sessions)))
    wall = time.perf_counter() - began
    await client.close()
    return wall, results


async def http_round_trip(url: str, n: int = 200) -> dict[str, float]:
    """The hop without the engine: GET /health, one connection, sequential."""
    import httpx

    times = []
    async with httpx.AsyncClient() as client:
        for _ in range(n):
            began = time.perf_counter()
            (await client.get(f"{url}/health")).raise_for_status()
            times.append(time.perf_counter() - began)
    return {
        "health_round_trip_median_ms": round(1000 * statistics.median(times), 3),
        "health_round_trip_p90_ms": round(1000 * sorted(times)[int(0.9 * n)], 3),
    }


PROBE = [{"role": "user", "content": "Reply with one word: ready?"}]


def probe_in_process(core: Any, params: Any, n: int) -> list[float]:
    """The same one-token request again and again: almost no engine work, so in-process
    vs HTTP latency of this request is the hop (JSON, SSE, sockets, event loop)."""
    times = []
    for _ in range(n + 1):
        began = time.perf_counter()
        for _event in core.run(PROBE, params=params, session_id="probe"):
            pass
        times.append(time.perf_counter() - began)
    return times[1:]  # the first one computes the prompt


def probe_server(base_url: str, model: str, n: int, stream: bool) -> list[float]:
    import openai

    client: Any = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0)
    times = []
    for _ in range(n + 1):
        began = time.perf_counter()
        reply = client.chat.completions.create(
            model=model,
            messages=PROBE,
            max_tokens=1,
            temperature=0,
            stream=stream,
            extra_headers={"X-Session-Id": "probe"},
        )
        if stream:
            for _chunk in reply:
                pass
        times.append(time.perf_counter() - began)
    client.close()
    return times[1:]


def paired_probes(core: Any, params: Any, base_url: str, model: str, n: int) -> dict[str, Any]:
    """In process and over HTTP, alternately, on one engine each: the same conditions
    (machine load included) for both, so the median difference is the hop."""
    local, remote, streamed = [], [], []
    probe_in_process(core, params, 1)
    probe_server(base_url, model, 1, stream=False)
    for _ in range(n):
        local += probe_in_process(core, params, 1)
        remote += probe_server(base_url, model, 1, stream=False)
        streamed += probe_server(base_url, model, 1, stream=True)
    return {
        "one_token_request_in_process_ms": ms(local),
        "one_token_request_server_ms": ms(remote),
        "one_token_request_server_stream_ms": ms(streamed),
        "one_token_request_hop_ms": round(
            1000 * statistics.median(r - c for r, c in zip(remote, local, strict=True)), 2
        ),
        "one_token_request_hop_stream_ms": round(
            1000 * statistics.median(r - c for r, c in zip(streamed, local, strict=True)), 2
        ),
        "probes": n,
    }


def ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 2)


@contextmanager
def server_process(
    model: str, config: str, port: int, threads: int, max_tokens: int
) -> Iterator[str]:
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "langchain_infllm.serve",
            "--model",
            model,
            "--config",
            config,
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--max-tokens",
            str(max_tokens),
            "--max-concurrent-sessions",
            "64",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError("server exited during start-up")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def markdown(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    lines = [
        "# Serving: HTTP server vs in process",
        "",
        f"{payload['machine']['date']}, `uptime` before: `{payload['uptime_before']}`, after: "
        f"`{payload['uptime_after']}`. Model `{payload['args']['model']}`, config "
        f"`{payload['args']['config']}`, {payload['args']['steps']} steps per session, "
        f"≤{payload['args']['max_tokens']} tokens per reply, greedy, "
        f"{payload['args']['threads']} torch thread(s) in the engine process.",
        "",
        "| mode | sessions | requests | wall s | tokens/s | requests/s | TTFT median s "
        "| TTFT p90 s | latency median s | prompt share reused |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['sessions']} | error: {r['error']} |||||||| |")
            continue
        lines.append(
            f"| {r['mode']} | {r['sessions']} | {r['requests']} | {r['wall_s']} | "
            f"{r['tokens_per_s']} | {r['requests_per_s']} | {r['ttft_median_s']} | "
            f"{r['ttft_p90_s']} | {r['latency_median_s']} | {r['cached_share']} |"
        )
    hop = payload["http_hop"]
    lines += [
        "",
        "HTTP hop: the same one-token request, in process (ChatCore.run) and over HTTP in "
        f"alternation ({hop.get('probes')} pairs): median "
        f"{hop.get('one_token_request_in_process_ms')} ms in process vs "
        f"{hop.get('one_token_request_server_ms')} ms over HTTP "
        f"({hop.get('one_token_request_server_stream_ms')} ms streamed); median paired "
        f"difference {hop.get('one_token_request_hop_ms')} ms "
        f"({hop.get('one_token_request_hop_stream_ms')} ms streamed). `GET /health` round trip "
        f"median {hop.get('health_round_trip_median_ms')} ms (p90 "
        f"{hop.get('health_round_trip_p90_ms')} ms). At 1 session, server minus ChatCore: "
        f"TTFT median {hop.get('ttft_delta_1_session_ms')} ms, latency median "
        f"{hop.get('latency_delta_1_session_ms')} ms (noise of a shared machine included).",
        "",
        "One engine serialises the model's forward passes, so more sessions share one "
        "throughput; what concurrency buys is that one session's observation is computed "
        "while the others wait, and TTFT grows with the queue. Timings from a shared machine "
        "are noisy: compare modes within one run.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--config", default=str(ROOT / "config/smollm2-cpu.yaml"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--observation-words", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["chat_core", "chat_infllm", "server"],
        help="chat_core, chat_infllm, server; 'hop' alone measures only the HTTP hop",
    )
    parser.add_argument("--name", default="serve")
    parser.add_argument("--probes", type=int, default=20, help="one-token requests per hop probe")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    import torch

    from langchain_infllm.chat_core import ChatCore, GenerationParams
    from langchain_infllm.serve.backend import engine_of
    from langchain_infllm.serve.background import free_port

    torch.set_num_threads(args.threads)
    with bench_lock():
        before = uptime()
        rows: list[dict[str, Any]] = []
        params = GenerationParams(max_tokens=args.max_tokens, temperature=0.0)
        probe = GenerationParams(max_tokens=1, temperature=0.0)
        core: Any = None
        if {"chat_core", "chat_infllm", "hop"} & set(args.modes):
            core = ChatCore.from_model(args.model, args.config)
            probe_in_process(core, probe, 3)  # warm-up
            if "chat_core" in args.modes:
                for n in args.concurrency:
                    wall, reqs = run_threads(
                        n, args.steps, core_step(core, params, f"core{n}"), args.observation_words
                    )
                    rows.append(summarise("chat_core", n, wall, reqs))
                    logger.info("%s", rows[-1])
            if "chat_infllm" in args.modes:
                from langchain_infllm import ChatInfLLM

                llm = ChatInfLLM(engine=engine_of(core), max_tokens=args.max_tokens, temperature=0)
                for n in args.concurrency:
                    try:
                        wall, reqs = run_threads(
                            n, args.steps, chat_infllm_step(llm, f"lc{n}"), args.observation_words
                        )
                        rows.append(summarise("chat_infllm", n, wall, reqs))
                    except Exception as exc:  # an adapter mid-rewrite must not sink the run
                        rows.append(
                            {"mode": "chat_infllm", "sessions": n, "error": repr(exc)[:200]}
                        )
                    logger.info("%s", rows[-1])
        hop: dict[str, Any] = {}
        if {"server", "hop"} & set(args.modes):
            port = args.port or free_port()
            with server_process(
                args.model, args.config, port, args.threads, args.max_tokens
            ) as url:
                hop.update(asyncio.run(http_round_trip(url)))
                if core is not None:
                    hop.update(paired_probes(core, probe, f"{url}/v1", args.model, args.probes))
                for n in args.concurrency if "server" in args.modes else ():
                    wall, reqs = asyncio.run(
                        server_agents(
                            f"{url}/v1",
                            args.model,
                            n,
                            args.steps,
                            args.max_tokens,
                            args.observation_words,
                            f"srv{n}",
                        )
                    )
                    rows.append(summarise("server", n, wall, reqs))
                    logger.info("%s", rows[-1])
        by = {(r["mode"], r["sessions"]): r for r in rows if "error" not in r}
        if ("server", 1) in by and ("chat_core", 1) in by:
            s, c = by[("server", 1)], by[("chat_core", 1)]
            hop["ttft_delta_1_session_ms"] = round(
                1000 * (s["ttft_median_s"] - c["ttft_median_s"]), 1
            )
            hop["latency_delta_1_session_ms"] = round(
                1000 * (s["latency_median_s"] - c["latency_median_s"]), 1
            )
        payload = {
            "machine": machine(),
            "uptime_before": before,
            "uptime_after": uptime(),
            "args": vars(args),
            "rows": rows,
            "http_hop": hop,
        }
        path = write_results(args.name, payload)
        notes = RESULTS_DIR / f"{args.name}_notes.md"
        notes.write_text(markdown(payload))
        print(json.dumps({"results": str(path), "notes": str(notes)}))


if __name__ == "__main__":
    main()
