"""Session snapshots: safetensors for tensors, a JSON manifest for everything else.

A snapshot is a folder `{manifest.json, tensors.safetensors}` written next to its final
place and renamed into it, so a crash mid-write leaves the previous snapshot intact.
The manifest records the format version, the engine identity (model and config
fingerprints) and the sha256 of the tensor file; loading checks all three before it
touches the engine. Nothing is pickled.
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

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"


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
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise SessionFileError(f"{path}: no {MANIFEST}; not a session snapshot") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SessionFileError(f"{path}/{MANIFEST} is corrupt: {exc}") from None
    if not isinstance(manifest, dict):
        raise SessionFileError(f"{path}/{MANIFEST} is not a JSON object")
    return manifest


def load_session(engine: InfLLMEngine, path: Path, session_id: str | None) -> Session:
    """Rebuild a session from `path`; raises `SessionFileError` and leaves `engine` as it was."""

    manifest = read_manifest(path)
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SessionFileError(
            f"{path}: format version {version!r} is newer than this package reads "
            f"({FORMAT_VERSION}); upgrade langchain-infllm"
        )
    mine, theirs = engine.identity(), manifest.get("engine", {})
    diffs = [f"{k}: saved {theirs.get(k)!r}, engine {v!r}" for k, v in mine.items()
             if k != "model_name" and theirs.get(k) != v]
    if diffs:
        raise SessionFileError(f"{path}: made for another model or config ({'; '.join(diffs)})")
    tensor_file = path / TENSORS
    if not tensor_file.exists():
        raise SessionFileError(f"{path}: {TENSORS} is missing")
    if _sha256(tensor_file) != manifest.get("tensors_sha256"):
        raise SessionFileError(f"{path}: {TENSORS} does not match its checksum (corrupt)")
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SessionFileError(f"{path}: cannot read {TENSORS}: {exc}") from None
    try:
        return _rebuild(engine, manifest, tensors, session_id)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise SessionFileError(f"{path}: inconsistent snapshot: {exc}") from None


def _rebuild(
    engine: InfLLMEngine,
    manifest: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    session_id: str | None,
) -> Session:
    from langchain_infllm.engine.session import Session

    token_ids = [int(t) for t in manifest["token_ids"]]
    session = Session(engine, session_id or manifest.get("session_id"))
    layers_meta = manifest["layers"]
    if len(layers_meta) != engine.num_layers:
        raise ValueError(f"{len(layers_meta)} layers saved, engine has {engine.num_layers}")
    dev = engine.device
    for i, (layer, meta) in enumerate(zip(session.layers, layers_meta, strict=True)):
        p = f"layer{i}."
        layer.init_k = tensors[p + "init_k"].to(dev)
        layer.init_v = tensors[p + "init_v"].to(dev)
        tail_k = tensors[p + "tail_k"]
        layer.append_tail(tail_k.to(dev), tensors[p + "tail_v"].to(dev))
        layer.add_tail_scores(0, tensors[p + "tail_score"].to(dev))
        layer.tail_start = int(meta["tail_start"])
        for b in range(int(meta["n_blocks"])):
            layer.block_uids.append(engine.next_uid())
            layer.block_k.append(layer._to_host(tensors[p + "block_k"][b]))
            layer.block_v.append(layer._to_host(tensors[p + "block_v"][b]))
            layer.block_scores.append(tensors[p + "block_scores"][b].clone())
            layer._append_repr(tensors[p + "reprs"][b].to(layer.repr_device))
        if layer.length != len(token_ids):
            raise ValueError(f"layer {i} holds {layer.length} tokens, manifest {len(token_ids)}")
    session._tokens = token_ids
    if "last_logits" in tensors:
        session.last_logits = tensors["last_logits"].to(dev)
    return session


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
