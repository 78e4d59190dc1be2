"""Prefill throughput and peak memory: InfLLM engine vs the unmodified model.

    python -m benchmarks.prefill [--model smollm2-135m-instruct] [--lengths 2048 8192 32768]

Each (method, length) runs in its own process so its peak RSS is its own. Writes
`benchmarks/results/prefill.json` and `prefill.png`; ratios are engine / full attention
from the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import machine, peak_rss_bytes, run_isolated, set_threads, write_results


def _one(method: str, model_name: str, length: int, config_path: str) -> dict[str, float]:
    from langchain_infllm import InfLLMConfig, InfLLMEngine
    from langchain_infllm.models.embedded import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_name, device="cpu")
    ids = torch.randint(100, 20000, (length,), generator=torch.Generator().manual_seed(0))
    began = time.perf_counter()
    if method == "full":
        chunk = 4096
        with torch.no_grad():
            from transformers import DynamicCache

            cache = DynamicCache()
            for a in range(0, length, chunk):
                model(input_ids=ids[None, a : a + chunk], past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
    else:
        engine = InfLLMEngine(model, None, InfLLMConfig.from_yaml(config_path))
        engine.new_session().append(ids.tolist())
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "tokens_per_s": length / seconds, "peak_rss": peak_rss_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--config", default="config/smollm2-cpu.yaml")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 avoids oversubscription on a shared 2-core box)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.one:
        print(json.dumps(_one(args.one[0], args.model, int(args.one[1]), args.config)))
        return
    rows = []
    for length in args.lengths:
        row: dict[str, object] = {"length": length}
        for method in ("infllm", "full"):
            threads = ["--threads", str(args.threads)] if args.threads else []
            res = run_isolated("benchmarks.prefill", ["--model", args.model, "--config",
                                                       args.config, *threads,
                                                       "--one", method, str(length)])
            row[method] = res
            print(f"{method:7s} {length:6d} tokens: {res['tokens_per_s']:8.0f} tok/s, "
                  f"peak RSS {res['peak_rss'] / 2**30:.2f} GiB", flush=True)
        inf, full = row["infllm"], row["full"]
        assert isinstance(inf, dict) and isinstance(full, dict)
        row["speed_ratio"] = inf["tokens_per_s"] / full["tokens_per_s"]
        row["rss_ratio"] = inf["peak_rss"] / full["peak_rss"]
        rows.append(row)
    path = write_results("prefill", {"machine": machine(), "model": args.model,
                                     "config": args.config, "rows": rows})
    _plot(rows, path.with_suffix(".png"))
    print(f"wrote {path}")


def _plot(rows: list[dict[str, object]], path: object) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["length"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in ("infllm", "full"):
        axes[0].plot(lengths, [r[method]["tokens_per_s"] for r in rows], "o-", label=method)  # type: ignore[index]
        axes[1].plot(lengths, [r[method]["peak_rss"] / 2**30 for r in rows], "o-", label=method)  # type: ignore[index]
    axes[0].set(xscale="log", xlabel="prompt tokens", ylabel="prefill tokens/s")
    axes[1].set(xscale="log", xlabel="prompt tokens", ylabel="peak RSS (GiB)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)


if __name__ == "__main__":
    main()
