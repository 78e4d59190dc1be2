"""The default retrieval brings back a fact the paper's scoring loses (real model).

The document reader's conversation (seeded, every page read through the tool, then the
question as a new user turn) is replayed on the embedded Qwen2.5-Coder-0.5B, greedy.
Three engines on the same token ids and the same model: the shipped config (per-KV-head
`maxkey` retrieval), the same config with the paper's scoring (`retrieval: infllm`), and
the control with the whole conversation inside the window (full attention), which shows
the model can answer. The fact sits ~5K tokens back, far outside the 1K local window.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.recall import agent_case, method_config
from langchain_infllm import InfLLMConfig, InfLLMEngine
from langchain_infllm.models.embedded import load_model_and_tokenizer

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

MODEL = "qwen2.5-coder-0.5b-instruct"
CONFIG = "config/agents-cpu.yaml"
SEED, QUESTION = 0, 1  # chosen from benchmarks/results/recall-ablation.json


def test_default_retrieval_recalls_a_fact_the_paper_scoring_misses(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(MODEL, device="cpu")
    case = agent_case("document_reader", "small", SEED, tokenizer, tmp_path)
    question = case.questions[QUESTION]
    prompt = case.prefix_ids + question.suffix_ids
    shipped = InfLLMConfig.from_yaml(CONFIG)
    assert shipped.retrieval == "maxkey"
    stop = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    answers = {}
    for method in ("full", "maxkey", "infllm"):
        engine = InfLLMEngine(model, tokenizer, method_config(shipped, method, len(prompt) + 64))
        session = engine.new_session()
        session.append(prompt)
        produced = []
        for token in session.generate(24):
            if token in stop:
                break
            produced.append(token)
        answers[method] = tokenizer.decode(produced)
        session.close()
    assert question.fact_positions[0] < len(prompt) - 4 * shipped.n_local
    assert question.is_correct(answers["full"]), f"control failed: {answers}"
    assert question.is_correct(answers["maxkey"]), f"default missed: {answers}"
    assert not question.is_correct(answers["infllm"]), f"paper found it: {answers}"
