"""Scoring functions for InfiniteBench, RULER and LongBench style evaluation.

All per-sample scores are floats in ``[0, 1]``; report ``mean_percent(scores)`` (mean x 100,
two decimals) to match how the papers print tables.

InfiniteBench retrieval (as described in the InfiniteBench evaluation):
    * ``passkey_score`` / ``number_string_score``: the first run of digits in the prediction
      must equal the answer exactly (so ``"The 5-digit key is 12345"`` scores 0: the first
      integer is ``5``).
    * ``kv_retrieval_score``: after replacing newlines and the punctuation ``: " ' . , ? ! { }``
      with spaces, the answer must be one of the whitespace-separated words.
RULER:
    * ``string_match_all``: fraction of references found (case-insensitive substring).
    * ``string_match_part``: 1 if any reference is found.
LongBench (English metrics):
    * ``qa_f1_score``: token F1 after lower-casing and removing punctuation and articles.
    * ``rouge_l``: ROUGE-L F1 from the longest common subsequence of word tokens (lower-cased
      ``\\w+`` tokens; no stemming). Scores can differ slightly from the ``rouge`` package.
    * ``classification_score``: class names found in the prediction, ignoring those that are
      strict substrings of the ground truth; ``1/len(found)`` when the ground truth is found.
    * ``retrieval_score``: share of the numbers in the prediction equal to the paragraph id of
      ``"Paragraph N"`` in the ground truth.
    * ``count_score``: share of the numbers in the prediction equal to the ground truth.
    * ``code_sim_score``: first prediction line without ````` ``, ``#`` or ``//``, compared with
      ``difflib.SequenceMatcher(autojunk=False).ratio()``. This is a stand-in for the fuzzy
      ratio used by LongBench (Levenshtein based); values are close but not identical.
    For ``trec``, ``triviaqa``, ``samsum`` and ``lsht`` only the first non-empty line of the
    prediction is scored, and each sample's score is the max over its reference answers.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

__all__ = [
    "INFINITEBENCH_METRICS",
    "LONGBENCH_DATASET_METRICS",
    "LONGBENCH_METRIC_NAMES",
    "SYNTHETIC_METRICS",
    "choice_score",
    "classification_score",
    "code_sim_score",
    "count_score",
    "first_int",
    "infinitebench_score",
    "kv_retrieval_score",
    "lcs_length",
    "longbench_score",
    "mean_percent",
    "normalize_answer",
    "number_string_score",
    "passkey_score",
    "qa_f1_score",
    "retrieval_score",
    "rouge_l",
    "rouge_l_prf",
    "score",
    "score_sample",
    "string_match_all",
    "string_match_part",
]

Metric = Callable[..., float]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(answers: str | Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    return [str(a) for a in answers]


def first_int(prediction: str) -> str:
    """The first maximal run of ASCII digits in ``prediction`` (``""`` if none)."""
    m = re.search(r"[0-9]+", prediction)
    return m.group(0) if m else ""


def mean_percent(scores: Iterable[float]) -> float:
    """Mean of per-sample scores times 100, rounded to two decimals (0.0 for no scores)."""
    values = list(scores)
    if not values:
        return 0.0
    return round(100.0 * sum(values) / len(values), 2)


# --------------------------------------------------------------------------------------------
# InfiniteBench retrieval and RULER
# --------------------------------------------------------------------------------------------


def passkey_score(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the first integer in ``prediction`` equals an answer."""
    return float(first_int(prediction) in _as_list(answers))


def number_string_score(prediction: str, answers: str | Sequence[str]) -> float:
    """Same rule as :func:`passkey_score` (first digit run must match exactly)."""
    return passkey_score(prediction, answers)


_KV_SEPARATORS = str.maketrans({c: " " for c in "\n:\"'.,?!{}"})


def kv_retrieval_score(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when an answer is one of the prediction's punctuation-stripped words."""
    words = set(prediction.translate(_KV_SEPARATORS).split())
    return float(any(a in words for a in _as_list(answers)))


def string_match_all(prediction: str, references: str | Sequence[str]) -> float:
    """RULER: fraction of references contained in the prediction (case-insensitive)."""
    refs = _as_list(references)
    if not refs:
        return 0.0
    pred = prediction.lower()
    return sum(r.lower() in pred for r in refs) / len(refs)


def string_match_part(prediction: str, references: str | Sequence[str]) -> float:
    """RULER: 1.0 if any reference is contained in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in _as_list(references)))


# --------------------------------------------------------------------------------------------
# LongBench
# --------------------------------------------------------------------------------------------


def _token_f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Token-level F1 between normalised prediction and ground truth."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


_WORD = re.compile(r"\w+")


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len a * len b))."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l_prf(prediction: str, ground_truth: str) -> tuple[float, float, float]:
    """ROUGE-L (precision, recall, F1) on lower-cased ``\\w+`` tokens."""
    pred = _WORD.findall(prediction.lower())
    gold = _WORD.findall(ground_truth.lower())
    if not pred or not gold:
        return 0.0, 0.0, 0.0
    lcs = lcs_length(pred, gold)
    if lcs == 0:
        return 0.0, 0.0, 0.0
    p, r = lcs / len(pred), lcs / len(gold)
    return p, r, 2 * p * r / (p + r)


def rouge_l(prediction: str, ground_truth: str, **_: Any) -> float:
    """ROUGE-L F1 (see :func:`rouge_l_prf`)."""
    return rouge_l_prf(prediction, ground_truth)[2]


def classification_score(
    prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None, **_: Any
) -> float:
    """LongBench classification: credit split among all class names the prediction mentions."""
    if not all_classes:
        raise ValueError("classification_score needs all_classes")
    mentioned = [c for c in all_classes if c in prediction]
    # A class that is only part of the true label (e.g. "city" inside "city name") is not a
    # competing answer.
    mentioned = [c for c in mentioned if not (c in ground_truth and c != ground_truth)]
    return 1.0 / len(mentioned) if ground_truth in mentioned else 0.0


def retrieval_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """LongBench passage retrieval: share of numbers in ``prediction`` equal to the paragraph id."""
    m = re.search(r"Paragraph (\d+)", ground_truth)
    if m is None:
        raise ValueError(f"ground truth {ground_truth!r} has no 'Paragraph N'")
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == m.group(1) for n in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """LongBench passage count: share of numbers in ``prediction`` equal to the ground truth."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == str(ground_truth) for n in numbers) / len(numbers)


def code_sim_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Edit similarity of the first code-looking prediction line to the reference line.

    Uses :class:`difflib.SequenceMatcher` (``autojunk=False``) instead of a Levenshtein
    ratio; the two agree closely but not exactly.
    """
    candidate = prediction
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            candidate = line
            break
    return difflib.SequenceMatcher(None, candidate, ground_truth, autojunk=False).ratio()


LONGBENCH_METRIC_NAMES: dict[str, str] = {
    "narrativeqa": "qa_f1_score",
    "qasper": "qa_f1_score",
    "multifieldqa_en": "qa_f1_score",
    "hotpotqa": "qa_f1_score",
    "2wikimqa": "qa_f1_score",
    "musique": "qa_f1_score",
    "gov_report": "rouge_l",
    "qmsum": "rouge_l",
    "multi_news": "rouge_l",
    "trec": "classification_score",
    "triviaqa": "qa_f1_score",
    "samsum": "rouge_l",
    "passage_count": "count_score",
    "passage_retrieval_en": "retrieval_score",
    "lcc": "code_sim_score",
    "repobench-p": "code_sim_score",
}

_METRICS_BY_NAME: dict[str, Metric] = {
    "qa_f1_score": qa_f1_score,
    "rouge_l": rouge_l,
    "classification_score": classification_score,
    "retrieval_score": retrieval_score,
    "count_score": count_score,
    "code_sim_score": code_sim_score,
}

LONGBENCH_DATASET_METRICS: dict[str, Metric] = {
    ds: _METRICS_BY_NAME[name] for ds, name in LONGBENCH_METRIC_NAMES.items()
}

_FIRST_LINE_DATASETS = {"trec", "triviaqa", "samsum", "lsht"}


def _longbench_base(dataset: str) -> str:
    # LongBench-E files are named e.g. "hotpotqa_e"; they use the same metric.
    return dataset[:-2] if dataset.endswith("_e") else dataset


def longbench_score(
    dataset: str,
    prediction: str,
    answers: str | Sequence[str],
    all_classes: Sequence[str] | None = None,
) -> float:
    """Score one LongBench prediction: max of the dataset's metric over reference answers."""
    base = _longbench_base(dataset)
    try:
        metric = LONGBENCH_DATASET_METRICS[base]
    except KeyError:
        raise KeyError(
            f"no LongBench metric for dataset {dataset!r}; known: {sorted(LONGBENCH_METRIC_NAMES)}"
        ) from None
    if base in _FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    refs = _as_list(answers)
    if not refs:
        return 0.0
    return max(metric(prediction, ref, all_classes=all_classes) for ref in refs)


# --------------------------------------------------------------------------------------------
# InfiniteBench (other tasks) and dispatch
# --------------------------------------------------------------------------------------------

_LETTERS = "ABCDEFGH"


def choice_score(
    prediction: str, answers: str | Sequence[str], options: Sequence[str] | None = None
) -> float:
    """Multiple choice: 1.0 when the chosen option is a correct one.

    The choice is the leading option letter (``"B"``, ``"(B)"``, ``"B."``) when present, else
    every option whose text occurs in the prediction (credit ``1/len(chosen)`` if correct).
    This approximates InfiniteBench's choice parsing rather than reproducing it exactly.
    """
    refs = set(_as_list(answers))
    opts = [str(o) for o in (options or [])]
    m = re.match(r"\s*\(?([A-H])(?![A-Za-z])", prediction)
    if m and opts:
        idx = _LETTERS.index(m.group(1))
        if idx < len(opts):
            return float(opts[idx] in refs or m.group(1) in refs)
    if m and not opts:
        return float(m.group(1) in refs)
    chosen = [o for o in opts if o and o in prediction]
    if not chosen:
        return 0.0
    return 1.0 / len(chosen) if any(c in refs for c in chosen) else 0.0


def _math_find_score(prediction: str, answers: str | Sequence[str]) -> float:
    m = re.search(r"-?\d+(?:\.\d+)?", prediction)
    if m is None:
        return 0.0
    try:
        got = float(m.group(0))
        return float(any(abs(got - float(a)) < 1e-9 for a in _as_list(answers)))
    except ValueError:
        return 0.0


def _max_over(metric: Callable[[str, str], float]) -> Callable[..., float]:
    def scorer(prediction: str, answers: str | Sequence[str], **_: Any) -> float:
        refs = _as_list(answers)
        return max((metric(prediction, r) for r in refs), default=0.0)

    return scorer


INFINITEBENCH_METRICS: dict[str, Callable[..., float]] = {
    "passkey": lambda p, a, **_: passkey_score(p, a),
    "number_string": lambda p, a, **_: number_string_score(p, a),
    "kv_retrieval": lambda p, a, **_: kv_retrieval_score(p, a),
    "longbook_qa_eng": _max_over(qa_f1_score),
    "longbook_sum_eng": _max_over(rouge_l),
    "longbook_choice_eng": lambda p, a, options=None, **_: choice_score(p, a, options),
    "code_debug": lambda p, a, options=None, **_: choice_score(p, a, options),
    "longdialogue_qa_eng": lambda p, a, **_: string_match_part(p, a),
    "math_find": lambda p, a, **_: _math_find_score(p, a),
}


def infinitebench_score(
    task: str,
    prediction: str,
    answers: str | Sequence[str],
    options: Sequence[str] | None = None,
) -> float:
    """Score one InfiniteBench prediction (tasks listed in :data:`INFINITEBENCH_METRICS`)."""
    try:
        metric = INFINITEBENCH_METRICS[task]
    except KeyError:
        raise KeyError(
            f"no InfiniteBench metric for task {task!r}; known: {sorted(INFINITEBENCH_METRICS)}"
        ) from None
    return metric(prediction, answers, options=options)


SYNTHETIC_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "passkey": passkey_score,
    "number_string": number_string_score,
    "kv_retrieval": kv_retrieval_score,
    "niah_single": string_match_all,
    "niah_multikey": string_match_all,
    "niah_multivalue": string_match_all,
    "niah_multiquery": string_match_all,
    "variable_tracking": string_match_all,
}


def score(
    task: str,
    prediction: str,
    answers: str | Sequence[str],
    *,
    suite: str | None = None,
    all_classes: Sequence[str] | None = None,
    options: Sequence[str] | None = None,
) -> float:
    """Score a prediction by task name.

    ``suite`` (``"synthetic"``, ``"infinitebench"``, ``"longbench"``) disambiguates; when
    omitted, synthetic task names are tried first, then InfiniteBench, then LongBench.
    """
    if suite in (None, "synthetic") and task in SYNTHETIC_METRICS:
        return SYNTHETIC_METRICS[task](prediction, _as_list(answers))
    if suite in (None, "infinitebench") and task in INFINITEBENCH_METRICS:
        return infinitebench_score(task, prediction, answers, options)
    if suite in (None, "longbench"):
        return longbench_score(task, prediction, answers, all_classes)
    raise KeyError(f"no metric for task {task!r} in suite {suite!r}")


class _SampleLike(Protocol):
    @property
    def task(self) -> str: ...
    @property
    def answers(self) -> list[str]: ...
    @property
    def meta(self) -> dict[str, Any]: ...


def score_sample(sample: _SampleLike, prediction: str) -> float:
    """Score ``prediction`` for a :class:`~benchmarks.tasks.synthetic.Sample`.

    Uses ``meta["suite"]``, ``meta["all_classes"]`` and ``meta["options"]`` when present.
    """
    meta = sample.meta
    return score(
        sample.task,
        prediction,
        sample.answers,
        suite=meta.get("suite"),
        all_classes=meta.get("all_classes"),
        options=meta.get("options"),
    )
