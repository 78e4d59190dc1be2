"""The agents end to end (create_agent + ChatInfLLM), per retrieval method and seed.

    python -m benchmarks.agents_recall [--agents document_reader repo_investigator]
        [--size small] [--seeds 0 1 2 3 4] [--methods maxkey infllm full]

Each (agent, seed) runs once per method, interleaved, on the same generated task: the
retrieval methods with the given config, ``full`` (the same engine with a window larger
than the whole conversation: full attention, the control) and ``sinks_window``
(``topk=0``). Scores come from the agents' own scorers; the trace report of every run
(with the planted facts' positions marked) lands in ``runs/agents_recall/``.
Writes ``benchmarks/results/agents_recall.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agents.common import DEFAULT_MAX_TOKENS
from benchmarks.common import RESULTS_DIR, engine_config, machine, set_threads, write_results
from benchmarks.recall import method_config

# Generous bound on a run's whole conversation, for the full-attention control's window.
CONTROL_WINDOW_SLACK = 4096


def run(args: argparse.Namespace) -> dict[str, Any]:
    from agents import document_reader, repo_investigator
    from agents.common import run_task
    from langchain_infllm import ChatInfLLM, InfLLMConfig

    set_threads(args.threads)
    builders = {"document_reader": lambda size, seed, out: document_reader.build_task(size, seed),
                "repo_investigator": lambda size, seed, out: repo_investigator.build_task(
                    size, seed, out / "workspace")}
    base = engine_config(InfLLMConfig.from_yaml(args.config), trace="summary")
    rows: list[dict[str, Any]] = []
    out_root = Path(args.out_dir)
    # Rows as they complete, so an interrupted run keeps them (git-ignored).
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    progress = RESULTS_DIR / f"{args.out}.partial.jsonl"
    progress.write_text("")
    for seed in args.seeds:
        for agent in args.agents:
            for method in args.methods:
                out = out_root / f"{agent}-{args.size}-s{seed}-{method.replace(':', '_')}"
                task = builders[agent](args.size, seed, out)
                longest = int(task.info.get("approx_tokens", 0) * 1.6) + CONTROL_WINDOW_SLACK
                config = method_config(base, method, longest)
                llm = ChatInfLLM(model=args.model, infllm_config=config, temperature=0,
                                 max_tokens=args.max_tokens)
                began = time.perf_counter()
                result = run_task(task, llm, out, progress=False)
                rows.append({
                    "agent": agent, "size": args.size, "seed": seed, "method": method,
                    "correct": result.score.correct, "total": result.score.total,
                    "context_tokens": result.context_tokens,
                    "plan": f"{result.plan_completed}/{result.plan_length}",
                    "steps": len(result.steps), "seconds": round(time.perf_counter() - began, 1),
                    "answers": result.answers,
                    "trace": result.trace_path,
                })
                with progress.open("a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
                print(f"{agent} seed {seed} {method}: {result.score.correct}/"
                      f"{result.score.total} ({rows[-1]['seconds']} s)", flush=True)
    return {"machine": machine(), "args": vars(args), "config": base.model_dump(), "rows": rows}


def markdown(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["agent"], r["size"], r["method"]), []).append(r)
    lines = ["| agent | size | method | seeds | facts right | mean score | context tokens | "
             "s per run |", "|---|---|---|---|---|---|---|---|"]
    for (agent, size, method), items in groups.items():
        right = sum(r["correct"] for r in items)
        total = sum(r["total"] for r in items)
        lines.append(
            f"| {agent} | {size} | {method} | {len(items)} | {right}/{total} | "
            f"{right / total:.0%} | {statistics.mean(r['context_tokens'] for r in items):.0f} | "
            f"{statistics.mean(r['seconds'] for r in items):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", nargs="+", default=["document_reader", "repo_investigator"])
    parser.add_argument("--size", default="small")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=["maxkey", "infllm", "full"])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--config", default="config/agents-cpu.yaml")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default="runs/agents_recall")
    parser.add_argument("--out", default="agents_recall")
    args = parser.parse_args(argv)
    payload = run(args)
    write_results(args.out, payload)
    table = markdown(payload["rows"])
    (RESULTS_DIR / f"{args.out}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
