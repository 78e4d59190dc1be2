"""Run every benchmark with the configuration recorded in benchmarks/RESULTS.md.

    python -m benchmarks.run_all           # RESULTS.md configuration (~1-2 h on 2 busy cores)
    python -m benchmarks.run_all --quick   # small sizes, a few minutes: checks it all runs
    python -m benchmarks.run_all --only agent_steps offload_memory

Each benchmark writes JSON/CSV/PNG (and Markdown where it has a table) to
benchmarks/results/, with the machine, load average and date. Other jobs on a shared
machine slow everything down: compare methods within one run, and read ratios.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

THREADS = ["--threads", "1"]  # on a shared 2-core box, 2 OpenMP threads each oversubscribe

RESULTS: dict[str, list[list[str]]] = {
    "long_context": [
        ["benchmarks.long_context", "--tasks", "passkey", "kv_retrieval", "niah_multikey",
         "--lengths", "6144", "--depths", "0.25", "0.75", "--methods", "infllm", "full",
         "truncate", "--name", "long_context_in_native", *THREADS],
        ["benchmarks.long_context", "--tasks", "passkey", "--lengths", "16384",
         "--depths", "0.25", "0.75", "--methods", "infllm", "sinks_window", "truncate",
         "control", "--name", "long_context_beyond_native", *THREADS],
    ],
    "agent_steps": [
        ["benchmarks.agent_steps", "--methods", "infllm", "vanilla_cache", "--max-context",
         "32768", "--measure-every", "8", *THREADS],
        # Recomputing a 32K prompt takes >10 min per step on 1 CPU thread: stop at 16K.
        ["benchmarks.agent_steps", "--methods", "recompute", "--max-context", "16384",
         "--recompute-every", "8", "--name", "agent_steps_recompute_16k", *THREADS],
    ],
    # 1M tokens is the target; RESULTS.md stops at 262K (see its notes on process RSS).
    "offload_memory": [["benchmarks.offload_memory", "--max-context", "262144",
                        "--measure-full-up-to", "65536", *THREADS]],
    "prefill": [["benchmarks.prefill", "--lengths", "2048", "8192", *THREADS]],
}

QUICK: dict[str, list[list[str]]] = {
    "long_context": [
        ["benchmarks.long_context", "--tasks", "passkey", "--lengths", "2048", "4096",
         "--depths", "0.5", "--name", "long_context_quick", *THREADS],
    ],
    "agent_steps": [
        ["benchmarks.agent_steps", "--max-context", "4096", "--measure-every", "2",
         "--recompute-every", "4", "--name", "agent_steps_quick", *THREADS],
    ],
    "offload_memory": [
        ["benchmarks.offload_memory", "--max-context", "65536", "--measure-full-up-to",
         "16384", "--name", "offload_memory_quick", *THREADS],
    ],
    "prefill": [["benchmarks.prefill", "--lengths", "2048", *THREADS]],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=sorted(RESULTS))
    args = parser.parse_args()
    plan = QUICK if args.quick else RESULTS
    failed = []
    for name, commands in plan.items():
        if args.only and name not in args.only:
            continue
        for command in commands:
            print(f"=== python -m {' '.join(command)}", flush=True)
            began = time.perf_counter()
            code = subprocess.call([sys.executable, "-m", *command])
            print(f"=== exit {code} after {time.perf_counter() - began:.0f} s", flush=True)
            if code:
                failed.append(command[0])
    if failed:
        sys.exit(f"failed: {failed}")


if __name__ == "__main__":
    main()
