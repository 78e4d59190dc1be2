"""Session snapshots: safetensors for tensors, a JSON manifest for everything else.

A snapshot is a folder `{manifest.json, tensors.safetensors}` written next to its final
place and renamed into it, so a crash mid-write leaves the previous snapshot intact.
The manifest records the format version, the engine identity (model and config
fingerprints), the sha256 of the tensor file and a sha256 of the manifest's own content
(token ids, layer layout, and through the file hash every tensor byte); loading checks
all of them, then the layout against the tensors and the config, before it builds a
session, and only ever raises `SessionFileError`. The checksums catch corruption, not
forgery (anyone can recompute them); the structural checks still keep a well-checksummed
but malformed file from producing a session whose token ids disagree with its memory.
Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from langchain_infllm.engine.engine import InfLLMEngine
    from langchain_infllm.engine.session import Session

FORMAT_VERSION = 2  # 2: adds content_sha256
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
CONTENT_KEY = "content_sha256"


class SessionFileError(ValueError):
    """A snapshot cannot be loaded: missing, corrupt, newer, or made for another engine."""


def save_session(session: Session, path: Path) -> Path:
    """Write `session` to the folder `path` atomically."""
    engine = session.engine
    tensors: dict[str, torch.Tensor] = {}
    layers_meta = []
    for i, layer in enumerate(session.layers):
        p = f"layer{i}."
        tensors[p + "init_k"] = layer.init_k
        tensors[p + "init_v"] = layer.init_v
        tensors[p + "tail_k"] = layer.tail_k
        tensors[p + "tail_v"] = layer.tail_v
        tensors[p + "tail_score"] = layer.tail_score
        if layer.n_blocks:
            tensors[p + "block_k"] = torch.stack(layer.block_k)
            tensors[p + "block_v"] = torch.stack(layer.block_v)
            tensors[p + "block_scores"] = torch.stack(layer.block_scores)
            tensors[p + "reprs"] = layer.reprs
        layers_meta.append({"tail_start": layer.tail_start, "n_blocks": layer.n_blocks})
    if session.last_logits is not None:
        tensors["last_logits"] = session.last_logits
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(staging / TENSORS))
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "session_id": session.session_id,
            "engine": engine.identity(),
            "infllm_config": engine.config.model_dump(),
            "token_ids": session.token_ids,
            "layers": layers_meta,
            "tensors_sha256": _sha256(staging / TENSORS),
        }
        manifest[CONTENT_KEY] = content_sha256(manifest)
        (staging / MANIFEST).write_text(json.dumps(manifest))
        _replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _replace_dir(staging: Path, path: Path) -> None:
    if not path.exists():
        os.replace(staging, path)
        return
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(old, path)  # put the previous snapshot back where it was
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise SessionFileError(f"{path}: no {MANIFEST}; not a session snapshot") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SessionFileError(f"{path}/{MANIFEST} is corrupt: {exc}") from None
    except OSError as exc:  # a file where the folder should be, a folder as manifest...
        raise SessionFileError(f"{path}: cannot read {MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict):
        raise SessionFileError(f"{path}/{MANIFEST} is not a JSON object")
    return manifest


def content_sha256(manifest: dict[str, Any]) -> str:
    """sha256 of every manifest field but this checksum itself, as canonical JSON.

    It covers the token ids and layer layout, and the tensor bytes through
    `tensors_sha256` (the hash of the tensor file), so the tensors are hashed once.
    """
    body = {k: v for k, v in manifest.items() if k != CONTENT_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def load_session(engine: InfLLMEngine, path: Path, session_id: str | None) -> Session:
    """Rebuild a session from `path`; raises `SessionFileError` and leaves `engine` as it was."""

    manifest = read_manifest(path)
    version = manifest.get("format_version")
    if type(version) is not int:
        raise SessionFileError(f"{path}: format version {version!r} is not a valid version")
    if version > FORMAT_VERSION:
        raise SessionFileError(
            f"{path}: format version {version!r} is newer than this package reads "
            f"({FORMAT_VERSION}); upgrade langchain-infllm"
        )
    if version < FORMAT_VERSION:
        raise SessionFileError(
            f"{path}: format version {version} predates content checksums; this package "
            f"reads version {FORMAT_VERSION} (rebuild the session and save it again)"
        )
    theirs = manifest.get("engine")
    if not isinstance(theirs, dict):
        raise SessionFileError(
            f"{path}: corrupt manifest: `engine` must be a JSON object, "
            f"got {type(theirs).__name__}"
        )
    mine = engine.identity()
    diffs = [f"{k}: saved {theirs.get(k)!r}, engine {v!r}" for k, v in mine.items()
             if k != "model_name" and theirs.get(k) != v]
    if diffs:
        raise SessionFileError(f"{path}: made for another model or config ({'; '.join(diffs)})")
    tensor_file = path / TENSORS
    if not tensor_file.is_file():
        raise SessionFileError(f"{path}: {TENSORS} is missing")
    try:
        file_sha = _sha256(tensor_file)
    except OSError as exc:
        raise SessionFileError(f"{path}: cannot read {TENSORS}: {exc}") from None
    if file_sha != manifest.get("tensors_sha256"):
        raise SessionFileError(f"{path}: {TENSORS} does not match its checksum (corrupt)")
    try:
        expected = content_sha256(manifest)
    except (TypeError, ValueError) as exc:
        raise SessionFileError(f"{path}: corrupt manifest: {exc}") from None
    if manifest.get(CONTENT_KEY) != expected:
        raise SessionFileError(
            f"{path}/{MANIFEST} does not match its content checksum (corrupt or edited)"
        )
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SessionFileError(f"{path}: cannot read {TENSORS}: {exc}") from None
    try:
        return _rebuild(engine, manifest, tensors, session_id)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
        raise SessionFileError(f"{path}: inconsistent snapshot: {exc}") from None


def _int(value: Any, what: str, low: int = 0) -> int:
    if type(value) is not int or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def _tensor(
    tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    t = tensors[name]
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ValueError(
            f"tensor {name} is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}"
        )
    return t


def _rebuild(
    engine: InfLLMEngine,
    manifest: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    session_id: str | None,
) -> Session:
    """Build the session, checking every tensor and the layout against the engine."""
    from langchain_infllm.engine.session import Session

    raw_ids = manifest["token_ids"]
    if not isinstance(raw_ids, list):
        raise TypeError("token_ids must be a list")
    token_ids = [_int(t, "token id") for t in raw_ids]
    bad = [t for t in token_ids if t >= engine.vocab_size]
    if bad:
        raise ValueError(f"token ids out of the vocabulary [0, {engine.vocab_size}): {bad[:5]}")
    saved_id = manifest.get("session_id")
    if saved_id is not None and not isinstance(saved_id, str):
        raise TypeError(f"session_id must be a string, got {saved_id!r}")
    layers_meta = manifest["layers"]
    if not isinstance(layers_meta, list):
        raise TypeError("layers must be a list")
    if len(layers_meta) != engine.num_layers:
        raise ValueError(f"{len(layers_meta)} layers saved, engine has {engine.num_layers}")
    cfg = engine.config
    n = len(token_ids)
    out_of_window = max(0, n - cfg.n_local + 1)
    sinks = min(cfg.n_init, out_of_window)
    blocks = (out_of_window - cfg.n_init) // cfg.block_size if out_of_window >= cfg.n_init else 0
    tail_start = sinks + blocks * cfg.block_size
    kvh, heads, d = engine.shape.kv_heads, engine.shape.heads, engine.shape.head_dim
    bs, dtype, f32 = cfg.block_size, engine.dtype, torch.float32
    expected_names = {"last_logits"} if "last_logits" in tensors else set()
    session = Session(engine, session_id or saved_id)
    dev = engine.device
    for i, (layer, meta) in enumerate(zip(session.layers, layers_meta, strict=True)):
        if not isinstance(meta, dict):
            raise TypeError(f"layer {i}: metadata must be an object")
        layout = (_int(meta["tail_start"], "tail_start"), _int(meta["n_blocks"], "n_blocks"))
        if layout != (tail_start, blocks):
            raise ValueError(
                f"layer {i}: (tail_start, n_blocks) is {layout}; {n} tokens with this "
                f"config give {(tail_start, blocks)}"
            )
        p = f"layer{i}."
        tail = n - tail_start
        layer.init_k = _tensor(tensors, p + "init_k", (kvh, sinks, d), dtype).to(dev)
        layer.init_v = _tensor(tensors, p + "init_v", (kvh, sinks, d), dtype).to(dev)
        layer.append_tail(
            _tensor(tensors, p + "tail_k", (kvh, tail, d), dtype).to(dev),
            _tensor(tensors, p + "tail_v", (kvh, tail, d), dtype).to(dev),
        )
        layer.add_tail_scores(0, _tensor(tensors, p + "tail_score", (heads, tail), f32).to(dev))
        layer.tail_start = tail_start
        expected_names |= {p + k for k in ("init_k", "init_v", "tail_k", "tail_v", "tail_score")}
        if blocks:
            block_k = _tensor(tensors, p + "block_k", (blocks, kvh, bs, d), dtype)
            block_v = _tensor(tensors, p + "block_v", (blocks, kvh, bs, d), dtype)
            scores = _tensor(tensors, p + "block_scores", (blocks, heads, bs), f32)
            reprs = _tensor(tensors, p + "reprs", (blocks, heads, d), dtype)
            expected_names |= {p + k for k in ("block_k", "block_v", "block_scores", "reprs")}
        for b in range(blocks):
            layer.add_sealed_block(
                engine.next_uid(),
                layer._to_host(block_k[b]),
                layer._to_host(block_v[b]),
                scores[b].clone(),
                reprs[b],
            )
        if layer.length != n or layer.n_blocks != blocks:
            raise ValueError(f"layer {i} holds {layer.length} tokens, manifest {n}")
    unknown = set(tensors) - expected_names
    if unknown:
        raise ValueError(f"unexpected tensors {sorted(unknown)[:5]}")
    session._tokens = token_ids
    if "last_logits" in tensors:
        logits = tensors["last_logits"]
        if logits.dim() != 1 or logits.dtype != f32 or not n:
            raise ValueError(f"last_logits is {tuple(logits.shape)} {logits.dtype}")
        session.last_logits = logits.to(dev)
    return session


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
