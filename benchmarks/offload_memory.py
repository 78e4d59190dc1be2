"""Device-resident vs host memory as the context grows to 1M tokens (issue 4).

    python -m benchmarks.offload_memory [--max-context 1048576] [--measure-full-up-to 131072]

A tiny randomly initialised Llama (2 layers, 4 query / 2 KV heads, head_dim 16, fp32) runs
on the CPU with the reference InfLLM block settings (block 128, n_init 128, execution chunks
512, prefill chunks 8192) and, so that 1M tokens take minutes, n_local 1024, topk 4,
max_cached_block 8 (`--reference-window`: the reference's 4096 / 16 / 32). On CPU "device" and host
are the same memory, but the engine accounts for them separately exactly as on a GPU:

* device bytes = the session's device tensors (sinks, local-window/remainder buffers and,
  unless `repr_on_host`, the representative keys) + the engine's block cache;
* host bytes = sealed blocks' K/V and attention-mass scores (+ representatives when
  `repr_on_host`).

Beside them: the bytes a full KV cache needs for the same context (computed from the model
shape; measured with a transformers `DynamicCache` up to `--measure-full-up-to`). The
retrieval summaries (representative keys, one per block and query head, and with the
per-head methods the index of sealed keys) are the only device-side part that grows with
the context; `repr_bytes` reports them (`--repr-on-host-too` adds a run with
them in host memory, which only separates them on a machine with a GPU). Writes
`benchmarks/results/offload_memory.{json,csv,png}`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks.common import (
    RESULTS_DIR,
    VanillaRunner,
    current_rss_bytes,
    engine_config,
    full_kv_bytes_per_token,
    machine,
    set_threads,
    write_csv,
    write_results,
)

MIB = 2**20

# Shapes of real models, for the computed full-KV column at 1M tokens (bf16).
REAL_MODELS: dict[str, dict[str, int]] = {
    "SmolLM2-135M": {"layers": 30, "kv_heads": 3, "head_dim": 64},
    "Qwen2.5-0.5B": {"layers": 24, "kv_heads": 2, "head_dim": 64},
    "Mistral-7B": {"layers": 32, "kv_heads": 8, "head_dim": 128},
    "Llama-3-8B": {"layers": 32, "kv_heads": 8, "head_dim": 128},
}


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2) -> Any:
    """A tiny random Llama (the shape of tests/tiny_models.py) with a 1M-position table."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval().to(dtype)


# The reference's block geometry with a smaller window and top-k, so 1M tokens of CPU
# prefill fit in minutes (per-token attention span 128 + 1024 + 4 x 128 + chunk).
LIGHT = {"n_local": 1024, "topk": 4, "max_cached_block": 8}


def reference_config(light: bool = False, **changes: Any) -> Any:
    """The InfLLM reference defaults (Mistral/Llama-3 configs), tracing off."""
    from langchain_infllm import InfLLMConfig

    base = {**LIGHT, **changes} if light else changes
    return engine_config(InfLLMConfig(), trace="off", **base)


def default_checkpoints(max_context: int, first: int = 1024) -> list[int]:
    points, n = [], first
    while n < max_context:
        points.append(n)
        n *= 2
    points.append(max_context)
    return points


def run_offload_memory(
    model: Any,
    config: Any,
    checkpoints: Sequence[int],
    *,
    label: str = "infllm",
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
    on_row: Callable[[list[dict[str, Any]]], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Grow one session through `checkpoints` (token counts); one row per checkpoint.

    `on_row(rows_so_far)` runs after each checkpoint (the CLI saves partial results).
    """
    from langchain_infllm import InfLLMEngine

    engine = InfLLMEngine(model, None, config)
    session = engine.new_session()
    per_token = full_kv_bytes_per_token(model.config, engine.dtype)
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    began = time.perf_counter()
    for point in checkpoints:
        missing = point - len(session)
        if missing > 0:
            ids = torch.randint(3, vocab, (missing,), generator=generator).tolist()
            session.append(ids)
        cache_bytes = engine.cache_resident_bytes()
        rows.append({
            "method": label, "context": len(session), "blocks": session.n_blocks,
            "session_device_bytes": session.device_bytes(),
            "repr_bytes": sum(layer.summary_bytes() for layer in session.layers
                              if not layer.repr_on_host),  # the device part of them
            "cache_resident_bytes": cache_bytes,
            "device_bytes": session.device_bytes() + cache_bytes,
            "cache_budget_bytes": engine.cache_budget_bytes(),
            "host_bytes": session.host_bytes(),
            "full_kv_bytes_computed": per_token * len(session),
            "rss": current_rss_bytes(),
            "elapsed_s": round(time.perf_counter() - began, 2),
        })
        r = rows[-1]
        log(f"{label:12s} {r['context']:8d} tokens: device {r['device_bytes'] / MIB:8.2f} MiB "
            f"host {r['host_bytes'] / MIB:8.2f} MiB "
            f"full KV {r['full_kv_bytes_computed'] / MIB:8.2f} MiB rss {r['rss'] / MIB:8.0f} MiB "
            f"({r['elapsed_s']:.0f} s)")
        on_row(rows)
    return rows


def run_full_kv(
    model: Any,
    checkpoints: Sequence[int],
    *,
    seed: int = 0,
    chunk: int = 4096,
    log: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Measured bytes of a transformers DynamicCache grown through `checkpoints`."""
    runner = VanillaRunner(model, chunk=chunk)
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    per_token = full_kv_bytes_per_token(model.config, next(model.parameters()).dtype)
    rows = []
    for point in checkpoints:
        missing = point - len(runner.tokens)
        if missing > 0:
            runner.append(torch.randint(3, vocab, (missing,), generator=generator).tolist())
        rows.append({"method": "full_kv_measured", "context": len(runner.tokens),
                     "full_kv_bytes_measured": runner.state_bytes(),
                     "full_kv_bytes_computed": per_token * len(runner.tokens),
                     "rss": current_rss_bytes()})
        log(f"full KV      {point:8d} tokens: "
            f"{rows[-1]['full_kv_bytes_measured'] / MIB:8.2f} MiB")
    return rows


def real_model_table(context: int = 1 << 20) -> list[dict[str, Any]]:
    """Computed full-KV bytes (bf16) of real models at `context` tokens."""
    out = []
    for name, s in REAL_MODELS.items():
        per_token = 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * 2
        out.append({"model": name, "kv_bytes_per_token": per_token,
                    "full_kv_gib": per_token * context / 2**30, "context": context})
    return out


def plot(rows: list[dict[str, Any]], path: Any, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    mib = 2**20
    labels = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "full_kv_measured"))
    for i, label in enumerate(labels):
        mine = [r for r in rows if r["method"] == label]
        ctx = [r["context"] for r in mine]
        color = f"C{i}"
        ax.plot(ctx, [r["device_bytes"] / mib for r in mine], "o-", color=color,
                label=f"{label}: device-resident")
        ax.plot(ctx, [r["repr_bytes"] / mib for r in mine], "^:", color=color,
                label=f"{label}: representative keys (part of device)", alpha=0.7)
        ax.plot(ctx, [r["host_bytes"] / mib for r in mine], "s--", color=color,
                label=f"{label}: host", alpha=0.7)
        if i == 0:
            ax.plot(ctx, [r["full_kv_bytes_computed"] / mib for r in mine], "k:",
                    label="full KV cache (computed)")
    measured = [r for r in rows if r["method"] == "full_kv_measured"]
    if measured:
        ax.plot([r["context"] for r in measured],
                [r["full_kv_bytes_measured"] / mib for r in measured], "kx",
                label="full KV cache (measured DynamicCache)")
    ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="MiB")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    mib = 2**20
    labels = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "full_kv_measured"))
    measured = {r["context"]: r["full_kv_bytes_measured"] for r in rows
                if r["method"] == "full_kv_measured"}
    by_ctx: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["method"] in labels:
            by_ctx.setdefault(r["context"], {})[r["method"]] = r
    head = "| context | full KV computed (MiB) | full KV measured (MiB) | "
    head += " | ".join(f"{lb} device (MiB) | of which representatives | {lb} host (MiB) | "
                       "process RSS (MiB)" for lb in labels) + " |"
    lines = [head, "|" + "---|" * (3 + 4 * len(labels))]
    for ctx in sorted(by_ctx):
        cells = by_ctx[ctx]
        full = next(iter(cells.values()))["full_kv_bytes_computed"] / mib
        meas = f"{measured[ctx] / mib:.2f}" if ctx in measured else "—"
        parts = []
        for lb in labels:
            r = cells.get(lb)
            parts.append("— | — | — | —" if r is None else
                         f"{r['device_bytes'] / mib:.2f} | {r['repr_bytes'] / mib:.2f} | "
                         f"{r['host_bytes'] / mib:.2f} | {r['rss'] / mib:.0f}")
        lines.append(f"| {ctx} | {full:.2f} | {meas} | " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-context", type=int, default=1 << 20)
    parser.add_argument("--measure-full-up-to", type=int, default=1 << 16)
    parser.add_argument("--repr-on-host-too", action="store_true",
                        help="also run with representatives in host memory (on a CPU-only "
                             "machine host and device are the same torch device, so the "
                             "engine counts them as device bytes either way)")
    parser.add_argument("--reference-window", action="store_true",
                        help="use the reference n_local 4096 / topk 16 / max_cached_block 32 "
                             "(about 3x slower on CPU) instead of 1024 / 4 / 8")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="offload_memory")
    args = parser.parse_args()
    set_threads(args.threads)
    checkpoints = default_checkpoints(args.max_context)
    log = lambda s: print(s, flush=True)  # noqa: E731
    began = time.perf_counter()
    config = reference_config(light=not args.reference_window)
    info = machine()

    def save(rows: list[dict[str, Any]], partial: bool = True) -> Any:
        return write_results(args.name, {
            "machine": info, "args": vars(args), "config": config.model_dump(),
            "model": "tiny random Llama: 2 layers, 4/2 heads, head_dim 16, fp32",
            "partial": partial, "wall_seconds": time.perf_counter() - began, "rows": rows,
            "real_models_full_kv_at_1m": real_model_table(),
        })

    rows = run_offload_memory(tiny_llama(), config, checkpoints, label="infllm", log=log,
                              on_row=save)
    if args.repr_on_host_too:
        rows += run_offload_memory(tiny_llama(), engine_config(config, repr_on_host=True),
                                   checkpoints, label="infllm_repr_on_host", log=log)
    full_points = [c for c in checkpoints if c <= args.measure_full_up_to]
    if full_points:
        vanilla = tiny_llama()
        vanilla.set_attn_implementation("sdpa")
        rows += run_full_kv(vanilla, full_points, log=log)
    info = machine()
    table = markdown_table(rows)
    (RESULTS_DIR / f"{args.name}.md").write_text(
        f"# Offload memory (tiny Llama)\n\n{info['date']}, {info['cpu']}\n\n"
        + table)
    path = save(rows, partial=False)
    write_csv(args.name, rows)
    plot(rows, path.with_suffix(".png"),
         title=f"tiny Llama, block {config.block_size}, n_local {config.n_local}, topk "
               f"{config.topk}, max_cached_block {config.max_cached_block}; {info['date']}")
    print(table)
    print(f"wrote {path} ({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
