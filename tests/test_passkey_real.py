"""Pass key retrieval with the real SmolLM2-135M, inside and far beyond its 8K window.

Greedy, seeded, on the shipped config (`config/smollm2-cpu.yaml`: per-KV-head `maxkey`
retrieval, 64 + 1024 + 16 x 32 tokens attended per query), with the key near the start:

* the control: the same task inside the native window with the whole prompt in the
  window (full attention) shows the model reads such a key;
* at 4x the native window, where full attention cannot run, the shipped retrieval reads
  it, and sinks + window alone (topk=0, the StreamingLLM baseline) cannot: the key is
  then outside everything the model attends.

The same cases in benchmarks/RESULTS.md (recall diagnostic, pass key rows). fp32 weights
on every CPU, so the outcome does not hang on one CPU's bf16 rounding.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import torch

from benchmarks.recall import method_config
from benchmarks.tasks.synthetic import make_prompt, passkey
from langchain_infllm.config import InfLLMConfig
from langchain_infllm.engine.engine import InfLLMEngine
from langchain_infllm.models.embedded import load_model_and_tokenizer

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
CONFIG = "config/smollm2-cpu.yaml"
NATIVE_WINDOW = 8192
SEED, DEPTH = "0", 0.05  # as benchmarks/recall.py seeds its needle cases
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def model_and_tokenizer() -> tuple[Any, Any]:
    return load_model_and_tokenizer(MODEL, device="cpu", dtype=torch.float32)


def _answer(model_and_tokenizer: tuple[Any, Any], tokens: int, method: str
            ) -> tuple[str, str, int]:
    model, tok = model_and_tokenizer

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    sample = passkey(tokens, depth=DEPTH, seed=SEED, count_tokens=count)
    ids = tok(make_prompt(sample, "plain"), add_special_tokens=False)["input_ids"]
    config = method_config(InfLLMConfig.from_yaml(CONFIG), method, len(ids))
    session = InfLLMEngine(model, tok, config).new_session()
    start = time.perf_counter()
    session.append(ids)
    out = tok.decode(list(session.generate(8, temperature=0.0)))
    session.close()
    log.info("%s: %d tokens in %.1fs -> %r", method, len(ids), time.perf_counter() - start, out)
    return out, sample.answers[0], len(ids)


def test_control_full_attention_reads_the_key_inside_the_window(
    model_and_tokenizer: Any,
) -> None:
    out, key, n_tokens = _answer(model_and_tokenizer, NATIVE_WINDOW - 300, "full")
    assert n_tokens < NATIVE_WINDOW
    assert key in out, f"full attention did not read the pass key {key}: {out!r}"


def test_pass_key_far_beyond_the_window_needs_the_memory(model_and_tokenizer: Any) -> None:
    assert InfLLMConfig.from_yaml(CONFIG).retrieval == "maxkey"
    found, key, n_tokens = _answer(model_and_tokenizer, 4 * NATIVE_WINDOW + 512, "maxkey")
    assert n_tokens >= 4 * NATIVE_WINDOW
    assert key in found, f"pass key {key} not recovered at {n_tokens} tokens: {found!r}"
    lost, _, _ = _answer(model_and_tokenizer, 4 * NATIVE_WINDOW + 512, "sinks_window")
    assert key not in lost, f"sinks + window alone should not see the key: {lost!r}"
