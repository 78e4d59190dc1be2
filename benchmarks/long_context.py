"""Long-context accuracy (issue 8): InfLLM vs full attention, sinks+window and truncation.

    python -m benchmarks.long_context [--model smollm2-135m-instruct]
        [--config config/smollm2-cpu.yaml] [--tasks passkey kv_retrieval niah_multikey]
        [--lengths 4096 8192 16384] [--depths 0.1 0.5 0.9] [--samples 1] [--seed 0]

Same model, same prompts, one run. Methods:

* ``infllm``: this engine with the given config, a fresh session prefilled once per prompt.
  With ``--reuse-prefix`` the depths of one (task, length, sample), whose prompts differ
  only from the needle on, share one session: deepest needle first, ``session.sync``
  truncates to the shared prefix and computes the rest. That is cheaper but not neutral:
  the prefill chunks then start at other positions and the representatives of the kept
  blocks carry attention mass from the removed suffix, so answers can differ from a fresh
  prefill (measured: see RESULTS.md).
* ``sinks_window``: the same engine with ``topk=0`` (attention sinks + local window only).
* ``full``: the unmodified model (sdpa), only where prompt + answer fit the native window,
  unless ``--full-max-length`` allows more; such cells are marked beyond-native (†).
* ``truncate``: the unmodified model on the last ``native - new tokens`` prompt tokens.
  Where the whole prompt fits, it is the same computation as ``full`` and is copied.
* ``control``: the same (task, depth, seed) generated at ``--control-length`` tokens (default:
  the native window) with full attention: the model's own ability, without any long-context
  machinery (DESIGN.md section 8, "separate the model from the engine").

Greedy decoding of a few tokens (stopping at a newline or EOS); scored with the tasks'
metrics. Writes ``benchmarks/results/long_context.{json,csv,md,png}``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    HFCodec,
    VanillaRunner,
    engine_config,
    engine_generate,
    load_models,
    machine,
    native_window,
    peak_rss_bytes,
    set_threads,
    write_csv,
    write_results,
)
from benchmarks.tasks import generate, make_prompt, score_sample

METHODS = ("infllm", "sinks_window", "full", "truncate", "control")
METHOD_LABELS = {
    "infllm": "InfLLM",
    "sinks_window": "sinks+window (topk=0)",
    "full": "full attention",
    "truncate": "truncate to native",
    "control": "in-window control (full)",
}
DEFAULT_TASKS = ("passkey", "kv_retrieval", "niah_multikey")
# Answer lengths: a UUID is ~32 SmolLM2/Qwen tokens, numbers are up to 10 digits.
NEW_TOKENS = {"kv_retrieval": 40, "number_string": 14, "passkey": 8}
DEFAULT_NEW_TOKENS = 12


def new_tokens_for(task: str, override: int | None = None) -> int:
    return override if override else NEW_TOKENS.get(task, DEFAULT_NEW_TOKENS)


def make_stop(codec: Any) -> Callable[[list[int]], bool]:
    """Stop at EOS or at a newline once some non-blank text has been produced."""

    def stop(produced: list[int]) -> bool:
        if produced and produced[-1] in codec.eos_ids:
            return True
        text = codec.decode(produced)
        return "\n" in text.lstrip()

    return stop


@dataclass
class PromptCase:
    task: str
    length: int
    depth: float
    sample: int
    ids: list[int]
    sample_obj: Any


@dataclass
class LongContextRun:
    rows: list[dict[str, Any]] = field(default_factory=list)
    native: int = 0
    control_length: int = 0


def build_case(
    codec: Any, task: str, length: int, depth: float, sample: int, seed: int, new_tokens: int
) -> PromptCase:
    """A prompt such that prompt + `new_tokens` answer tokens stay within `length`.

    The context generator fits its length within about 0.5%, so it is aimed 1.5% short.
    """

    def count(text: str) -> int:
        return len(codec.encode(text))

    probe = generate(task, 2048, depth, seed=f"{seed}-{sample}", count_tokens=count)
    overhead = count(make_prompt(probe)) - count(probe.context)
    target = max(64, int(0.985 * (length - new_tokens)) - overhead)
    smp = generate(task, target, depth, seed=f"{seed}-{sample}", count_tokens=count)
    ids = codec.encode(make_prompt(smp))
    return PromptCase(task, length, depth, sample, ids, smp)


def _score(case: PromptCase, codec: Any, produced: list[int]) -> tuple[float, str]:
    text = codec.decode(produced)
    return float(score_sample(case.sample_obj, text)), text


def run_long_context(
    engine_model: Any,
    vanilla_model: Any,
    codec: Any,
    config: Any,
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    lengths: Sequence[int] = (4096, 8192),
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    samples: int = 1,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    native: int | None = None,
    full_max_length: int | None = None,
    control_length: int | None = None,
    max_new_tokens: int | None = None,
    vanilla_chunk: int = 4096,
    reuse_prefix: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> LongContextRun:
    """The accuracy grid; one row per (task, length, depth, sample, method)."""
    from langchain_infllm import InfLLMEngine

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    native = native or native_window(vanilla_model)
    if native <= 0:
        raise ValueError("the model reports no native window; pass native=")
    full_limit = full_max_length if full_max_length is not None else native
    ctl_len = control_length or native
    run = LongContextRun(native=native, control_length=ctl_len)
    stop = make_stop(codec)
    engines: dict[str, Any] = {}
    if "infllm" in methods:
        engines["infllm"] = InfLLMEngine(engine_model, None, engine_config(config, trace="off"))
    if "sinks_window" in methods:
        engines["sinks_window"] = InfLLMEngine(
            engine_model, None, engine_config(config, topk=0, trace="off")
        )
    vanilla = VanillaRunner(vanilla_model, chunk=vanilla_chunk)
    ordered_depths = sorted(depths, reverse=True)  # deepest needle first: longest shared prefix

    def row(case: PromptCase, method: str, **extra: Any) -> dict[str, Any]:
        base = {
            "task": case.task, "length": case.length, "depth": case.depth,
            "sample": case.sample, "method": method, "prompt_tokens": len(case.ids),
            "answer": case.sample_obj.answers[0] if case.sample_obj.answers else "",
        }
        base.update(extra)
        return base

    def run_vanilla(case: PromptCase, ids: list[int], new: int) -> dict[str, Any]:
        began = time.perf_counter()
        computed = vanilla.sync(ids)
        produced = vanilla.generate(new, stop)
        score, text = _score(case, codec, produced)
        return {"score": score, "prediction": text, "computed_tokens": computed,
                "seconds": round(time.perf_counter() - began, 3)}

    for task in tasks:
        new = new_tokens_for(task, max_new_tokens)
        for sample in range(samples):
            for length in lengths:
                cases = [build_case(codec, task, length, d, sample, seed, new)
                         for d in ordered_depths]
                for method, engine in engines.items():
                    session = engine.new_session()
                    for case in cases:
                        if not reuse_prefix:
                            session = engine.new_session()
                        began = time.perf_counter()
                        step = session.sync(case.ids)
                        produced = engine_generate(session, new, stop)
                        score, text = _score(case, codec, produced)
                        run.rows.append(row(
                            case, method, score=score, prediction=text,
                            computed_tokens=step.computed_tokens,
                            reused_tokens=step.reused_tokens,
                            seconds=round(time.perf_counter() - began, 3),
                            host_bytes=session.host_bytes(),
                            device_bytes=session.device_bytes()
                            + engine.cache_resident_bytes(),
                        ))
                        log(_fmt(run.rows[-1]))
                    del session
                full_rows: dict[float, dict[str, Any]] = {}
                for case in cases:
                    fits = len(case.ids) + new <= native
                    if "full" in methods:
                        if fits or len(case.ids) + new <= full_limit:
                            res = run_vanilla(case, case.ids, new)
                            full_rows[case.depth] = res
                            run.rows.append(row(case, "full", beyond_native=not fits, **res))
                        else:
                            run.rows.append(row(case, "full", score=None, beyond_native=True,
                                                note="skipped: beyond the native window"))
                        log(_fmt(run.rows[-1]))
                    if "truncate" in methods:
                        keep = native - new
                        if fits and case.depth in full_rows:
                            res = dict(full_rows[case.depth], note="prompt fits: same as full")
                        else:
                            res = run_vanilla(case, case.ids[-keep:], new)
                            res["kept_tokens"] = min(keep, len(case.ids))
                        run.rows.append(row(case, "truncate", beyond_native=False, **res))
                        log(_fmt(run.rows[-1]))
                vanilla.reset()
            if "control" in methods:
                for depth in ordered_depths:
                    case = build_case(codec, task, ctl_len, depth, sample, seed, new)
                    res = run_vanilla(case, case.ids, new)
                    for length in lengths:  # one control per (task, depth, sample)
                        run.rows.append(dict(row(case, "control", **res), length=length,
                                             control_prompt_tokens=len(case.ids)))
                    log(_fmt(run.rows[-1]))
                vanilla.reset()
    return run


def _fmt(r: dict[str, Any]) -> str:
    score = "skip" if r.get("score") is None else f"{r['score']:.0f}"
    mark = " (beyond native)" if r.get("beyond_native") else ""
    return (f"{r['task']:14s} {r['length']:6d} d={r['depth']:.2f} {r['method']:12s} "
            f"score={score}{mark} {r.get('seconds', 0):7.1f}s "
            f"computed={r.get('computed_tokens', '-')} pred={r.get('prediction', '')!r:.60}")


# ----------------------------------------------------------------------------- reporting


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int, float], float | None]:
    """Mean score x100 per (task, method, length, depth); None where nothing ran."""
    cells: dict[tuple[str, str, int, float], list[float]] = {}
    for r in rows:
        key = (r["task"], r["method"], r["length"], r["depth"])
        cells.setdefault(key, [])
        if r.get("score") is not None:
            cells[key].append(float(r["score"]))
    return {k: (100.0 * sum(v) / len(v) if v else None) for k, v in cells.items()}


def beyond_native_cells(rows: list[dict[str, Any]]) -> set[tuple[str, str, int, float]]:
    return {(r["task"], r["method"], r["length"], r["depth"])
            for r in rows if r.get("beyond_native")}


def markdown_table(rows: list[dict[str, Any]], native: int, control_length: int) -> str:
    """Accuracy (%) by task x length x depth, one column per method; a summary by length."""
    agg = aggregate(rows)
    beyond = beyond_native_cells(rows)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})

    def cell(key: tuple[str, str, int, float]) -> str:
        value = agg.get(key)
        if value is None:
            return "—"
        return f"{value:.0f}" + (" †" if key in beyond else "")

    out = [f"Accuracy (%), greedy. Native window {native} tokens; † = full attention beyond "
           f"the native window; — = not run (beyond the native window). The control is the "
           f"same needle and depth at {control_length} tokens with full attention.", ""]
    header = "| task | length | depth | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |"
    out += [header, "|" + "---|" * (3 + len(methods))]
    for task in tasks:
        for length in lengths:
            for depth in depths:
                if not any((task, m, length, depth) in agg for m in methods):
                    continue
                cells = " | ".join(cell((task, m, length, depth)) for m in methods)
                out.append(f"| {task} | {length} | {depth:g} | {cells} |")
    out += ["", "Mean over tasks and depths:", "",
            "| length | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |",
            "|" + "---|" * (1 + len(methods))]
    for length in lengths:
        means = []
        for m in methods:
            vals = [v for (t, mm, ln, _), v in agg.items()
                    if mm == m and ln == length and v is not None and t in tasks]
            marked = any(k[1] == m and k[2] == length and agg.get(k) is not None
                         for k in beyond)
            means.append("—" if not vals else f"{sum(vals) / len(vals):.0f}"
                         + (" †" if marked else ""))
        out.append(f"| {length} | " + " | ".join(means) + " |")
    return "\n".join(out) + "\n"


def heatmap(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """One heat map (depth x length) per task and method; grey n/a = not run, † = beyond native."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    beyond = beyond_native_cells(rows)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(len(tasks), len(methods), squeeze=False,
                             figsize=(2.3 * len(methods) + 1, 1.9 * len(tasks) + 0.8))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="lightgrey")
    image = None
    for i, task in enumerate(tasks):
        for j, m in enumerate(methods):
            ax = axes[i][j]
            grid = [[agg.get((task, m, ln, d)) for ln in lengths] for d in depths]
            values = [[math.nan if v is None else v for v in line] for line in grid]
            image = ax.imshow(values, cmap=cmap, vmin=0, vmax=100, aspect="auto")
            for y, d in enumerate(depths):
                for x, ln in enumerate(lengths):
                    v = grid[y][x]
                    text = "n/a" if v is None else f"{v:.0f}"
                    if v is not None and (task, m, ln, d) in beyond:
                        text += "†"
                    ax.text(x, y, text, ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(lengths)), [f"{ln // 1024}K" for ln in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            if i == 0:
                ax.set_title(METHOD_LABELS[m], fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{task}\ndepth", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="accuracy (%)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(str(path), dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--config", default="config/smollm2-cpu.yaml")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--full-max-length", type=int, default=None,
                        help="run full attention up to this prompt length even beyond the "
                             "native window (marked †); default: the native window")
    parser.add_argument("--control-length", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="override the per-task answer budget")
    parser.add_argument("--reuse-prefix", action="store_true",
                        help="engine methods: one session per (task, length, sample), synced "
                             "from prompt to prompt (cheaper; changes answers, see docstring)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="long_context", help="results file stem")
    args = parser.parse_args()
    set_threads(args.threads)
    from langchain_infllm import InfLLMConfig

    config = InfLLMConfig.from_yaml(args.config)
    (engine_model, vanilla_model), tokenizer = load_models(args.model, 2)
    vanilla_model.set_attn_implementation("sdpa")
    began = time.perf_counter()
    run = run_long_context(
        engine_model, vanilla_model, HFCodec(tokenizer), config, tasks=args.tasks,
        lengths=args.lengths, depths=args.depths, samples=args.samples, seed=args.seed,
        methods=args.methods, full_max_length=args.full_max_length,
        control_length=args.control_length, max_new_tokens=args.max_new_tokens,
        reuse_prefix=args.reuse_prefix, log=lambda s: print(s, flush=True),
    )
    table = markdown_table(run.rows, run.native, run.control_length)
    info = machine()
    payload = {
        "machine": info, "model": args.model, "config_path": args.config,
        "config": config.model_dump(), "args": vars(args), "native_window": run.native,
        "control_length": run.control_length, "wall_seconds": time.perf_counter() - began,
        "peak_rss": peak_rss_bytes(), "rows": run.rows,
    }
    path = write_results(args.name, payload)
    write_csv(args.name, run.rows)
    md = RESULTS_DIR / f"{args.name}.md"
    md.write_text(f"# Long-context accuracy: {args.model}, {args.config}\n\n"
                  f"{info['date']}, {info['cpu']}, torch threads {info['torch_threads']}\n\n"
                  + table)
    heatmap(run.rows, path.with_suffix(".png"),
            title=f"{args.model} ({args.config}); native {run.native}; {info['date']}")
    print(table)
    print(f"wrote {path}, {md}, {path.with_suffix('.png')} "
          f"({payload['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
