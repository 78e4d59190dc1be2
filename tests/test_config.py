"""Configuration validation: every rule names its field, every shipped config loads, and
an unsupported architecture is refused up front with the list of supported ones."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaModel,
    PhiConfig,
    PhiForCausalLM,
)

from langchain_infllm import ConfigError, InfLLMConfig, InfLLMEngine, UnsupportedModelError
from langchain_infllm.config import model_path_from_yaml
from langchain_infllm.engine import SUPPORTED_MODEL_TYPES
from tests.tiny_models import COMMON

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

REFERENCE = """\
model:
  type: inf-llm
  path: some/model
  block_size: 128
  n_init: 128
  n_local: 4096
  topk: 16
  repr_topk: 4
  max_cached_block: 32
  exc_block_size: 512
  fattn: false
  base: 1000000
  distance_scale: 1.0
max_len: 2147483647
chunk_size: 8192
conv_type: mistral-inst
truncation: suffix
"""


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------ create(...)
@pytest.mark.parametrize(
    ("values", "needles"),
    [
        ({"topk": 40, "max_cached_block": 32}, ["topk (40)", "max_cached_block (32)", "<="]),
        ({"n_local": 64, "block_size": 128}, ["n_local (64)", "block_size (128)", ">="]),
        ({"repr_topk": 9, "block_size": 8, "n_local": 64}, ["repr_topk (9)", "block_size (8)"]),
        ({"block_size": -1}, ["block_size", "greater than 0"]),
        ({"block_size": 0}, ["block_size", "greater than 0"]),
        ({"n_local": -5}, ["n_local", "greater than 0"]),
        ({"n_init": -1}, ["n_init", "greater than or equal to 0"]),
        ({"topk": -1}, ["topk", "greater than or equal to 0"]),
        ({"repr_topk": 0}, ["repr_topk", "greater than 0"]),
        ({"max_cached_block": -3}, ["max_cached_block", "greater than 0"]),
        ({"exc_block_size": 0}, ["exc_block_size", "greater than 0"]),
        ({"chunk_size": -1}, ["chunk_size", "greater than 0"]),
        ({"max_context": 0}, ["max_context", "greater than 0"]),
        ({"session_host_budget_bytes": -1}, ["session_host_budget_bytes", "greater than 0"]),
        ({"score_decay": 1.5}, ["score_decay", "less than or equal to 1"]),
        ({"cache_strategy": "fifo"}, ["cache_strategy", "'lru'", "'lru-s'"]),
        ({"trace": "verbose"}, ["trace", "'off'"]),
        ({"block_size": 12.5}, ["block_size", "integer"]),
        ({"dense_decoding": True}, ["dense_decoding"]),
        ({"bogus": 1}, ["bogus", "unknown key"]),
        ({"topK": 4}, ["topK", "unknown key"]),
    ],
    ids=lambda v: "-".join(map(str, v)) if isinstance(v, dict) else None,
)
def test_create_names_field_and_rule(values: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        InfLLMConfig.create(**values)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert "\n" not in message.strip()  # one readable line, not pydantic's dump


def test_create_reports_every_broken_field_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        InfLLMConfig.create(block_size=-1, topk=-1, bogus=2)
    for field in ("block_size", "topk", "bogus"):
        assert field in str(info.value)


def test_config_error_is_a_value_error_and_config_is_frozen() -> None:
    assert issubclass(ConfigError, ValueError)
    config = InfLLMConfig.create(topk=4, max_cached_block=4)
    assert config.topk == config.max_cached_block == 4  # equality is allowed
    with pytest.raises(ValueError, match="frozen"):
        config.topk = 8  # type: ignore[misc]


def test_fingerprint_tracks_memory_layout_only() -> None:
    base = InfLLMConfig.create()
    assert base.fingerprint() == InfLLMConfig.create(trace="off", topk=8).fingerprint()
    for change in ({"block_size": 64}, {"n_init": 0}, {"n_local": 2048}, {"repr_topk": 2}):
        assert InfLLMConfig.create(**change).fingerprint() != base.fingerprint()


def test_fingerprint_tells_memory_positions_apart() -> None:
    """Every later token's keys were computed through the memory, so a session built with
    one placement of memory keys must not load into an engine with another."""
    prints = {InfLLMConfig.create(memory_positions=p).fingerprint()  # type: ignore[arg-type]
              for p in ("fixed", "exact", "compact")}
    assert len(prints) == 3
    with pytest.raises(ValueError, match="memory_positions"):
        InfLLMConfig.create(memory_positions="sliding")


# ------------------------------------------------------------------- from_yaml
def test_reference_layout_loads(tmp_path: Path) -> None:
    config = InfLLMConfig.from_yaml(write(tmp_path, REFERENCE))
    assert (config.block_size, config.n_init, config.n_local) == (128, 128, 4096)
    assert (config.topk, config.max_cached_block, config.chunk_size) == (16, 32, 8192)
    assert config.max_context is None  # the reference's "no limit" max_len
    assert model_path_from_yaml(tmp_path / "c.yaml") == "some/model"


def test_flat_layout_and_infllm_section_load(tmp_path: Path) -> None:
    flat = InfLLMConfig.from_yaml(write(tmp_path, "topk: 2\nmax_cached_block: 2\n", "f.yaml"))
    assert flat.topk == flat.max_cached_block == 2
    extra = REFERENCE + "infllm:\n  trace: full\n  repr_on_host: true\n"
    config = InfLLMConfig.from_yaml(write(tmp_path, extra.replace("2147483647", "100000")))
    assert config.trace == "full" and config.repr_on_host and config.max_context == 100000


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (REFERENCE.replace("topk: 16", "topk: 64"), ["topk (64)", "max_cached_block (32)"]),
        (REFERENCE.replace("n_local: 4096", "n_local: 64"), ["n_local (64)", "block_size"]),
        (REFERENCE.replace("n_init: 128", "n_init: -1"), ["n_init", "greater than or equal"]),
        (REFERENCE.replace("block_size: 128", "block_size: -128"), ["block_size"]),
        (REFERENCE.replace("topk: 16", "topk: 16\n  top_k: 3"), ["top_k", "unknown key"]),
        (REFERENCE.replace("type: inf-llm", "type: origin"), ["model.type", "'origin'", "inf-llm"]),
        (REFERENCE.replace("fattn: false", "faiss: true"), ["model.faiss", "not supported"]),
        (REFERENCE.replace("fattn: false", "perhead: true"), ["model.perhead"]),
        (REFERENCE + "colour: blue\n", ["unknown top-level", "colour"]),
        (REFERENCE + "infllm: [1, 2]\n", ["infllm", "mapping"]),
        (REFERENCE + "infllm:\n  bogus: 1\n", ["bogus", "unknown key"]),
        ("model: 12\n", ["model", "mapping"]),
        ("model:\n  topk: [1\n", ["not valid YAML"]),
        ("topk: 2\n  bad indent: [\n", ["not valid YAML"]),
        ("- just\n- a list\n", ["expected a mapping"]),
        ("", ["expected a mapping"]),
        ("top_k: 4\n", ["top_k", "unknown key"]),
    ],
)
def test_from_yaml_errors_name_file_field_and_rule(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        InfLLMConfig.from_yaml(path)
    message = str(info.value)
    assert str(path) in message, "the message names the file"
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        InfLLMConfig.from_yaml(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("1: 2\n", "1"),
        ("model:\n  type: inf-llm\n  3: 4\n", "model.3"),
        (REFERENCE + "infllm:\n  7: 8\n", "infllm.7"),
        (REFERENCE.replace("max_len: 2147483647", "max_len: lots"), "max_len"),
        (REFERENCE.replace("max_len: 2147483647", "max_len: 1.5"), "max_len"),
        (REFERENCE.replace("max_len: 2147483647", "max_len: [1]"), "max_len"),
    ],
    ids=["int_key", "int_key_in_model", "int_key_in_infllm", "max_len", "max_len_float",
         "max_len_list"],
)
def test_odd_yaml_values_raise_config_error(tmp_path: Path, text: str, field: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        InfLLMConfig.from_yaml(path)
    message = str(info.value)
    assert str(path) in message
    rest = message.replace(str(path), "")  # the path may itself contain the digit
    assert field in rest and ("key" in rest or "integer" in rest), rest


def test_integral_max_len_still_sets_max_context(tmp_path: Path) -> None:
    path = write(tmp_path, REFERENCE.replace("max_len: 2147483647", "max_len: 32000"))
    assert InfLLMConfig.from_yaml(path).max_context == 32000


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = InfLLMConfig.from_yaml(path)
    assert config.topk <= config.max_cached_block
    assert config.block_size <= config.n_local
    assert model_path_from_yaml(path)


def test_config_folder_is_not_empty() -> None:
    assert len(list(CONFIG_DIR.glob("*.yaml"))) >= 4


# --------------------------------------------------------- unsupported models
def _tiny_gpt2() -> Any:
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    )


def _tiny_phi() -> Any:
    return PhiForCausalLM(
        PhiConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )


@pytest.mark.parametrize(("build", "model_type"), [(_tiny_gpt2, "gpt2"), (_tiny_phi, "phi")])
def test_unsupported_architecture_is_refused(build: Any, model_type: str) -> None:
    model = build()
    before = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError) as info:
        InfLLMEngine(model, None, InfLLMConfig())
    message = str(info.value)
    assert repr(model_type) in message
    for supported in SUPPORTED_MODEL_TYPES:
        assert supported in message
    assert model.config._attn_implementation == before, "the model was modified"
    assert isinstance(info.value, ValueError)


def test_model_without_lm_head_layout_is_refused() -> None:
    config = LlamaConfig(**copy.deepcopy(COMMON))
    with pytest.raises(UnsupportedModelError, match="AutoModelForCausalLM"):
        InfLLMEngine(LlamaModel(config), None, InfLLMConfig())
