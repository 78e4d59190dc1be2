"""Loaders for LongBench and InfiniteBench JSONL files that are already on local disk.

Nothing is downloaded. Point the loader at the directory holding the files.

LongBench (``<data_dir>/<dataset>.jsonl``, one JSON object per line)::

    {"input": str, "context": str, "answers": [str, ...], "length": int,
     "dataset": str, "language": str, "all_classes": [str, ...] | null, "_id": str}

  Required: ``input``, ``context``, ``answers``. Datasets with a metric:
  narrativeqa, qasper, multifieldqa_en, hotpotqa, 2wikimqa, musique, gov_report, qmsum,
  multi_news, trec, triviaqa, samsum, passage_count, passage_retrieval_en, lcc, repobench-p
  (LongBench-E files such as ``hotpotqa_e.jsonl`` load too). ``length`` is LongBench's word
  count, kept as ``meta["length"]``.

InfiniteBench (``<data_dir>/<task>.jsonl``)::

    {"id": int, "context": str, "input": str, "answer": str | int | [str, ...],
     "options": [str, ...]}

  Required: ``context``, ``input``, ``answer``. Typical files: passkey.jsonl,
  number_string.jsonl, kv_retrieval.jsonl, longbook_qa_eng.jsonl, longbook_sum_eng.jsonl,
  longbook_choice_eng.jsonl, longdialogue_qa_eng.jsonl, math_find.jsonl, code_debug.jsonl
  (also longbook_qa_chn, math_calc, code_run, which have no metric here).

Both loaders return an iterator of :class:`~benchmarks.tasks.synthetic.Sample` with
``task`` = dataset/task name, ``depth = -1.0`` (unknown), ``length_tokens_target`` =
``count_tokens(context)`` if a counter is given else 0, and ``meta["suite"]`` set to
``"longbench"`` / ``"infinitebench"``. A missing file raises :class:`FileNotFoundError`
immediately (listing the ``.jsonl`` files that are present); a malformed line raises
:class:`DatasetFormatError` naming the file and 1-based line number when it is reached.
Blank lines are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .synthetic import Sample

__all__ = [
    "INFINITEBENCH_TASKS",
    "LONGBENCH_DATASETS",
    "DatasetFormatError",
    "load_infinitebench",
    "load_longbench",
    "read_jsonl",
]

LONGBENCH_DATASETS: tuple[str, ...] = (
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
    "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum", "passage_count",
    "passage_retrieval_en", "lcc", "repobench-p",
)  # fmt: skip

INFINITEBENCH_TASKS: tuple[str, ...] = (
    "passkey", "number_string", "kv_retrieval", "longbook_qa_eng", "longbook_sum_eng",
    "longbook_choice_eng", "longbook_qa_chn", "longdialogue_qa_eng", "math_find", "math_calc",
    "code_run", "code_debug",
)  # fmt: skip


class DatasetFormatError(ValueError):
    """A JSONL line is not valid JSON or lacks a required field (message has path:line)."""

    def __init__(self, path: Path, line_no: int, reason: str) -> None:
        super().__init__(f"{path}:{line_no}: {reason}")
        self.path = path
        self.line_no = line_no
        self.reason = reason


def _resolve(data_dir: str | Path, name: str, suite: str) -> Path:
    directory = Path(data_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"{suite} data directory not found: {directory}")
    path = directory / f"{name}.jsonl"
    if not path.is_file():
        present = sorted(p.name for p in directory.glob("*.jsonl"))
        shown = ", ".join(present) if present else "none"
        raise FileNotFoundError(
            f"{suite} file not found: {path} (expected '{name}.jsonl' in {directory}; "
            f".jsonl files present: {shown})"
        )
    return path


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_no, object)`` for each non-blank line; malformed lines raise."""
    p = Path(path)
    with p.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(p, line_no, f"invalid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DatasetFormatError(
                    p, line_no, f"expected a JSON object, got {type(obj).__name__}"
                )
            yield line_no, obj


def _require_str(obj: dict[str, Any], key: str, path: Path, line_no: int) -> str:
    if key not in obj:
        raise DatasetFormatError(path, line_no, f"missing required field {key!r}")
    value = obj[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetFormatError(
            path, line_no, f"field {key!r} must be a string, got {type(value).__name__}"
        )
    return value


def _answer_list(value: Any, key: str, path: Path, line_no: int) -> list[str]:
    if isinstance(value, bool) or value is None:
        raise DatasetFormatError(path, line_no, f"field {key!r} must be a string or list")
    if isinstance(value, str | int | float):
        return [str(value)]
    if isinstance(value, list) and all(
        isinstance(v, str | int | float) and not isinstance(v, bool) for v in value
    ):
        return [str(v) for v in value]
    raise DatasetFormatError(path, line_no, f"field {key!r} must be a string or a list of strings")


def _limited(it: Iterator[Sample], limit: int | None) -> Iterator[Sample]:
    for i, sample in enumerate(it):
        if limit is not None and i >= limit:
            return
        yield sample


def load_longbench(
    data_dir: str | Path,
    dataset: str,
    *,
    count_tokens: Callable[[str], int] | None = None,
    limit: int | None = None,
) -> Iterator[Sample]:
    """Iterate the samples of ``<data_dir>/<dataset>.jsonl`` (LongBench format)."""
    path = _resolve(data_dir, dataset, "LongBench")

    def gen() -> Iterator[Sample]:
        for line_no, obj in read_jsonl(path):
            context = _require_str(obj, "context", path, line_no)
            question = _require_str(obj, "input", path, line_no)
            if "answers" not in obj:
                raise DatasetFormatError(path, line_no, "missing required field 'answers'")
            answers = _answer_list(obj["answers"], "answers", path, line_no)
            all_classes = obj.get("all_classes")
            if all_classes is not None and not (
                isinstance(all_classes, list) and all(isinstance(c, str) for c in all_classes)
            ):
                raise DatasetFormatError(
                    path, line_no, "field 'all_classes' must be null or a list of strings"
                )
            meta: dict[str, Any] = {
                "suite": "longbench",
                "id": obj.get("_id"),
                "all_classes": all_classes,
                "length": obj.get("length"),
                "language": obj.get("language"),
                "dataset": obj.get("dataset", dataset),
                "source": str(path),
                "line": line_no,
            }
            tokens = count_tokens(context) if count_tokens else 0
            yield Sample(dataset, context, question, answers, tokens, -1.0, meta)

    return _limited(gen(), limit)


def load_infinitebench(
    data_dir: str | Path,
    task: str,
    *,
    count_tokens: Callable[[str], int] | None = None,
    limit: int | None = None,
) -> Iterator[Sample]:
    """Iterate the samples of ``<data_dir>/<task>.jsonl`` (InfiniteBench format)."""
    path = _resolve(data_dir, task, "InfiniteBench")

    def gen() -> Iterator[Sample]:
        for line_no, obj in read_jsonl(path):
            context = _require_str(obj, "context", path, line_no)
            question = _require_str(obj, "input", path, line_no)
            if "answer" not in obj:
                raise DatasetFormatError(path, line_no, "missing required field 'answer'")
            answers = _answer_list(obj["answer"], "answer", path, line_no)
            options = obj.get("options") or []
            if not isinstance(options, list):
                raise DatasetFormatError(path, line_no, "field 'options' must be a list")
            meta: dict[str, Any] = {
                "suite": "infinitebench",
                "id": obj.get("id"),
                "options": [str(o) for o in options],
                "source": str(path),
                "line": line_no,
            }
            tokens = count_tokens(context) if count_tokens else 0
            yield Sample(task, context, question, answers, tokens, -1.0, meta)

    return _limited(gen(), limit)
