"""The default retrieval brings back a fact the paper's scoring loses (real model).

The document reader's conversation (seeded, every page read through the tool, then the
question as a new user turn) is replayed on the embedded Qwen2.5-Coder-0.5B, greedy.
Three engines on the same token ids and the same model: the shipped config (per-KV-head
`maxkey` retrieval), the same config with the paper's scoring (`retrieval: infllm`), and
the control with the whole conversation inside the window (full attention), which shows
the model can answer. The fact sits ~3.9K tokens back, far outside the 1K local window.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.common import engine_generate
from benchmarks.recall import agent_case, method_config
from langchain_infllm import InfLLMConfig, InfLLMEngine
from langchain_infllm.models.embedded import load_model_and_tokenizer

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

MODEL = "qwen2.5-coder-0.5b-instruct"
CONFIG = "config/agents-cpu.yaml"
SEED, QUESTION = 0, 2  # a fact the paper misses in benchmarks/results/recall.json
PAPER = "infllm:block_size=64,topk=16,max_cached_block=32"


def test_default_retrieval_recalls_a_fact_the_paper_scoring_misses(tmp_path: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(MODEL, device="cpu")
    case = agent_case("document_reader", "small", SEED, tokenizer, tmp_path)
    question = case.questions[QUESTION]
    shipped = InfLLMConfig.from_yaml(CONFIG)
    assert shipped.retrieval == "maxkey"
    longest = len(case.prefix_ids) + len(question.suffix_ids) + 64
    stop = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    answers = {}
    # As benchmarks/recall.py runs them: the paper in its own layout (16 blocks of 64).
    for method in ("full", "maxkey", PAPER):
        engine = InfLLMEngine(model, tokenizer, method_config(shipped, method, longest))
        session = engine.new_session()
        session.append(case.prefix_ids)
        session.append(question.suffix_ids)
        produced = engine_generate(session, 24, stop=lambda ids: ids[-1] in stop)
        answers[method] = tokenizer.decode(produced, skip_special_tokens=True)
        session.close()
    assert question.fact_positions[0] < longest - 3 * shipped.n_local  # far outside the window
    assert question.is_correct(answers["full"]), f"control failed: {answers}"
    assert question.is_correct(answers["maxkey"]), f"default missed: {answers}"
    assert not question.is_correct(answers[PAPER]), f"paper found it: {answers}"
