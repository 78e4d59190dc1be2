"""Cost of retrieval tracing on ChatInfLLM agent steps: trace levels side by side (issue 6).

    python -m benchmarks.trace_overhead [--model smollm2-135m-instruct]
        [--config config/smollm2-cpu.yaml] [--start-tokens 3000] [--steps 24]
        [--obs-tokens 300] [--gen-tokens 16] [--threads 1] [--profile]

One engine (and one model copy) per trace level (``off``, ``summary``, ``full``; the
level is an engine setting), one ``ChatInfLLM`` on each. Every level runs the same
agent-like conversation: a system prompt and a task with a long document
(``--start-tokens``, consumed by an untimed first call), then ``--steps`` steps, each
appending a tool observation of about ``--obs-tokens`` tokens after the model's previous
answer and asking for at most ``--gen-tokens`` new tokens (greedy). The context is far
beyond the config's local window, so every step retrieves memory blocks.

The levels are interleaved step by step, in an order that rotates every step, so machine
noise (other jobs on a shared box) hits all levels alike. ``summary`` and ``full`` calls
carry a :class:`~langchain_infllm.tracing.RetrievalTraceHandler` in
``config={"callbacks": [handler]}`` as a user would; ``off`` carries none (the untraced
production path) unless ``--handler-on-off``. A step's time is the wall time of
``invoke`` (rendering, engine sync and decoding, response metadata, trace events and the
handler). Reports the median step time per level and the overhead ratios summary/off and
full/off (ratio of medians, and median of the per-step paired ratios).

``--profile`` then runs ``--profile-steps`` more steps per level under cProfile and lists
the time per step of the tracing-path functions (summaries, payloads, block-text decoding,
event emission, the handler; see ``TRACE_PATH``) at each level. Writes
``benchmarks/results/trace_overhead.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, engine_config, machine, set_threads, write_results

LEVELS = ("off", "summary", "full")
TRACED = ("summary", "full")
SYSTEM_PROMPT = (
    "You are a careful research agent. You call tools, read their results and keep "
    "notes. After each tool result, write one short note about what it says."
)
_WORDS = [
    "alpha",
    "bravo",
    "cobalt",
    "delta",
    "ember",
    "falcon",
    "garnet",
    "harbor",
    "indigo",
    "juniper",
    "kestrel",
    "lumen",
    "meadow",
    "nickel",
    "orchid",
    "pepper",
    "quartz",
    "raven",
    "saffron",
    "timber",
    "umber",
    "violet",
    "willow",
    "xenon",
    "yarrow",
    "zephyr",
]


# ============================================================================ scripted text


def _sentence(rng: random.Random, tag: str, i: int) -> str:
    a, b, c = rng.sample(_WORDS, 3)
    return (
        f"[{tag}.{i}] The {a} ledger lists {rng.randrange(2, 999)} crates of {b} stored "
        f"on shelf {rng.randrange(1, 60)} near the {c} gate."
    )


def scripted_text(encode: Callable[[str], list[int]], tag: str, tokens: int, seed: int) -> str:
    """Deterministic tool-output-like text of about ``tokens`` tokens (whole sentences)."""
    rng = random.Random(f"{seed}-{tag}")
    lines: list[str] = []
    count = 0
    i = 0
    while count < tokens:
        line = _sentence(rng, tag, i)
        lines.append(line)
        count += len(encode(line + "\n"))
        i += 1
    return "\n".join(lines)


# ============================================================================ the benchmark


class _Level:
    """One trace level: its chat model, conversation and (optional) handler."""

    def __init__(self, level: str, llm: Any, handler: Any, history: list[Any]) -> None:
        self.level = level
        self.llm = llm
        self.handler = handler
        self.history = history

    def config(self) -> dict[str, Any]:
        return {"callbacks": [self.handler]} if self.handler is not None else {}

    def events_seen(self) -> tuple[int, int]:
        """(retrieval events, step-summary events) the handler has received so far."""
        if self.handler is None:
            return 0, 0
        steps = self.handler.steps
        retrievals = sum(len(s.retrievals) for s in steps)
        summaries = sum(1 for s in steps if s.summary_source == "event")
        return retrievals, summaries


def build_chat_models(
    models: Sequence[Any],
    tokenizer: Any,
    config: Any,
    *,
    gen_tokens: int,
    model_name: str = "model",
    levels: Sequence[str] = LEVELS,
) -> dict[str, Any]:
    """One ``ChatInfLLM`` per trace level, each on its own engine over its own model copy."""
    from langchain_infllm import InfLLMEngine
    from langchain_infllm.chat_models import ChatInfLLM

    if len(models) < len(levels):
        raise ValueError(f"{len(levels)} levels need as many model copies, got {len(models)}")
    llms = {}
    for level, model in zip(levels, models, strict=False):
        engine = InfLLMEngine(
            model, tokenizer, engine_config(config, trace=level), model_name=model_name
        )
        llms[level] = ChatInfLLM(engine=engine, model=model_name, max_tokens=gen_tokens)
    return llms


def run_trace_overhead(
    llms: dict[str, Any],
    encode: Callable[[str], list[int]],
    *,
    start_tokens: int = 3000,
    steps: int = 24,
    obs_tokens: int = 300,
    seed: int = 0,
    handler_on_off: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """One row per (step, level), the levels interleaved step by step in rotating order.

    ``llms`` maps trace levels to chat models whose engines have that ``trace`` setting
    (see :func:`build_chat_models`). Each row holds the step's wall time, the engine's
    own prefill/decode seconds (from ``response_metadata``), the rest (``outside_s``:
    rendering, metadata, trace events, callbacks), the events the handler received and a
    digest of the answer (the same on every level: tracing must not change the output).
    """
    from langchain_core.messages import HumanMessage, SystemMessage

    from langchain_infllm.tracing import RetrievalTraceHandler

    levels = [lv for lv in LEVELS if lv in llms]
    document = scripted_text(encode, "doc", start_tokens, seed)
    task = (
        "Task: audit the warehouse ledgers below, then use the search tool to check "
        "each shelf.\n\n" + document
    )
    states: dict[str, _Level] = {}
    for level in levels:
        use_handler = level in TRACED or handler_on_off
        handler = RetrievalTraceHandler() if use_handler else None
        history: list[Any] = [SystemMessage(SYSTEM_PROMPT), HumanMessage(task)]
        state = _Level(level, llms[level], handler, history)
        # Warm-up call (untimed): consumes the long document and writes the first answer.
        state.history.append(state.llm.invoke(state.history, config=state.config()))
        states[level] = state

    rows: list[dict[str, Any]] = []
    for step in range(steps):
        observation = scripted_text(encode, f"obs{step}", obs_tokens, seed)
        order = levels[step % len(levels) :] + levels[: step % len(levels)]
        for level in order:
            state = states[level]
            # A user turn, not a ToolMessage: a tool result must answer a tool call, and
            # the scripted answers call none (tracing cost does not depend on the role).
            state.history.append(HumanMessage(f"Observation:\n{observation}"))
            before = state.events_seen()
            began = time.perf_counter()
            answer = state.llm.invoke(state.history, config=state.config())
            step_s = time.perf_counter() - began
            after = state.events_seen()
            state.history.append(answer)
            meta = answer.response_metadata.get("infllm", {})
            engine_s = float(meta.get("prefill_seconds", 0.0)) + float(
                meta.get("decode_seconds", 0.0)
            )
            rows.append(
                {
                    "step": step,
                    "level": level,
                    "order": order.index(level),
                    "prompt_tokens": int(meta.get("prompt_tokens", 0)),
                    "tokens_computed": int(meta.get("tokens_computed", 0)),
                    "tokens_generated": int(meta.get("tokens_generated", 0)),
                    "retrievals": int(meta.get("retrievals", 0)),
                    "blocks_in_memory": int(meta.get("blocks_in_memory", 0)),
                    "step_s": round(step_s, 5),
                    "prefill_s": round(float(meta.get("prefill_seconds", 0.0)), 5),
                    "decode_s": round(float(meta.get("decode_seconds", 0.0)), 5),
                    "outside_s": round(step_s - engine_s, 5),
                    "retrieval_events": after[0] - before[0],
                    "summary_events": after[1] - before[1],
                    "answer_sha1": hashlib.sha1(str(answer.content).encode()).hexdigest()[:12],
                }
            )
            r = rows[-1]
            log(
                f"step {step:3d} {level:7s} prompt {r['prompt_tokens']:6d}: "
                f"{r['step_s']:.3f}s (engine {engine_s:.3f}s, outside {r['outside_s']:.4f}s) "
                f"gen {r['tokens_generated']:2d} events {r['retrieval_events']}"
                f"+{r['summary_events']}"
            )
    return rows


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per level medians; overhead ratios against ``off`` (of medians, and paired)."""
    levels = [lv for lv in LEVELS if any(r["level"] == lv for r in rows)]
    per: dict[str, dict[str, Any]] = {}
    for level in levels:
        mine = [r for r in rows if r["level"] == level]
        per[level] = {
            "steps": len(mine),
            "median_step_s": _median([r["step_s"] for r in mine]),
            "mean_step_s": statistics.fmean(r["step_s"] for r in mine),
            "median_engine_s": _median([r["prefill_s"] + r["decode_s"] for r in mine]),
            "median_outside_s": _median([r["outside_s"] for r in mine]),
            "median_prompt_tokens": _median([r["prompt_tokens"] for r in mine]),
            "max_prompt_tokens": max(r["prompt_tokens"] for r in mine),
            "mean_tokens_generated": statistics.fmean(r["tokens_generated"] for r in mine),
            "retrievals_per_step": _median([r["retrievals"] for r in mine]),
            "retrieval_events": sum(r["retrieval_events"] for r in mine),
            "summary_events": sum(r["summary_events"] for r in mine),
        }
    by_step: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_step.setdefault(r["step"], {})[r["level"]] = r
    ratios: dict[str, dict[str, Any]] = {}
    base = per.get("off", {}).get("median_step_s")
    for level in levels:
        if level == "off" or not base:
            continue
        paired = [
            s[level]["step_s"] / s["off"]["step_s"]
            for s in by_step.values()
            if level in s and "off" in s and s["off"]["step_s"] > 0
        ]
        ratios[f"{level}/off"] = {
            "ratio_of_medians": per[level]["median_step_s"] / base,
            "median_paired_ratio": _median(paired),
            "outside_s_added": (per[level]["median_outside_s"] or 0.0)
            - (per["off"]["median_outside_s"] or 0.0),
        }
    same = all(len({r["answer_sha1"] for r in s.values()}) == 1 for s in by_step.values())
    return {"levels": per, "overhead": ratios, "answers_identical_across_levels": same}


def markdown_table(summary: dict[str, Any]) -> str:
    lines = [
        "| trace level | steps | median step s | median engine s | median outside s | "
        "retrieval events | summary events | overhead vs off (ratio of medians) | "
        "overhead vs off (median paired ratio) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level, s in summary["levels"].items():
        over = summary["overhead"].get(f"{level}/off")
        ratio = f"{(over['ratio_of_medians'] - 1) * 100:+.1f}%" if over else "—"
        paired = (
            f"{(over['median_paired_ratio'] - 1) * 100:+.1f}%"
            if over and over["median_paired_ratio"] is not None
            else "—"
        )
        lines.append(
            f"| {level} | {s['steps']} | {s['median_step_s']:.3f} | {s['median_engine_s']:.3f} "
            f"| {s['median_outside_s']:.4f} | {s['retrieval_events']} | {s['summary_events']} "
            f"| {ratio} | {paired} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Any, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    off = {r["step"]: r["step_s"] for r in rows if r["level"] == "off"}
    for level in LEVELS:
        mine = [r for r in rows if r["level"] == level]
        if not mine:
            continue
        axes[0].plot(
            [r["prompt_tokens"] for r in mine],
            [r["step_s"] for r in mine],
            "o-",
            markersize=3,
            label=level,
        )
        if level != "off" and off:
            axes[1].plot(
                [r["prompt_tokens"] for r in mine],
                [100 * (r["step_s"] / off[r["step"]] - 1) for r in mine if r["step"] in off],
                "o-",
                markersize=3,
                label=f"{level} vs off",
            )
    axes[0].set(xlabel="prompt tokens", ylabel="step wall time (s)", title="step time")
    axes[1].axhline(5, color="grey", linestyle=":", label="5% target")
    axes[1].axhline(0, color="black", linewidth=0.5)
    axes[1].set(xlabel="prompt tokens", ylabel="overhead (%)", title="paired overhead per step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)


# ============================================================================ profiling


TRACE_PATH = (
    ("chat_models.py", "_summary"),
    ("chat_models.py", "_message_spans"),
    ("chat_models.py", "_trace_events"),
    ("trace_data.py", "summarize_retrievals"),
    ("trace_data.py", "build_message_spans"),
    ("trace_data.py", "step_summary_payload"),
    ("trace_data.py", "retrieval_event_payloads"),
    ("tracing.py", "__call__"),
    ("tracing.py", "emit_trace_events"),
    ("tracing.py", "on_chat_model_start"),
    ("tracing.py", "on_custom_event"),
    ("tracing.py", "on_llm_end"),
    ("trace_data.py", "jsonable"),
    ("session.py", "token_ids"),
)
"""Functions on the tracing path (``langchain_infllm`` files): profiled per level."""


def profile_levels(
    llms: dict[str, Any],
    encode: Callable[[str], list[int]],
    *,
    steps: int,
    obs_tokens: int,
    start_tokens: int = 3000,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """cProfile ``steps`` more steps per level (fresh sessions on the same engines).

    Returns, per level, the cumulative seconds and calls per step of each function of
    :data:`TRACE_PATH` (``__call__`` is the block-text decoder). cProfile inflates pure
    Python code, so these are upper bounds; the benchmark's ``outside_s`` is the real cost.
    The engine's own compute is left out: its run-to-run noise dwarfs the tracing cost.
    """
    import cProfile
    import pstats

    from langchain_core.messages import HumanMessage, SystemMessage

    from langchain_infllm.tracing import RetrievalTraceHandler

    out: dict[str, dict[str, dict[str, float]]] = {}
    for level, llm in llms.items():
        handler = RetrievalTraceHandler() if level in TRACED else None
        config: dict[str, Any] = {"callbacks": [handler]} if handler else {}
        document = scripted_text(encode, "doc", start_tokens, seed)
        history: list[Any] = [SystemMessage(SYSTEM_PROMPT), HumanMessage("Task:\n\n" + document)]
        history.append(llm.invoke(history, config=config, session_id="profile"))
        prof = cProfile.Profile()
        for step in range(steps):
            observation = scripted_text(encode, f"obs{step}", obs_tokens, seed)
            history.append(HumanMessage(f"Observation:\n{observation}"))
            prof.enable()
            answer = llm.invoke(history, config=config, session_id="profile")
            prof.disable()
            history.append(answer)
        table: dict[str, dict[str, float]] = {}
        raw = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        for (filename, _line, name), row in raw.items():
            path = Path(filename)
            key = (path.name, name)
            if "langchain_infllm" not in path.parts or key not in TRACE_PATH:
                continue
            label = f"{path.name}:{name}"
            entry = table.setdefault(label, {"cum_s_per_step": 0.0, "calls_per_step": 0.0})
            entry["cum_s_per_step"] = round(entry["cum_s_per_step"] + row[3] / steps, 5)
            entry["calls_per_step"] = round(entry["calls_per_step"] + row[1] / steps, 1)
        out[level] = {
            f"{f}:{n}": table.get(f"{f}:{n}", {"cum_s_per_step": 0.0, "calls_per_step": 0.0})
            for f, n in TRACE_PATH
        }
    return out


def profile_table(profile: dict[str, dict[str, dict[str, float]]]) -> str:
    levels = list(profile)
    head = " | ".join(f"{lv} ms/step (calls)" for lv in levels)
    lines = [f"| function | {head} |", "|---|" + "---|" * len(levels)]
    names = next(iter(profile.values())).keys() if profile else []
    for name in names:
        cells = " | ".join(
            f"{profile[lv][name]['cum_s_per_step'] * 1000:.1f} "
            f"({profile[lv][name]['calls_per_step']:g})"
            for lv in levels
        )
        lines.append(f"| `{name}` | {cells} |")
    return "\n".join(lines) + "\n"


# ============================================================================ command line


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--config", default="config/smollm2-cpu.yaml")
    parser.add_argument("--start-tokens", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--obs-tokens", type=int, default=300)
    parser.add_argument("--gen-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--handler-on-off",
        action="store_true",
        help="attach the trace handler to the 'off' level too",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then cProfile a few steps per level and list the added cost",
    )
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--name", default="trace_overhead")
    args = parser.parse_args()

    from benchmarks.common import load_models
    from langchain_infllm import InfLLMConfig

    set_threads(args.threads)
    began = time.perf_counter()
    config = InfLLMConfig.from_yaml(args.config)
    models, tokenizer = load_models(args.model, copies=len(LEVELS))
    llms = build_chat_models(
        models, tokenizer, config, gen_tokens=args.gen_tokens, model_name=args.model
    )

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    rows = run_trace_overhead(
        llms,
        encode,
        start_tokens=args.start_tokens,
        steps=args.steps,
        obs_tokens=args.obs_tokens,
        seed=args.seed,
        handler_on_off=args.handler_on_off,
        log=lambda s: print(s, flush=True),
    )
    summary = summarize(rows)
    profile = None
    if args.profile:
        profile = profile_levels(
            llms,
            encode,
            steps=args.profile_steps,
            obs_tokens=args.obs_tokens,
            start_tokens=args.start_tokens,
            seed=args.seed,
        )
    info = machine()
    payload = {
        "machine": info,
        "model": args.model,
        "config_path": args.config,
        "config": config.model_dump(),
        "args": vars(args),
        "wall_seconds": time.perf_counter() - began,
        "summary": summary,
        "rows": rows,
    }
    if profile is not None:
        payload["profile"] = profile
    path = write_results(args.name, payload)
    table = markdown_table(summary)
    md = [
        f"# Trace overhead ({args.model})\n",
        f"{info['date']}; {info['cpu']}, {info.get('cpu_count')} cores, torch threads "
        f"{info['torch_threads']}, load {info.get('load_average_1_5_15min')}.\n",
        f"{args.steps} agent steps per level (interleaved), ~{args.obs_tokens}-token tool "
        f"observation + ≤{args.gen_tokens} generated tokens per step, context "
        f"{summary['levels']['off']['median_prompt_tokens']:.0f} tokens at the median step "
        f"(config {args.config}: n_local {config.n_local}). Answers identical across levels: "
        f"{summary['answers_identical_across_levels']}.\n",
        table,
    ]
    if profile:
        md.append(
            f"\nTracing-path functions under cProfile ({args.profile_steps} more steps per "
            "level; cumulative, so nested rows overlap; cProfile inflates Python code):\n"
        )
        md.append(profile_table(profile))
    (RESULTS_DIR / f"{args.name}.md").write_text("\n".join(md) + "\n")
    plot(
        rows,
        path.with_suffix(".png"),
        title=f"{args.model}, trace levels interleaved; {info['date']}",
    )
    print(table)
    for key, value in summary["overhead"].items():
        print(
            f"{key}: ratio of medians {value['ratio_of_medians']:.4f}, "
            f"median paired {value['median_paired_ratio']:.4f}"
        )
    print(f"wrote {path} ({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
