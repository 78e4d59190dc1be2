"""Agent-loop step cost as the context grows (issue 3).

    python -m benchmarks.agent_steps [--model smollm2-135m-instruct]
        [--config config/smollm2-cpu.yaml] [--start-context 2048] [--max-context 32768]
        [--step-tokens 500] [--gen-tokens 32] [--measure-every 1] [--recompute-every 8]

An agent step appends an observation (`--step-tokens` tokens) to the history and the
model answers (`--gen-tokens` tokens, greedy, no early stop, so every method's history
has the same length). The whole history is re-sent every step, as an agent loop does.
Methods, each in its own process so that its peak RSS is its own:

* ``infllm``: this engine; each step is `session.sync(history)` (only the observation is
  computed: the previous answer is already in the session) then `session.generate`.
* ``vanilla_cache``: the unmodified model with a reused transformers `DynamicCache`
  (prefix cache: the observation is computed, the KV of the whole history is kept).
* ``recompute``: the unmodified model recomputing the whole prompt every step, as a
  stateless wrapper (ChatHuggingFace + `generate`) does. It is expensive, so it is timed
  only every `--recompute-every` steps; being stateless, its other steps cost nothing to skip.

With `--measure-every N > 1`, the stateful methods time one step in N; the steps between
are fast-forwarded (their observation plus a scripted stand-in for the answer appended in
one untimed `sync`), so the context still grows by the same tokens. Token ids are seeded
random ids (the content does not change the cost). Writes
`benchmarks/results/agent_steps.{json,csv,png}`.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import (
    VanillaRunner,
    current_rss_bytes,
    engine_config,
    engine_generate,
    machine,
    native_window,
    peak_rss_bytes,
    run_isolated,
    set_threads,
    write_csv,
    write_results,
)

METHODS = ("infllm", "vanilla_cache", "recompute")
METHOD_LABELS = {
    "infllm": "InfLLM session.sync",
    "vanilla_cache": "vanilla + reused DynamicCache",
    "recompute": "vanilla, recompute whole prompt",
}


def script_ids(seed: int, tag: str, n: int, low: int, high: int) -> list[int]:
    """Deterministic pseudo-random token ids in [low, high)."""
    rng = random.Random(f"{seed}-{tag}")
    return [rng.randrange(low, high) for _ in range(n)]


def n_steps_for(start_context: int, max_context: int, step_tokens: int, gen_tokens: int) -> int:
    """Steps until the history reaches `max_context` tokens."""
    return max(1, math.ceil((max_context - start_context) / (step_tokens + gen_tokens)))


class _EngineState:
    def __init__(self, model: Any, config: Any) -> None:
        from langchain_infllm import InfLLMEngine

        self.engine = InfLLMEngine(model, None, engine_config(config, trace="off"))
        self.session = self.engine.new_session()

    def sync(self, ids: list[int]) -> int:
        return int(self.session.sync(ids).computed_tokens)

    def generate(self, n: int) -> list[int]:
        return engine_generate(self.session, n)

    def state_bytes(self) -> int:
        return int(self.session.host_bytes() + self.session.device_bytes()
                   + self.engine.cache_resident_bytes())

    def device_bytes(self) -> int:
        return int(self.session.device_bytes() + self.engine.cache_resident_bytes())


class _VanillaState:
    def __init__(self, model: Any, reuse: bool, chunk: int) -> None:
        self.runner = VanillaRunner(model, chunk=chunk, reuse=reuse)

    def sync(self, ids: list[int]) -> int:
        return self.runner.sync(ids)

    def generate(self, n: int) -> list[int]:
        return self.runner.generate(n)

    def state_bytes(self) -> int:
        return self.runner.state_bytes()

    def device_bytes(self) -> int:
        return self.runner.state_bytes()


def run_agent_steps(
    model: Any,
    method: str,
    config: Any = None,
    *,
    start_context: int = 2048,
    max_context: int = 32768,
    step_tokens: int = 500,
    gen_tokens: int = 32,
    measure_every: int = 1,
    recompute_every: int = 8,
    seed: int = 0,
    id_range: tuple[int, int] = (100, 20000),
    native: int | None = None,
    vanilla_chunk: int = 4096,
    log: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """One row per step of one method; timed steps have `measured=True`.

    The first and last steps are always timed. The stateful methods consume the starting
    context before step 0 (untimed), so every step appends `step_tokens` to a warm state.
    `computed_tokens` counts the tokens the method pushed through the model for the step's
    prompt (not the generated ones).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    native = native if native is not None else native_window(model)
    state: _EngineState | _VanillaState
    if method == "infllm":
        if config is None:
            raise ValueError("the infllm method needs an InfLLMConfig")
        state = _EngineState(model, config)
        every = measure_every
    else:
        state = _VanillaState(model, reuse=method == "vanilla_cache", chunk=vanilla_chunk)
        every = recompute_every if method == "recompute" else measure_every
    low, high = id_range
    history = script_ids(seed, "start", start_context, low, high)
    steps = n_steps_for(start_context, max_context, step_tokens, gen_tokens)
    if method != "recompute":
        state.sync(history)  # the first prompt (system prompt, task): untimed warm-up
    rows: list[dict[str, Any]] = []
    for step in range(steps):
        observation = script_ids(seed, f"obs-{step}", step_tokens, low, high)
        measured = step % max(1, every) == 0 or step == steps - 1
        if not measured:
            history = history + observation + script_ids(seed, f"gen-{step}", gen_tokens,
                                                          low, high)
            continue
        if method != "recompute" and step > 0:
            state.sync(history)  # catch up on fast-forwarded steps (untimed; no-op otherwise)
        prompt = history + observation
        began = time.perf_counter()
        computed = state.sync(prompt)
        prefilled = time.perf_counter()
        answer = state.generate(gen_tokens)
        ended = time.perf_counter()
        history = prompt + answer
        rows.append({
            "method": method, "step": step, "measured": True,
            "context_before": len(prompt) - step_tokens, "context": len(prompt),
            "new_tokens": step_tokens, "computed_tokens": computed,
            "generated_tokens": len(answer),
            "prefill_s": round(prefilled - began, 4), "decode_s": round(ended - prefilled, 4),
            "step_s": round(ended - began, 4),
            "rss": current_rss_bytes(), "peak_rss": peak_rss_bytes(),
            "state_bytes": state.state_bytes(), "device_bytes": state.device_bytes(),
            "beyond_native": bool(native) and len(history) > native,
        })
        log(f"{method:14s} step {step:3d} context {len(prompt):6d}: "
            f"{rows[-1]['step_s']:7.2f}s (prefill {rows[-1]['prefill_s']:.2f}s, "
            f"computed {computed}) rss {rows[-1]['rss'] / 2**30:.2f} GiB")
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: step latency and peak RSS at the shortest and longest timed context."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["context"])
        first, last = mine[0], mine[-1]
        out[method] = {
            "timed_steps": len(mine),
            "shortest_context": first["context"], "longest_context": last["context"],
            "step_s_shortest": first["step_s"], "step_s_longest": last["step_s"],
            "step_ratio": last["step_s"] / first["step_s"] if first["step_s"] else None,
            "prefill_s_shortest": first["prefill_s"], "prefill_s_longest": last["prefill_s"],
            "prefill_ratio": (last["prefill_s"] / first["prefill_s"]
                              if first["prefill_s"] else None),
            "peak_rss_shortest": first["peak_rss"], "peak_rss_longest": last["peak_rss"],
            "rss_ratio": last["peak_rss"] / first["peak_rss"] if first["peak_rss"] else None,
            "state_bytes_shortest": first["state_bytes"],
            "state_bytes_longest": last["state_bytes"],
            "computed_tokens_longest": last["computed_tokens"],
        }
    return out


def markdown_summary(summary: dict[str, dict[str, Any]]) -> str:
    lines = ["| method | context (first → last) | step s (first → last) | ratio | "
             "prefill s (first → last) | ratio | peak RSS GiB (first → last) | ratio | "
             "tokens computed at last step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        lines.append(
            f"| {METHOD_LABELS.get(method, method)} | {s['shortest_context']} → "
            f"{s['longest_context']} | {s['step_s_shortest']:.2f} → {s['step_s_longest']:.2f} | "
            f"{s['step_ratio']:.2f}x | {s['prefill_s_shortest']:.2f} → "
            f"{s['prefill_s_longest']:.2f} | {s['prefill_ratio']:.2f}x | "
            f"{s['peak_rss_shortest'] / 2**30:.2f} → {s['peak_rss_longest'] / 2**30:.2f} | "
            f"{s['rss_ratio']:.2f}x | {s['computed_tokens_longest']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Any, native: int, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["context"])
        ctx = [r["context"] for r in mine]
        label = METHOD_LABELS.get(method, method)
        axes[0].plot(ctx, [r["step_s"] for r in mine], "o-", label=label, markersize=3)
        axes[1].plot(ctx, [r["prefill_s"] for r in mine], "o-", label=label, markersize=3)
        axes[2].plot(ctx, [r["peak_rss"] / 2**30 for r in mine], "o-", label=f"{label}: peak RSS",
                     markersize=3)
        axes[2].plot(ctx, [r["state_bytes"] / 2**30 for r in mine], "--",
                     label=f"{label}: KV/memory state")
    axes[0].set(xlabel="context tokens", ylabel="step latency (s)", yscale="log",
                title="step = sync/prefill + decode")
    axes[1].set(xlabel="context tokens", ylabel="prompt processing (s)", yscale="log",
                title="prompt part of the step")
    axes[2].set(xlabel="context tokens", ylabel="GiB", title="memory")
    for ax in axes:
        if native:
            ax.axvline(native, color="grey", linestyle=":", label="native window")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def _one(args: argparse.Namespace) -> list[dict[str, Any]]:
    from langchain_infllm import InfLLMConfig
    from langchain_infllm.models.embedded import load_model_and_tokenizer

    set_threads(args.threads)
    model, _ = load_model_and_tokenizer(args.model, device="cpu")
    if args.one != "infllm":
        model.set_attn_implementation("sdpa")
    config = InfLLMConfig.from_yaml(args.config) if args.one == "infllm" else None
    return run_agent_steps(
        model, args.one, config, start_context=args.start_context,
        max_context=args.max_context, step_tokens=args.step_tokens,
        gen_tokens=args.gen_tokens, measure_every=args.measure_every,
        recompute_every=args.recompute_every, seed=args.seed,
        log=lambda s: print(s, flush=True),
    )


def main() -> None:
    import json
    import sys

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--config", default="config/smollm2-cpu.yaml")
    parser.add_argument("--start-context", type=int, default=2048)
    parser.add_argument("--max-context", type=int, default=32768)
    parser.add_argument("--step-tokens", type=int, default=500)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--measure-every", type=int, default=1)
    parser.add_argument("--recompute-every", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="agent_steps")
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)  # the children get --threads too; machine() reports it
    if args.one:
        rows = _one(args)
        print(json.dumps({"rows": rows}))
        return
    passthrough = [a for a in sys.argv[1:] if a not in ("--methods", *METHODS)]
    began = time.perf_counter()
    from transformers import AutoConfig

    from langchain_infllm.models.embedded import ensure_embedded_model, is_embedded_model

    source = ensure_embedded_model(args.model) if is_embedded_model(args.model) else args.model
    native = int(getattr(AutoConfig.from_pretrained(source), "max_position_embeddings", 0))
    info = machine()
    rows: list[dict[str, Any]] = []

    def save(partial: bool) -> Any:  # after every method, so a stopped run keeps its data
        return write_results(args.name, {
            "machine": info, "model": args.model, "config_path": args.config,
            "args": vars(args), "native_window": native, "partial": partial,
            "wall_seconds": time.perf_counter() - began, "summary": summarize(rows),
            "rows": rows,
        })

    for method in args.methods:
        print(f"--- {method}", flush=True)
        result = run_isolated("benchmarks.agent_steps", [*passthrough, "--one", method])
        rows.extend(result["rows"])
        for r in result["rows"]:
            print(f"{method:14s} context {r['context']:6d}: step {r['step_s']:7.2f}s "
                  f"prefill {r['prefill_s']:6.2f}s computed {r['computed_tokens']:6d} "
                  f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB", flush=True)
        save(partial=True)
    summary = summarize(rows)
    path = save(partial=False)
    write_csv(args.name, rows)
    plot(rows, path.with_suffix(".png"), native,
         title=f"{args.model}, {args.step_tokens} new + {args.gen_tokens} generated tokens per "
               f"step; {info['date']}")
    print(markdown_summary(summary))
    print(f"wrote {path} ({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
