"""Decode micro-benchmark: tokens/s of the engine's decode step at a fixed context.

    python benchmarks/decode_speed.py [--model smollm2-135m-instruct]
        [--config config/smollm2-cpu.yaml] [--length 4096] [--decode 64]
        [--threads 1] [--variants default fast_decode=false] [--rounds 3]
        [--profile out.prof]

Prefills `--length` random token ids once per variant (a config override list such as
``fast_decode=false,trace=summary``; ``default`` is the config as shipped), then times
`--decode` greedy tokens per round, the variants alternating inside every round so a
change of machine load hits all of them. Run as a file (not with ``-m``) so that
``PYTHONPATH`` can point at another checkout of ``langchain_infllm`` for a before/after
comparison of two code trees; it imports nothing else from this repository.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger("decode_speed")


def _ids(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, 20000, (n,), generator=gen).tolist()


def _overrides(spec: str) -> dict[str, Any]:
    """``a=1,b=false`` -> {"a": 1, "b": False} (``default``: no change)."""
    out: dict[str, Any] = {}
    if spec == "default":
        return out
    for item in filter(None, spec.split(",")):
        key, _, raw = item.partition("=")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        elif raw.lstrip("-").isdigit():
            value = int(raw)
        out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> None:
    from langchain_infllm import InfLLMConfig, InfLLMEngine
    from langchain_infllm.models.embedded import load_model_and_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--config", default="config/smollm2-cpu.yaml")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=["default"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default=None, help="write a cProfile of the decode here")
    parser.add_argument("--json", default=None, help="append one JSON line per result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model, _ = load_model_and_tokenizer(args.model, device="cpu")
    base = InfLLMConfig.from_yaml(args.config).model_dump()
    base["trace"] = "off"
    sessions = {}
    for spec in args.variants:
        config = InfLLMConfig.create(**{**base, **_overrides(spec)})
        session = InfLLMEngine(model, None, config).new_session()
        began = time.perf_counter()
        session.append(_ids(args.length, 0))
        prefill = time.perf_counter() - began
        logger.info("%s: prefill %d tokens at %.1f tok/s", spec, args.length,
                    args.length / prefill)
        sessions[spec] = session
    profiler = cProfile.Profile() if args.profile else None
    results: dict[str, list[float]] = {spec: [] for spec in args.variants}
    for r in range(args.rounds):
        order = args.variants[r % len(args.variants):] + args.variants[: r % len(args.variants)]
        for spec in order:
            session = sessions[spec]
            if profiler is not None:
                profiler.enable()
            began = time.perf_counter()
            list(session.generate(args.decode))
            seconds = time.perf_counter() - began
            if profiler is not None:
                profiler.disable()
            results[spec].append(args.decode / seconds)
            logger.info("round %d %s: decode %.2f tok/s (load %s)", r, spec,
                        args.decode / seconds, os.getloadavg()[0])
    if profiler is not None:
        profiler.dump_stats(args.profile)
    for spec, rates in results.items():
        rates.sort()
        line = {"variant": spec, "decode_tok_s_median": round(rates[len(rates) // 2], 2),
                "decode_tok_s_all": [round(x, 2) for x in rates], "length": args.length,
                "threads": args.threads, "load": os.getloadavg()[0]}
        logger.info(json.dumps(line))
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
