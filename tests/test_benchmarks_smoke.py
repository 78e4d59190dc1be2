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


class _Recorder:
    """A session stand-in that records the appends `feed` makes."""

    def __init__(self, held: int) -> None:
        self.held = held
        self.calls: list[list[int]] = []

    def __len__(self) -> int:
        return self.held

    def append(self, ids: list[int]) -> None:
        self.calls.append(ids)
        self.held += len(ids)


def test_feed_appends_generated_spans_one_token_per_step() -> None:
    """Replayed history is chunked as the agent produced it: prompt runs in one append,
    every generated token alone (absolute positions; spans outside the ids ignored)."""
    from benchmarks.recall import feed

    session = _Recorder(held=10)
    feed(session, list(range(10, 20)), [(2, 5), (13, 15), (18, 30)])
    assert session.calls == [[10, 11, 12], [13], [14], [15, 16, 17], [18], [19]]


def test_value_lead_splits_an_answer_where_the_value_starts(qwen_tokenizer: Any) -> None:
    """The decision point: the control's tokens before the value (a separate space token
    goes with the value) and the tokens that spell it; None without the value."""
    from benchmarks.recall import value_lead

    ids = qwen_tokenizer.encode("The pier 30 was closed for repairs.", add_special_tokens=False)
    lead = value_lead(ids, "30", qwen_tokenizer)
    assert lead is not None
    before, value = lead
    assert before + value == ids[: len(before) + len(value)]
    assert qwen_tokenizer.decode(before).rstrip() == "The pier"
    assert qwen_tokenizer.decode(value).strip() == "30"
    assert value_lead(ids, "41", qwen_tokenizer) is None


def test_transcript_case_replays_the_agents_own_messages(
    qwen_tokenizer: Any, tmp_path: Path
) -> None:
    """A saved agent transcript becomes one case: questions in order with the earlier
    answers in their prompts, the fact's tokens where the value is, and every assistant
    turn's tokens marked as generated."""
    import json

    from agents import document_reader
    from benchmarks.recall import transcript_case

    task = document_reader.build_task("tiny", 0)
    tools = {t.name: t for t in task.tools}
    messages: list[dict[str, Any]] = [{"role": "user", "content": task.start_message}]
    for i, call in enumerate(task.guide.plan):
        messages.append({"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "id": f"c{i}", "function": {
                "name": call.tool, "arguments": json.dumps(dict(call.args))}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{i}",
                         "content": str(tools[call.tool].invoke(dict(call.args)))})
    messages.append({"role": "assistant", "content": "DONE"})
    for n, q in enumerate(task.questions):
        messages.append({"role": "user", "content": task.question_template.format(
            question=q.prompt)})
        messages.append({"role": "assistant", "content": f"Answer number {n}."})
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(messages))
    case = transcript_case("document_reader", "tiny", 0, path, qwen_tokenizer, tmp_path)
    assert [q.label for q in case.questions] == [q.prompt for q in task.questions]
    ids = case.prefix_ids + case.questions[-1].suffix_ids
    assert "Answer number 0." in qwen_tokenizer.decode(ids)  # earlier answers are history
    for q in case.questions:
        a, b = q.fact_positions
        assert q.value in qwen_tokenizer.decode(ids[a:b])
    assistant_turns = 1 + len(task.guide.plan) + len(task.questions)
    assert len(case.decoded) == assistant_turns
    end_of_turn = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(a < b for a, b in case.decoded)
    # the last answer follows the last question's prompt; every earlier one is inside it
    # and ends with the stop token the model generated
    assert case.decoded[-1][0] == len(ids)
    assert all(ids[b - 1] == end_of_turn for _, b in case.decoded[:-1])
