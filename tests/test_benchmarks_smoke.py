"""Smoke tests of the benchmark runners on tiny random models (seconds, CPU only).

They check the structure of what each runner returns and one sanity property each:
long_context agrees with full attention while the prompt fits the local window and skips
full attention beyond the native window; agent_steps computes only the appended tokens per
step; offload_memory's full KV grows linearly while the engine's device bytes (minus the
representative keys) stay bounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.agent_steps import markdown_summary, run_agent_steps, summarize
from benchmarks.agent_steps import plot as plot_steps
from benchmarks.common import CharCodec, VanillaRunner, full_kv_bytes_per_token
from benchmarks.long_context import heatmap, markdown_table, run_long_context
from benchmarks.offload_memory import plot as plot_offload
from benchmarks.offload_memory import run_full_kv, run_offload_memory, tiny_llama
from langchain_infllm import InfLLMConfig
from tests.tiny_models import tiny_pair

SMALL = dict(block_size=16, n_init=16, n_local=64, topk=2, max_cached_block=4,
             exc_block_size=32, chunk_size=256, trace="off")


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pair() -> tuple[Any, Any]:
    engine_model, vanilla = tiny_pair("llama")
    vanilla.set_attn_implementation("sdpa")
    return engine_model, vanilla


def test_vanilla_runner_reuses_prefix_and_crops() -> None:
    _, vanilla = _pair()
    runner = VanillaRunner(vanilla, chunk=64)
    ids = list(range(3, 90)) * 2
    assert runner.sync(ids) == len(ids)
    assert runner.sync(ids) == 0
    assert runner.sync([*ids, 5, 6]) == 2
    assert runner.sync([*ids[:100], 7]) == 1  # cropped back to 100, one new token
    assert runner.cache.get_seq_length() == 101
    per_token = full_kv_bytes_per_token(vanilla.config, torch.float32)
    assert runner.state_bytes() == 101 * per_token
    fresh = VanillaRunner(vanilla, chunk=64)
    fresh.sync([*ids[:100], 7])
    assert torch.allclose(fresh.last_logits, runner.last_logits, atol=1e-5)  # type: ignore[arg-type]


def test_long_context_grid(tmp_path: Path) -> None:
    engine_model, vanilla = _pair()
    config = InfLLMConfig.create(**{**SMALL, "n_local": 1024, "block_size": 64, "n_init": 64,
                                    "exc_block_size": 128, "chunk_size": 512})
    run = run_long_context(
        engine_model, vanilla, CharCodec(97), config, tasks=["passkey"], lengths=[700, 1400],
        depths=[0.3, 0.7], native=1000, max_new_tokens=4, reuse_prefix=True,
    )
    rows = run.rows
    methods = {"infllm", "sinks_window", "full", "truncate", "control"}
    for length in (700, 1400):
        for depth in (0.3, 0.7):
            got = {r["method"] for r in rows if r["length"] == length and r["depth"] == depth}
            assert got == methods
    for r in rows:
        assert r["score"] is None or 0.0 <= r["score"] <= 1.0
        assert r["prompt_tokens"] + 4 <= r["length"] or r["method"] == "control"
    by = {(r["method"], r["length"], r["depth"]): r for r in rows}
    for depth in (0.3, 0.7):
        # Within the local window the engine is the vanilla model: same greedy answer.
        assert by[("infllm", 700, depth)]["prediction"] == by[("full", 700, depth)]["prediction"]
        assert by[("truncate", 700, depth)]["prediction"] == by[("full", 700, depth)]["prediction"]
        # Beyond the native window full attention is not run, and says so.
        assert by[("full", 1400, depth)]["score"] is None
        assert by[("full", 1400, depth)]["beyond_native"] is True
        assert by[("truncate", 1400, depth)]["kept_tokens"] == 1000 - 4
    # Deepest needle first; the shallower prompt reuses the prefix before its needle.
    first, second = by[("infllm", 1400, 0.7)], by[("infllm", 1400, 0.3)]
    assert first["computed_tokens"] == first["prompt_tokens"]
    assert 0 < second["reused_tokens"] < second["prompt_tokens"]
    assert second["computed_tokens"] + second["reused_tokens"] == second["prompt_tokens"]
    fresh = run_long_context(
        engine_model, vanilla, CharCodec(97), config, tasks=["passkey"], lengths=[1400],
        depths=[0.3, 0.7], native=1000, max_new_tokens=4, methods=["infllm"],
    )
    for r in fresh.rows:  # default: a fresh session per prompt
        assert r["computed_tokens"] == r["prompt_tokens"] and r["reused_tokens"] == 0
    table = markdown_table(rows, run.native, run.control_length)
    assert "| passkey | 1400 | 0.3 |" in table and "InfLLM" in table
    heatmap(rows, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 0


def test_agent_steps_compute_only_new_tokens(tmp_path: Path) -> None:
    engine_model, vanilla = _pair()
    config = InfLLMConfig.create(**SMALL)
    kw: dict[str, Any] = dict(start_context=128, max_context=560, step_tokens=50, gen_tokens=4,
                              measure_every=2, recompute_every=3, id_range=(3, 97), native=300)
    rows = run_agent_steps(engine_model, "infllm", config, **kw)
    rows += run_agent_steps(vanilla, "vanilla_cache", **kw)
    rows += run_agent_steps(vanilla, "recompute", **kw)
    steps = 8  # ceil((560 - 128) / 54)
    for method in ("infllm", "vanilla_cache", "recompute"):
        mine = [r for r in rows if r["method"] == method]
        assert mine[0]["step"] == 0 and mine[-1]["step"] == steps - 1
        for r in mine:
            assert r["context"] == 128 + r["step"] * 54 + 50  # same history for every method
            assert r["generated_tokens"] == 4
            expected = r["context"] if method == "recompute" else 50
            assert r["computed_tokens"] == expected
    assert [r["step"] for r in rows if r["method"] == "infllm"] == [0, 2, 4, 6, 7]
    assert [r["step"] for r in rows if r["method"] == "recompute"] == [0, 3, 6, 7]
    assert any(r["beyond_native"] for r in rows) and not rows[0]["beyond_native"]
    summary = summarize(rows)
    assert set(summary) == {"infllm", "vanilla_cache", "recompute"}
    assert summary["infllm"]["computed_tokens_longest"] == 50
    # The prefix cache's state grows with the context; so does the engine's host memory.
    cache = summary["vanilla_cache"]
    assert cache["state_bytes_longest"] > cache["state_bytes_shortest"]
    assert "x |" in markdown_summary(summary)
    plot_steps(rows, tmp_path / "a.png", 300)
    assert (tmp_path / "a.png").stat().st_size > 0


@pytest.mark.parametrize("retrieval", ["infllm", "maxkey"])
def test_offload_memory_device_bounded_full_kv_linear(tmp_path: Path, retrieval: str) -> None:
    # maxkey's key index is a retrieval summary like the representatives: with it on the
    # host (repr_on_host) the device part is flat too.
    config = InfLLMConfig.create(**SMALL, retrieval=retrieval,
                                 repr_on_host=retrieval != "infllm")
    points = [256, 512, 1024, 2048]
    rows = run_offload_memory(tiny_llama(), config, points)
    assert [r["context"] for r in rows] == points
    per_token = rows[0]["full_kv_bytes_computed"] / 256
    for r in rows:
        assert r["full_kv_bytes_computed"] == per_token * r["context"]  # linear
        assert r["cache_resident_bytes"] <= r["cache_budget_bytes"]
    fixed = [r["device_bytes"] - r["repr_bytes"] for r in rows[1:]]
    assert max(fixed) == min(fixed)  # flat once the window is full
    assert rows[-1]["device_bytes"] < rows[-1]["full_kv_bytes_computed"] / 2
    assert rows[-1]["host_bytes"] > rows[1]["host_bytes"] * 3  # blocks go to the host
    vanilla = tiny_llama()
    vanilla.set_attn_implementation("sdpa")
    measured = run_full_kv(vanilla, [256, 512], chunk=128)
    for r in measured:
        assert r["full_kv_bytes_measured"] == r["full_kv_bytes_computed"]
    plot_offload(rows + measured, tmp_path / "o.png")
    assert (tmp_path / "o.png").stat().st_size > 0


@pytest.mark.real_model
def test_recall_diagnostic_runs_every_method_on_a_real_tokenizer(tmp_path: Path) -> None:
    """The recall diagnostic end to end on SmolLM2 (a short pass key, tiny windows): the
    controls bound what retrieval can do (full sees the fact's block everywhere, sinks +
    window nowhere), and the per-head method reports where the fact's block ranks."""
    import argparse

    from benchmarks.recall import markdown, run, summarise

    config = tmp_path / "tiny.yaml"
    config.write_text("block_size: 16\nn_init: 16\nn_local: 128\ntopk: 2\n"
                      "max_cached_block: 4\nexc_block_size: 64\nchunk_size: 512\n")
    args = argparse.Namespace(
        cases=["passkey"], size="small", seeds=[0], length=700, depths=[0.2],
        methods=["maxkey", "infllm", "sinks_window", "full", "truncate"],
        model="smollm2-135m-instruct", config=str(config), decode_tokens=6, threads=1)
    payload = run(args)
    rows = {r["method"]: r for r in payload["rows"]}
    assert set(rows) == set(args.methods)
    assert rows["full"]["fact_layers_selected"] == 1.0
    assert rows["truncate"]["fact_layers_selected"] == 1.0  # 700 tokens fit the window
    assert rows["sinks_window"]["fact_layers_selected"] == 0.0
    assert rows["maxkey"]["median_rank"] is not None
    assert all(r["fact_blocks"] for r in rows.values())
    summary = summarise(payload["rows"])
    assert "| passkey-700 | maxkey |" in markdown(summary)
