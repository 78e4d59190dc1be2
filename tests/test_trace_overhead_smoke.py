"""Smoke test of benchmarks/trace_overhead.py on a tiny random model (seconds, CPU only).

Same set-up as tests/test_chat_models.py: a tiny random Qwen2-shaped model with a real chat
tokenizer (SmolLM2's, from the embedded model), one engine per trace level. Checks the rows'
structure and the events each level produces: none at ``off``, one step summary per call
at ``summary``, retrieval events on top of it at ``full``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from benchmarks.trace_overhead import (
    LEVELS,
    build_chat_models,
    markdown_table,
    plot,
    profile_levels,
    profile_table,
    run_trace_overhead,
    summarize,
)
from tests.shared_configs import TINY_CHAT_CONFIG
from tests.tiny_models import tiny_chat_qwen2

pytestmark = pytest.mark.real_model  # the chat tokenizer comes with the embedded model

STEPS = 2


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_models(vocab: int, copies: int) -> list[Any]:
    model = tiny_chat_qwen2(vocab)
    return [model] + [copy.deepcopy(model) for _ in range(copies - 1)]


def test_trace_overhead_runs_every_level_and_counts_events(tmp_path: Path) -> None:
    from langchain_infllm.models.embedded import ensure_embedded_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model("smollm2-135m-instruct"))
    models = _tiny_models(len(tokenizer), len(LEVELS))
    llms = build_chat_models(models, tokenizer, TINY_CHAT_CONFIG, gen_tokens=4, model_name="tiny")
    assert [llm.get_engine().config.trace for llm in llms.values()] == list(LEVELS)

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    rows = run_trace_overhead(
        llms, encode, start_tokens=150, steps=STEPS, obs_tokens=40, handler_on_off=True
    )

    assert len(rows) == STEPS * len(LEVELS)
    for step in range(STEPS):
        mine = [r for r in rows if r["step"] == step]
        assert sorted(r["level"] for r in mine) == sorted(LEVELS)
        assert sorted(r["order"] for r in mine) == list(range(len(LEVELS)))
    assert {r["level"] for r in rows if r["step"] == 0 and r["order"] == 0} == {"off"}
    assert {r["level"] for r in rows if r["step"] == 1 and r["order"] == 0} == {"summary"}
    for r in rows:
        assert r["step_s"] > 0 and r["prefill_s"] >= 0 and r["decode_s"] > 0
        assert r["prompt_tokens"] > TINY_CHAT_CONFIG.n_local  # beyond the window: retrieval happens
        assert r["tokens_generated"] == 4
        assert r["tokens_computed"] < r["prompt_tokens"]  # the history is reused
    by_level = {lv: [r for r in rows if r["level"] == lv] for lv in LEVELS}
    # off: the engine keeps no records and nothing is emitted, even with a handler attached
    assert all(
        r["retrieval_events"] == r["summary_events"] == r["retrievals"] == 0
        for r in by_level["off"]
    )
    # summary: one step summary per call, no per-record events
    assert all(r["summary_events"] == 1 and r["retrieval_events"] == 0 for r in by_level["summary"])
    assert all(r["retrievals"] > 0 for r in by_level["summary"])
    # full: the summary plus one event per retrieval record
    assert all(
        r["summary_events"] == 1 and r["retrieval_events"] == r["retrievals"] > 0
        for r in by_level["full"]
    )

    def events(level: str) -> int:
        return sum(r["retrieval_events"] + r["summary_events"] for r in by_level[level])

    assert events("full") > events("summary") > events("off") == 0

    summary = summarize(rows)
    json.dumps(summary)
    assert summary["answers_identical_across_levels"]  # tracing never changes the output
    assert list(summary["levels"]) == list(LEVELS)
    assert set(summary["overhead"]) == {"summary/off", "full/off"}
    for ratio in summary["overhead"].values():
        assert ratio["ratio_of_medians"] > 0 and ratio["median_paired_ratio"] > 0
    table = markdown_table(summary)
    assert table.count("\n") == 2 + len(LEVELS)
    plot(rows, tmp_path / "trace.png")
    assert (tmp_path / "trace.png").stat().st_size > 0

    profile = profile_levels(llms, encode, steps=1, obs_tokens=40, start_tokens=150)
    assert list(profile) == list(LEVELS)
    payloads = "trace_data.py:retrieval_event_payloads"
    assert [profile[lv][payloads]["calls_per_step"] for lv in LEVELS] == [0, 0, 1]
    assert profile["summary"]["trace_data.py:step_summary_payload"]["calls_per_step"] == 1
    assert profile["off"]["trace_data.py:step_summary_payload"]["calls_per_step"] == 0
    assert profile_table(profile).count("\n") == 2 + len(profile["off"])
