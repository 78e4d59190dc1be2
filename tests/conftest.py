"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from langchain_infllm import Session


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls run ~30x slower when two intra-op threads fight over 2 busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def qwen_tokenizer() -> Any:
    """The embedded Qwen2.5-Coder tokenizer (its chat template drives the chat tests)."""
    from langchain_infllm.models.embedded import ensure_embedded_model

    return AutoTokenizer.from_pretrained(ensure_embedded_model("qwen2.5-coder-0.5b-instruct"))


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch, qwen_tokenizer: Any) -> list[str]:
    """Replies for `Session.generate` to produce, in order; each ends with <|im_end|>
    like a real turn, so the chat layers run on known output from a tiny random model."""
    replies: list[str] = []
    end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")

    def generate(
        self: Session,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: Any = (),
        seed: int | None = None,
    ) -> Iterator[int]:
        ids = [*qwen_tokenizer.encode(replies.pop(0), add_special_tokens=False), end]
        stops = set(stop_token_ids)
        for token in ids[:max_new_tokens]:
            self.append([token])
            yield token
            if token in stops:
                return

    monkeypatch.setattr(Session, "generate", generate)
    return replies
