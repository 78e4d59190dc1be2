"""Engine speed against the unmodified model, same process, interleaved.

    python -m benchmarks.speed [--model qwen2.5-coder-0.5b-instruct]
        [--config config/agents-cpu.yaml] [--lengths 2048 8192 32768]
        [--methods unmodified infllm maxkey] [--threads 2]

For every length and method, on the same random token ids: prefill tokens/s (the whole
prompt from scratch), decode tokens/s (greedy, `--decode` tokens after the prompt) and
one agent step (append `--step-append` tokens, then generate `--step-generate`).
``unmodified`` is the model with transformers' SDPA attention and a `DynamicCache`
(prefix reuse, the usual local server); the others are this engine with the config and
that retrieval method (``name:key=value,...`` overrides config fields, as in
benchmarks/recall.py). Methods run one after the other for each length, their order
rotated from length to length, so a change in machine load hits all of them.
Writes ``benchmarks/results/speed-<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.common import (
    RESULTS_DIR,
    VanillaRunner,
    engine_config,
    machine,
    set_threads,
    write_results,
)
from benchmarks.recall import method_config


def _ids(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, 20000, (n,), generator=gen).tolist()


def measure(method: str, model: Any, config: Any, length: int, args: argparse.Namespace
            ) -> dict[str, float]:
    from langchain_infllm import InfLLMEngine

    prompt, step = _ids(length, 0), _ids(args.step_append, 1)
    if method == "unmodified":
        model.set_attn_implementation("sdpa")
        runner: Any = VanillaRunner(model)
        began = time.perf_counter()
        runner.append(prompt)
        prefill = time.perf_counter() - began
        began = time.perf_counter()
        runner.generate(args.decode)
        decode = time.perf_counter() - began
        began = time.perf_counter()
        runner.append(step)
        runner.generate(args.step_generate)
        agent_step = time.perf_counter() - began
    else:
        engine = InfLLMEngine(model, None, method_config(config, method, length))
        session = engine.new_session()
        began = time.perf_counter()
        session.append(prompt)
        prefill = time.perf_counter() - began
        began = time.perf_counter()
        list(session.generate(args.decode))
        decode = time.perf_counter() - began
        began = time.perf_counter()
        session.append(step)
        list(session.generate(args.step_generate))
        agent_step = time.perf_counter() - began
        session.close()
    gc.collect()
    return {"prefill_tok_s": round(length / prefill, 1),
            "decode_tok_s": round(args.decode / decode, 2),
            "agent_step_s": round(agent_step, 2)}


def markdown(rows: list[dict[str, Any]], methods: Sequence[str]) -> str:
    base = "unmodified"
    lines = ["| tokens | method | prefill tok/s | decode tok/s | agent step s | "
             "prefill vs unmodified | decode vs unmodified |", "|---|---|---|---|---|---|---|"]
    for length in sorted({r["length"] for r in rows}):
        cells = {r["method"]: r for r in rows if r["length"] == length}
        ref = cells.get(base)
        for method in methods:
            r = cells.get(method)
            if r is None:
                continue
            ratio_p = ratio_d = "-"
            if ref is not None and method != base:
                ratio_p = f"{r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x"
                ratio_d = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x"
            lines.append(f"| {length} | {method} | {r['prefill_tok_s']} | {r['decode_tok_s']} "
                         f"| {r['agent_step_s']} | {ratio_p} | {ratio_d} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    from langchain_infllm import InfLLMConfig
    from langchain_infllm.models.embedded import load_model_and_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--config", default="config/agents-cpu.yaml")
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192, 32768])
    parser.add_argument("--methods", nargs="+", default=["unmodified", "infllm", "maxkey"])
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--step-append", type=int, default=500)
    parser.add_argument("--step-generate", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    model, _ = load_model_and_tokenizer(args.model, device="cpu")
    config = engine_config(InfLLMConfig.from_yaml(args.config), trace="off")
    rows = []
    for i, length in enumerate(args.lengths):
        order = args.methods[i % len(args.methods):] + args.methods[: i % len(args.methods)]
        for method in order:
            result = measure(method, model, config, length, args)
            rows.append({"length": length, "method": method, **result})
            print(f"{length:7d} {method:10s} {result}", flush=True)
    name = f"speed-{args.model}"
    write_results(name, {"machine": machine(), "args": vars(args), "rows": rows})
    table = markdown(rows, args.methods)
    (RESULTS_DIR / f"{name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
