"""Session snapshots: safetensors for tensors, a JSON manifest for everything else.

A snapshot is a folder `{manifest.json, tensors.safetensors}` written next to its final
place and renamed into it, so after a crash at any instant the path loads the previous
snapshot or the new one (the scheme and its recovery rule are described at `_publish`).
Saving never deletes what this package did not write: a file, or a folder holding
anything but a snapshot, at the path is refused.
The manifest records the format version, the engine identity (model and config
fingerprints), the sha256 of the tensor file and a sha256 of the manifest's own content
(token ids, layer layout, and through the file hash every tensor byte); loading checks
all of them, then the layout against the tensors and the config, before it builds a
session, and only ever raises `SessionFileError`. The checksums catch corruption, not
forgery (anyone can recompute them); the structural checks still keep a well-checksummed
but malformed file from producing a session whose token ids disagree with its memory.
A snapshot is untrusted input: only regular files are opened (a FIFO, socket or device
is refused without blocking), the manifest is refused above a size bound derived from
the tensor file, and every tensor's values are checked (finite; attention mass >= 0;
last logits one row of the model's vocabulary) before anything is built.
Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from langchain_infllm.engine.ids import check_session_id

if TYPE_CHECKING:
    from langchain_infllm.engine.engine import InfLLMEngine
    from langchain_infllm.engine.session import Session

FORMAT_VERSION = 2  # 2: adds content_sha256
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
CONTENT_KEY = "content_sha256"

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
_LOCAL_LOCK = threading.Lock()
logger = logging.getLogger(__name__)


class SessionFileError(ValueError):
    """A snapshot cannot be loaded: missing, corrupt, newer, or made for another engine."""


def save_session(
    session: Session, path: Path, *, on_step: Callable[[str], None] | None = None
) -> Path:
    """Write `session` to the folder `path` atomically (see `_publish` for the scheme).

    `path` may be absent, an empty folder or a snapshot this package wrote; anything else
    (a file, a folder with other content) raises `FileExistsError` and is left alone.
    `on_step` is called with a step name before every file-system change; the
    crash-at-every-step tests kill the process there.
    """
    step = on_step or _no_step
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
    with _path_lock(path):
        _recover(path, step)
        kind = _target_kind(path)
        staging = _sibling(path, STAGING_SUFFIX)
        step("mkdir staging")
        staging.mkdir()
        try:
            step("write tensors")
            save_file(tensors, str(staging / TENSORS))
            _fsync(staging / TENSORS)
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
            step("write manifest")
            (staging / MANIFEST).write_text(json.dumps(manifest))
            _fsync(staging / MANIFEST)
            _fsync(staging)
            _publish(staging, path, kind, step)
        except BaseException:
            _remove_ours(staging)
            raise
    return path


# ------------------------------------------------------------------ atomic replacement
#
# Saves to one path are serialised by a lock file next to it; under the lock the new
# snapshot is written to `.NAME.new` and published with renames:
#
#   path absent or an empty folder:  rename(.NAME.new -> NAME)             (atomic)
#   path holds a snapshot:           rename(NAME -> .NAME.old)
#                                    rename(.NAME.new -> NAME)
#                                    remove .NAME.old
#
# The recovery rule: `.NAME.old` only ever holds the previous snapshot, so when NAME is
# missing, `.NAME.old` *is* the snapshot (`committed_path`, used by load; the next save
# renames it back). When NAME exists, `.NAME.old` and `.NAME.new` are debris of a crashed
# save, removed by the next one. Whatever instant a crash hits, the path therefore loads
# the old snapshot or the new one. Only the two file names a snapshot consists of are
# ever deleted, so a folder with anything else in it is never emptied.

SNAPSHOT_FILES = frozenset({MANIFEST, TENSORS})
STAGING_SUFFIX = "new"
BACKUP_SUFFIX = "old"
LOCK_SUFFIX = "lock"
_MANIFEST_HEAD = re.compile(rb'\A\s*\{\s*"format_version"\s*:\s*\d')


def _no_step(_: str) -> None:
    return None


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{suffix}")


def committed_path(path: Path) -> Path:
    """The folder that holds the snapshot saved at `path`: `path` itself, or its backup
    when a save crashed between its two renames (see the scheme above)."""
    if not os.path.lexists(path):
        backup = _sibling(path, BACKUP_SUFFIX)
        if backup.is_dir() and not backup.is_symlink():
            return backup
    return path


@contextlib.contextmanager
def _path_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on saving to `path`, across threads and processes (flock on
    `.NAME.lock`, removed on release; a lock file replaced meanwhile is locked again)."""
    if fcntl is None:  # no flock (Windows): serialise within this process only
        with _LOCAL_LOCK:
            yield
        return
    lock = _sibling(path, LOCK_SUFFIX)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder removed this lock file; lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _is_snapshot_dir(path: Path) -> bool:
    """A folder holding only snapshot files, with a manifest this package wrote."""
    try:
        names = set(os.listdir(path))
        manifest = path / MANIFEST
        if not names or not names <= SNAPSHOT_FILES or MANIFEST not in names:
            return False
        if not stat.S_ISREG(os.lstat(manifest).st_mode):
            return False
        with open(manifest, "rb") as fh:
            return _MANIFEST_HEAD.match(fh.read(4096)) is not None
    except OSError:
        return False


def _target_kind(path: Path) -> str:
    """'absent', 'empty' or 'snapshot'; anything else at `path` raises FileExistsError."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "absent"
    if not stat.S_ISDIR(mode):
        raise FileExistsError(
            f"{path} exists and is not a folder; a session snapshot is a folder, so it "
            "was not saved there (nothing was changed)"
        )
    if not os.listdir(path):
        return "empty"
    if not _is_snapshot_dir(path):
        raise FileExistsError(
            f"{path} is a folder that is not a session snapshot (it holds files this "
            "package did not write); refusing to replace it (nothing was changed)"
        )
    return "snapshot"


def _remove_ours(folder: Path, step: Callable[[str], None] = _no_step) -> bool:
    """Delete the snapshot files in `folder`, then the folder if that emptied it; True
    when it is gone. Files of any other name are kept (and so is the folder)."""
    for name in sorted(SNAPSHOT_FILES):
        target = folder / name
        if os.path.lexists(target):
            step(f"remove {folder.name}/{name}")
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                target.unlink()
    try:
        step(f"remove {folder.name}")
        folder.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _recover(path: Path, step: Callable[[str], None]) -> None:
    """Finish what a crashed save left (called under the path lock)."""
    backup = _sibling(path, BACKUP_SUFFIX)
    if os.path.isdir(backup) and not os.path.islink(backup):
        if not os.path.lexists(path):
            step("restore backup")
            os.rename(backup, path)  # crashed between the renames: the old one is back
        elif not _remove_ours(backup, step):
            raise FileExistsError(
                f"{backup} (left by an interrupted save) holds files this package did not "
                "write; move it away and save again"
            )
    staging = _sibling(path, STAGING_SUFFIX)
    if os.path.isdir(staging) and not os.path.islink(staging) and not _remove_ours(staging, step):
        raise FileExistsError(
            f"{staging} (left by an interrupted save) holds files this package did not "
            "write; move it away and save again"
        )


def _publish(staging: Path, path: Path, kind: str, step: Callable[[str], None]) -> None:
    """Move the complete snapshot `staging` to `path` (see the scheme above)."""
    if kind in ("absent", "empty"):
        step("rename staging")
        os.rename(staging, path)  # fails, changing nothing, if something appeared there
        _fsync(path.parent)
        return
    backup = _sibling(path, BACKUP_SUFFIX)
    step("rename old")
    os.rename(path, backup)
    try:
        step("rename staging")
        os.rename(staging, path)
    except BaseException:
        os.rename(backup, path)  # put the previous snapshot back where it was
        raise
    _fsync(path.parent)
    if not _remove_ours(backup, step):
        logger.warning("kept %s: files were added to the snapshot while it was saved", backup)


def _fsync(target: Path) -> None:
    """Flush a file or folder to disk, so a power loss cannot undo a rename's order."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if target.is_dir() else os.O_RDONLY
    try:
        fd = os.open(target, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync folders
    finally:
        os.close(fd)


# Bounds on what a snapshot may make this process read. Each token's K and V sit in the
# tensor file (every layer, every KV head), so its size bounds the token count, and the
# manifest may hold at most MANIFEST_BASE_BYTES plus MANIFEST_BYTES_PER_TOKEN per token.
MANIFEST_BASE_BYTES = 4 << 20
MANIFEST_BYTES_PER_TOKEN = 16


def _file_kind(mode: int) -> str:
    """A reader's word for what is at a path that is not a regular file."""
    for test, word in (
        (stat.S_ISDIR, "folder"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return word
    return "special file"


def _regular_size(folder: Path, name: str) -> int | None:
    """Size of the regular file `folder/name` (a symlink is followed), None if absent.

    A FIFO, socket, device or folder raises at once: opening or reading one could block
    forever or never end.
    """
    try:
        mode_size = os.stat(folder / name)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a file where the folder should be, a symlink loop...
        raise SessionFileError(f"{folder}: cannot read {name}: {exc}") from None
    if not stat.S_ISREG(mode_size.st_mode):
        raise SessionFileError(
            f"{folder}: cannot read {name}: it is a {_file_kind(mode_size.st_mode)}, "
            "not a regular file"
        )
    return mode_size.st_size


def _open_regular(file: Path) -> int:
    """Open `file` for reading without ever blocking; refuse anything but a regular file.

    O_NONBLOCK makes opening a FIFO swapped in after the `stat` return at once, and the
    `fstat` of the open descriptor is what is trusted.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(file, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SessionFileError(
                f"{file.parent}: cannot read {file.name}: it is a {_file_kind(mode)}, "
                "not a regular file"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def manifest_cap(engine: InfLLMEngine, tensor_bytes: int) -> int:
    """Largest manifest accepted next to a tensor file of `tensor_bytes` for `engine`."""
    itemsize = torch.empty((), dtype=engine.dtype).element_size()
    per_token = max(1, 2 * engine.num_layers * engine.shape.kv_heads * engine.shape.head_dim
                    * itemsize)
    return MANIFEST_BASE_BYTES + MANIFEST_BYTES_PER_TOKEN * (tensor_bytes // per_token + 1)


def read_manifest(path: Path, max_bytes: int | None = None) -> dict[str, Any]:
    """The manifest of the snapshot folder `path`, read only if it is a regular file of at
    most `max_bytes` (default: MANIFEST_BASE_BYTES plus 16 bytes per byte of tensors,
    a bound for callers without an engine), so a hostile file cannot block or exhaust
    memory."""
    size = _regular_size(path, MANIFEST)
    if size is None:
        raise SessionFileError(f"{path}: no {MANIFEST}; not a session snapshot")
    if max_bytes is None:
        tensor_bytes = _regular_size(path, TENSORS) or 0
        max_bytes = MANIFEST_BASE_BYTES + MANIFEST_BYTES_PER_TOKEN * tensor_bytes

    def too_large(got: str) -> SessionFileError:
        return SessionFileError(
            f"{path}/{MANIFEST} is too large ({got} bytes; at most {max_bytes} for this "
            "snapshot); refusing to read it"
        )

    if size > max_bytes:
        raise too_large(str(size))
    try:
        fd = _open_regular(path / MANIFEST)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(max_bytes + 1)  # a size that changed meanwhile is still bounded
        if len(data) > max_bytes:
            raise too_large(f"over {max_bytes}")
        manifest = json.loads(data.decode("utf-8"))
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


def load_session(
    engine: InfLLMEngine,
    path: Path,
    session_id: str | None,
    make_session: Callable[[InfLLMEngine, str | None], Session],
) -> Session:
    """Rebuild a session from `path`; raises `SessionFileError` and leaves `engine` as it was
    (a `session_id` that is not a non-empty string is a TypeError/ValueError, first).

    `make_session` builds the empty session to fill (the `Session` class, passed in so
    that this module depends on no session code: session -> persistence, one way)."""
    if session_id is not None:
        check_session_id(session_id)
    path = committed_path(path)
    try:  # the manifest is checked first; what is wrong with the tensors comes after
        tensor_bytes = _regular_size(path, TENSORS) or 0
    except SessionFileError:
        tensor_bytes = 0
    manifest = read_manifest(path, manifest_cap(engine, tensor_bytes))
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
    if _regular_size(path, TENSORS) is None:
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
        _check_values(engine, tensors)
        return _rebuild(engine, manifest, tensors, session_id, make_session)
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


SCORE_TENSORS = ("tail_score", "block_scores")


def _check_values(engine: InfLLMEngine, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse values the model could never have produced, before anything is built.

    NaN or inf in K/V, representatives or logits would poison every later token of the
    session (and retrieval scores); attention mass is a sum of probabilities, so >= 0.
    """
    for name, t in tensors.items():
        if t.is_floating_point() and not _all_finite(t):
            raise ValueError(f"tensor {name} holds NaN or infinite values")
        is_score = name.rsplit(".", 1)[-1] in SCORE_TENSORS and t.is_floating_point()
        if is_score and bool((t < 0).any()):
            raise ValueError(f"tensor {name} holds negative attention mass")
    logits = tensors.get("last_logits")
    if logits is not None:
        width = _logits_width(engine)
        if tuple(logits.shape) != (width,):
            raise ValueError(
                f"last_logits is {tuple(logits.shape)}; the model's vocabulary has {width} "
                "logits"
            )


def _all_finite(t: torch.Tensor, step: int = 1 << 24) -> bool:
    """`isfinite(t).all()` in slices, so a large tensor needs no mask of its own size."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[a : a + step]).all()) for a in range(0, flat.numel(), step))


def _logits_width(engine: InfLLMEngine) -> int:
    """Number of logits the model produces per position (its output embedding rows)."""
    get_out = getattr(engine.model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    weight = getattr(out, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return engine.vocab_size


def _rebuild(
    engine: InfLLMEngine,
    manifest: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    session_id: str | None,
    make_session: Callable[[InfLLMEngine, str | None], Session],
) -> Session:
    """Build the session, checking every tensor and the layout against the engine."""
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
    session = make_session(engine, session_id or saved_id)
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
    with os.fdopen(_open_regular(path), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
