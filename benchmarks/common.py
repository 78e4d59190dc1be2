"""Shared benchmark plumbing: machine description, peak memory, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Where and when a benchmark ran (recorded next to every result)."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:  # which engine code ran (a dirty tree means uncommitted edits were present)
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "langchain_infllm"], capture_output=True, text=True,
                               check=False).stdout.strip()
        if commit:
            info["git_commit"] = commit + (" (engine files modified)" if dirty else "")
    except OSError:  # pragma: no cover
        pass
    if hasattr(os, "getloadavg"):  # other jobs share this machine: record how busy it was
        info["load_average_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        model_name = subprocess.run(
            ["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()
        if model_name:
            info["cpu"] = model_name
    except OSError:  # pragma: no cover
        pass
    return info


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_isolated(module: str, args: list[str]) -> dict[str, Any]:
    """Run `python -m module args` in a fresh process (so peak RSS is its own); parse JSON."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {args} failed:\n{proc.stderr[-3000:]}")
    last = proc.stdout.strip().splitlines()[-1]
    result: dict[str, Any] = json.loads(last)
    return result


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


# --------------------------------------------------------------------------- shared helpers
# (used by long_context.py, agent_steps.py and offload_memory.py)


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (on a shared 2-core box 1 thread avoids oversubscription)."""
    if threads:
        torch.set_num_threads(threads)


def current_rss_bytes() -> int:
    """Resident memory of this process right now (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover
        return peak_rss_bytes()


def tensor_bytes(tensors: Any) -> int:
    """Bytes held by a (nested) collection of tensors."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, list | tuple):
        return sum(tensor_bytes(t) for t in tensors)
    return 0


def dynamic_cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values a transformers `DynamicCache` holds."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            value = getattr(layer, name, None)
            if isinstance(value, torch.Tensor):
                total += tensor_bytes(value)
    return total


def full_kv_bytes_per_token(model_config: Any, dtype: torch.dtype) -> int:
    """K+V bytes per token over all layers for a full (dense) KV cache."""
    heads = int(model_config.num_attention_heads)
    kv_heads = int(getattr(model_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(model_config, "head_dim", None) or model_config.hidden_size // heads)
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * int(model_config.num_hidden_layers) * kv_heads * head_dim * element


def native_window(model: Any) -> int:
    """The model's trained context length (`max_position_embeddings`)."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class VanillaRunner:
    """The unmodified model with a reused `DynamicCache`: the prefix-cache baseline.

    `sync(ids)` keeps the longest common prefix of the cache (cropping the rest) and
    computes only the new tokens, in chunks; `generate` decodes greedily, appending each
    token to the cache. `reuse=False` makes every `sync` start from scratch (recompute
    the whole prompt, as a stateless chat wrapper does).
    """

    def __init__(self, model: Any, *, chunk: int = 4096, reuse: bool = True) -> None:
        from transformers import DynamicCache

        self._cache_cls = DynamicCache
        self.model = model
        self.chunk = chunk
        self.reuse = reuse
        self.tokens: list[int] = []
        self.cache: Any = DynamicCache()
        self.last_logits: torch.Tensor | None = None
        self.computed = 0  # tokens that went through the model, cumulative

    def reset(self) -> None:
        self.tokens = []
        self.cache = self._cache_cls()
        self.last_logits = None

    def sync(self, ids: list[int]) -> int:
        """Make the cache hold exactly `ids`; returns the tokens computed."""
        if not ids:
            raise ValueError("cannot sync to an empty prompt")
        common = common_prefix(self.tokens, ids) if self.reuse else 0
        if common == len(ids) == len(self.tokens) and self.last_logits is not None:
            return 0  # already holds exactly this prompt
        if common == len(ids):
            common -= 1  # recompute the last token for its logits
        if common == 0:
            self.reset()
        elif common < len(self.tokens):
            self.cache.crop(common - len(self.tokens))  # negative: tokens to remove
            del self.tokens[common:]
        return self.append(ids[common:])

    def append(self, ids: list[int]) -> int:
        with torch.no_grad():
            for a in range(0, len(ids), self.chunk):
                piece = ids[a : a + self.chunk]
                out = self.model(
                    input_ids=torch.tensor([piece], device=self.model.device),
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                self.tokens.extend(piece)
                self.last_logits = out.logits[0, -1].float()
        self.computed += len(ids)
        return len(ids)

    def generate(self, max_new_tokens: int, stop: Any = None) -> list[int]:
        """Greedy decoding; `stop(tokens_so_far) -> bool` ends early."""
        produced: list[int] = []
        for _ in range(max_new_tokens):
            assert self.last_logits is not None
            token = int(torch.argmax(self.last_logits))
            self.append([token])
            produced.append(token)
            if stop is not None and stop(produced):
                break
        return produced

    def state_bytes(self) -> int:
        return dynamic_cache_bytes(self.cache)


def engine_generate(session: Any, max_new_tokens: int, stop: Any = None) -> list[int]:
    """Greedy decoding on an engine session with the same stop rule as `VanillaRunner`."""
    produced: list[int] = []
    iterator = session.generate(max_new_tokens, temperature=0.0)
    for token in iterator:
        produced.append(int(token))
        if stop is not None and stop(produced):
            iterator.close()
            break
    return produced


def write_csv(name: str, rows: list[dict[str, Any]]) -> Path:
    """Write rows (union of keys, in first-seen order) as `results/<name>.csv`."""
    import csv

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.csv"
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})
    return path


def load_models(model_name: str, copies: int = 2) -> tuple[list[Any], Any]:
    """`copies` independent copies of an embedded/hub model (the engine takes one over)."""
    from langchain_infllm.models.embedded import load_model_and_tokenizer

    models = []
    tokenizer = None
    for _ in range(copies):
        model, tokenizer = load_model_and_tokenizer(model_name, device="cpu")
        models.append(model)
    return models, tokenizer


class HFCodec:
    """Text <-> ids through a Hugging Face tokenizer (no special tokens added or kept)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids: set[int] = {int(eos)} if eos is not None else set()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


class CharCodec:
    """A toy character codec for tiny random models (tests): one id per character."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eos_ids: set[int] = set()

    def encode(self, text: str) -> list[int]:
        return [1 + ord(c) % (self.vocab_size - 1) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(31 + i) for i in ids)


def engine_config(config: Any, **changes: Any) -> Any:
    """A copy of an `InfLLMConfig` with some fields changed (validated)."""
    from langchain_infllm import InfLLMConfig

    return InfLLMConfig.create(**{**config.model_dump(), **changes})
