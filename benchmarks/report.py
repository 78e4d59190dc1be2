"""Assemble benchmarks/RESULTS.md from the result files in benchmarks/results/.

    python -m benchmarks.report

Only what the JSON files hold goes into the tables (each section names its machine, load
and date). Hand-written observations live in benchmarks/results/notes.md and are copied in.
"""

from __future__ import annotations

import json
from typing import Any

from benchmarks.agent_steps import markdown_summary
from benchmarks.common import RESULTS_DIR
from benchmarks.long_context import markdown_table
from benchmarks.offload_memory import markdown_table as offload_table

OUT = RESULTS_DIR.parent / "RESULTS.md"
SPEED_MODEL = "qwen2.5-coder-0.5b-instruct"
GIB = 2**30


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _machine(m: dict[str, Any]) -> str:
    load = m.get("load_average_1_5_15min")
    extra = f", load average {load[0]:.1f} at the end" if load else ""
    return (f"*{m['date']}; {m['cpu']} ({m['cpu_count']} cores, torch threads "
            f"{m['torch_threads']}{extra}); torch {m['torch']}, transformers "
            f"{m.get('transformers', '?')}.*")


def _long_context(name: str, title: str) -> list[str]:
    data = _load(name)
    if data is None:
        return []
    args = data["args"]
    cfg = data["config"]
    return [
        f"### {title}", "",
        _machine(data["machine"]), "",
        f"Model `{data['model']}`, config `{data['config_path']}` (block {cfg['block_size']}, "
        f"n_init {cfg['n_init']}, n_local {cfg['n_local']}, topk {cfg['topk']}), tasks "
        f"{', '.join(args['tasks'])}, lengths {args['lengths']}, depths {args['depths']}, "
        f"{args['samples']} sample(s) per cell, seed {args['seed']}; "
        f"{data['wall_seconds'] / 60:.1f} min.", "",
        f"Command: `python -m benchmarks.long_context {_argline(args)}`"
        + ("" if "reuse_prefix" in args else
           " (run when prefix reuse was the default: the same as adding `--reuse-prefix`)"),
        "",
        markdown_table(data["rows"], data["native_window"], data["control_length"]),
        f"![heat map](results/{name}.png)", "",
        f"Raw rows (predictions, tokens computed, seconds): [`results/{name}.csv`]"
        f"(results/{name}.csv).", "",
    ]


def _argline(args: dict[str, Any]) -> str:
    parts = []
    for key, value in args.items():
        if value is None or value is False or key in ("one",):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts.append(f"{flag} {' '.join(str(v) for v in value)}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def _agent_steps(name: str, title: str) -> list[str]:
    data = _load(name)
    if data is None:
        return []
    args = data["args"]
    rows = data["rows"]
    lines = [
        f"### {title}", "",
        _machine(data["machine"]), "",
        f"Model `{data['model']}` (native window {data['native_window']}), config "
        f"`{data['config_path']}`. Each step appends {args['step_tokens']} tokens and "
        f"generates {args['gen_tokens']} (greedy, no early stop), from "
        f"{args['start_context']} tokens to {args['max_context']}. InfLLM and the reused "
        f"DynamicCache are timed every {args['measure_every']} step(s) (the steps between are "
        f"fast-forwarded untimed); recomputing the whole prompt is timed every "
        f"{args['recompute_every']} steps only (it is stateless, so skipping steps costs it "
        f"nothing). Each method ran in its own process. {data['wall_seconds'] / 60:.1f} min.",
        "",
        f"Command: `python -m benchmarks.agent_steps {_argline(args)}`", "",
        markdown_summary(data["summary"]),
        "Per timed step (s = whole step, p = prompt part; RSS = peak so far):", "",
    ]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    contexts = sorted({r["context"] for r in rows})
    by = {(r["method"], r["context"]): r for r in rows}
    lines.append("| context | " + " | ".join(methods) + " |")
    lines.append("|" + "---|" * (1 + len(methods)))
    for ctx in contexts:
        cells = []
        for m in methods:
            r = by.get((m, ctx))
            cells.append("" if r is None else
                         f"{r['step_s']:.1f} s (p {r['prefill_s']:.1f}), "
                         f"{r['computed_tokens']} computed, {r['peak_rss'] / GIB:.2f} GiB")
        mark = " (beyond native)" if ctx > data["native_window"] else ""
        lines.append(f"| {ctx}{mark} | " + " | ".join(cells) + " |")
    lines += ["", f"![agent steps](results/{name}.png)", ""]
    return lines


def _offload() -> list[str]:
    data = _load("offload_memory")
    if data is None:
        return []
    cfg = data["config"]
    rows = data["rows"]
    real = data.get("real_models_full_kv_at_1m", [])
    lines = [
        "## Offload: device-resident vs host memory as the context grows (issue 4)", "",
        _machine(data["machine"]), "",
        f"{data['model']}; block {cfg['block_size']}, n_init {cfg['n_init']}, n_local "
        f"{cfg['n_local']}, topk {cfg['topk']}, max_cached_block {cfg['max_cached_block']}, "
        f"execution chunks {cfg['exc_block_size']}. On this CPU-only machine host and "
        f"device are the same memory; the engine's own counters are reported (device = "
        f"session device tensors + block cache; host = sealed blocks). "
        f"{data['wall_seconds'] / 60:.1f} min.", "",
        f"Command: `python -m benchmarks.offload_memory {_argline(data['args'])}`", "",
        offload_table(rows),
        "![offload memory](results/offload_memory.png)", "",
    ]
    if real:
        lines += ["Full KV cache at 1M tokens for real models (bf16, computed from their "
                  "shapes): " + ", ".join(f"{r['model']} {r['full_kv_gib']:.0f} GiB"
                                         for r in real) + ".", ""]
    return lines


def _prefill() -> list[str]:
    data = _load("prefill")
    if data is None:
        return []
    lines = ["## Prefill throughput (benchmarks/prefill.py)", "", _machine(data["machine"]), "",
             f"Model `{data['model']}`, config `{data['config']}`; each (method, length) in "
             "its own process.", "",
             "| tokens | InfLLM tok/s | full tok/s | speed ratio | InfLLM peak RSS GiB | "
             "full peak RSS GiB | RSS ratio |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(
            f"| {r['length']} | {r['infllm']['tokens_per_s']:.0f} | "
            f"{r['full']['tokens_per_s']:.0f} | {r['speed_ratio']:.2f} | "
            f"{r['infllm']['peak_rss'] / GIB:.2f} | {r['full']['peak_rss'] / GIB:.2f} | "
            f"{r['rss_ratio']:.2f} |")
    lines += ["", "![prefill](results/prefill.png)", ""]
    return lines


def _table_run(name: str, title: str, module: str) -> list[str]:
    """A run that wrote `<name>.json` (machine, args) and `<name>.md` (its table)."""
    data, table = _load(name), RESULTS_DIR / f"{name}.md"
    if data is None or not table.exists():
        return []
    lines = [f"### {title}", "", _machine(data["machine"]), "",
             f"`python -m {module} {_argline(data['args'])}`", ""]
    lines += [table.read_text().strip(), ""]
    if (RESULTS_DIR / f"{name}.png").exists():
        lines += [f"![{name}](results/{name}.png)", ""]
    return lines


def _trace_overhead() -> list[str]:
    table = RESULTS_DIR / "trace_overhead.md"
    if not table.exists():
        return []
    body = table.read_text().strip().splitlines()
    return [
        "## Trace overhead (issue 6)", "",
        "Command: `python -m benchmarks.trace_overhead --model smollm2-135m-instruct "
        "--config config/smollm2-cpu.yaml --profile` (levels interleaved step by step).", "",
        *body[1:], "", "![trace overhead](results/trace_overhead.png)", "",
    ]


def build() -> str:
    lines = [
        "# Benchmark results", "",
        "Generated by `python -m benchmarks.report` from the files in `benchmarks/results/`; "
        "every number below was measured by the command shown with it. Re-run everything "
        "with `python -m benchmarks.run_all` (see `benchmarks/README.md`).", "",
    ]
    recall = RESULTS_DIR / "recall_notes.md"
    if recall.exists():
        lines += [recall.read_text().strip(), ""]
    lines += _table_run("recall-ablation", "Ablation: every candidate on the same replays",
                        "benchmarks.recall")
    lines += _table_run("recall-ablation-queries",
                        "Ablation: the retrieval query of a prefill chunk, neighbours of a hit",
                        "benchmarks.recall")
    lines += _table_run("recall", "The shipped default against the paper and the controls",
                        "benchmarks.recall")
    lines += _table_run("recall-beyond", "Beyond the native window", "benchmarks.recall")
    lines += _table_run("agents_recall", "The agents end to end", "benchmarks.agents_recall")
    lines += _table_run("agents_recall_qg16", "The agents end to end, default with query groups",
                        "benchmarks.agents_recall")
    transcript = RESULTS_DIR / "recall-transcript-s0.md"
    if transcript.exists():  # the main job's own transcript, replayed per method
        lines += [("\n" + transcript.read_text().strip()).replace("\n# ", "\n### "), ""]
    lines += _table_run("agents_recall_layout",
                        "The agents end to end: span moved from the window to retrieved blocks",
                        "benchmarks.agents_recall")
    repo = RESULTS_DIR / "recall-transcript-repo-s0.md"
    if repo.exists():  # the repository investigator's transcript, replayed per method
        lines += [("\n" + repo.read_text().strip()).replace("\n# ", "\n### "), ""]
    lines += _table_run("agents_recall_layout_repo",
                        "The repository investigator with the new layout",
                        "benchmarks.agents_recall")
    positions = RESULTS_DIR / "positions_notes.md"
    if positions.exists():  # where memory keys sit: fixed, exact, compact
        lines += [positions.read_text().strip(), ""]
    last_token = RESULTS_DIR / "last_token_notes.md"
    if last_token.exists():  # the answer's first token, repeated filler (2026-12-04)
        lines += [last_token.read_text().strip(), ""]
    lines += _table_run("recall-maxshare-passkey8k",
                        "Pass key in the native window: maxkey, maxshare and the controls",
                        "benchmarks.recall")
    for agent in ("document_reader", "repo_investigator"):
        lines += _table_run(f"recall-last-token-{agent}",
                            f"Last token alone or in its chunk: {agent} replays",
                            "benchmarks.recall")
    speed = RESULTS_DIR / "speed_notes.md"
    if speed.exists():
        lines += [speed.read_text().strip(), ""]
    lines += _table_run(f"speed-{SPEED_MODEL}", "The speed table", "benchmarks.speed")
    serve = RESULTS_DIR / "serve_notes.md"
    if serve.exists():  # issue 15: server vs in process, the HTTP hop
        lines += [("\n" + serve.read_text().strip()).replace("\n# ", "\n## "), ""]
    lines += ["## Earlier sessions' runs (issues 3, 4, 6, 8)", "",
              "Measured by earlier sessions, most of them on a box shared with other jobs "
              "(load 5-16): read their timings as ratios within one table at best. The "
              "prefill figures of that time are dropped (superseded by the speed table "
              "above, run alone).", ""]
    notes = RESULTS_DIR / "notes.md"
    if notes.exists():
        lines += [("\n" + notes.read_text().strip()).replace("\n## ", "\n### "), ""]
    lines += ["## Long-context accuracy (issue 8)", ""]
    lines += _long_context("long_context_in_native", "Within the native window")
    lines += _long_context("long_context_beyond_native", "Beyond the native window")
    lines += ["## Agent steps: cost per step as the context grows (issue 3)", ""]
    agent = RESULTS_DIR / "agent_steps.md"
    if agent.exists():
        lines += [agent.read_text().strip(), ""]
    lines += _agent_steps("agent_steps", "All methods")
    lines += _agent_steps("agent_steps_recompute_16k", "Recompute from scratch, to 16K")
    lines += _offload()
    lines += _trace_overhead()
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    OUT.write_text(build())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
