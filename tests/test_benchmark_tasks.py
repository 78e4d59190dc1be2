"""Tests for benchmarks.tasks: synthetic generators, metrics and JSONL loaders."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from benchmarks.tasks import metrics as M
from benchmarks.tasks.loaders import (
    DatasetFormatError,
    load_infinitebench,
    load_longbench,
)
from benchmarks.tasks.synthetic import (
    SYNTHETIC_TASKS,
    Sample,
    answer_cue,
    approx_token_count,
    generate,
    generate_grid,
    make_messages,
    make_prompt,
)


def whitespace_tokens(text: str) -> int:
    return len(text.split())


def word_punct_tokens(text: str) -> int:
    """Non-additive toy tokenizer: words and single punctuation marks."""
    return len(re.findall(r"\w+|[^\w\s]", text))


ALL_TASKS = sorted(SYNTHETIC_TASKS)
SINGLE_ANSWER_TASKS = ["passkey", "number_string", "kv_retrieval", "niah_single", "niah_multikey"]


# --------------------------------------------------------------------------------------------
# Synthetic generators
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ALL_TASKS)
def test_same_seed_same_sample(task: str) -> None:
    a = generate(task, 3000, 0.4, seed=7)
    b = generate(task, 3000, 0.4, seed=7)
    assert a == b
    c = generate(task, 3000, 0.4, seed=8)
    assert c.context != a.context
    assert c.answers != a.answers


@pytest.mark.parametrize("task", ALL_TASKS)
def test_answers_stable_across_lengths_and_depths(task: str) -> None:
    short = generate(task, 1500, 0.1, seed=3)
    long = generate(task, 6000, 0.9, seed=3)
    assert short.answers == long.answers
    assert short.question == long.question


@pytest.mark.parametrize("task", ALL_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_target_needle_at_requested_depth(task: str, depth: float) -> None:
    sample = generate(task, 4000, depth, seed=1)
    needle = sample.meta["needles"][0]
    assert sample.context.count(needle) == 1
    position = sample.context.index(needle) / len(sample.context)
    assert abs(position - depth) <= 0.05, (position, depth)
    assert sample.depth == depth
    assert sample.meta["needle_depths"][0] == pytest.approx(position)


@pytest.mark.parametrize("task", ALL_TASKS)
@pytest.mark.parametrize(
    "counter", [approx_token_count, whitespace_tokens, word_punct_tokens], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("target", [1000, 8000])
def test_context_length_within_tolerance(task: str, counter: Any, target: int) -> None:
    sample = generate(task, target, 0.5, seed=2, count_tokens=counter)
    actual = counter(sample.context)
    assert abs(actual - target) / target <= 0.03, (actual, target)
    assert sample.length_tokens_target == target
    assert sample.meta["length_tokens_actual"] == actual


def test_long_context_is_fast_and_accurate() -> None:
    sample = generate("passkey", 131072, 0.33, seed=0)
    actual = approx_token_count(sample.context)
    assert abs(actual - 131072) / 131072 <= 0.01
    pos = sample.context.index(sample.meta["needles"][0]) / len(sample.context)
    assert abs(pos - 0.33) <= 0.01


@pytest.mark.parametrize("task", ["passkey", "number_string", "niah_single", "niah_multikey"])
def test_single_answer_occurs_exactly_once(task: str) -> None:
    sample = generate(task, 3000, 0.6, seed=11)
    assert len(sample.answers) == 1
    assert sample.context.count(sample.answers[0]) == 1


def test_passkey_and_number_formats() -> None:
    pk = generate("passkey", 2000, 0.5, seed=4)
    assert re.fullmatch(r"[1-9]\d{4}", pk.answers[0])
    assert pk.context.startswith("The grass is green.")
    ns = generate("number_string", 2000, 0.5, seed=4)
    assert re.fullmatch(r"\d{10}", ns.answers[0])
    filler = pk.context.replace(pk.meta["needles"][0], "")
    assert not re.search(r"\d", filler)


def test_kv_retrieval_is_valid_json_with_target_pair() -> None:
    sample = generate("kv_retrieval", 3000, 0.7, seed=5)
    data = json.loads(sample.context)
    key = sample.meta["key"]
    assert data[key] == sample.answers[0]
    assert len(data) == sample.meta["num_pairs"]
    assert sample.context.count(key) == 1
    assert sample.context.count(sample.answers[0]) == 1
    assert key in sample.question
    keys = list(data)
    assert abs(keys.index(key) / (len(keys) - 1) - 0.7) <= 0.05


@pytest.mark.parametrize("task", ["niah_multivalue", "niah_multiquery"])
def test_multi_answer_needles_each_once(task: str) -> None:
    sample = generate(task, 4000, 0.2, seed=6)
    assert len(sample.answers) == 4
    assert len(set(sample.answers)) == 4
    for value in sample.answers:
        assert sample.context.count(value) == 1
    for key in sample.meta["keys"]:
        assert key in sample.question


def test_multikey_distractors_present_but_not_answers() -> None:
    sample = generate("niah_multikey", 4000, 0.5, seed=9, num_distractors=5)
    keys = sample.meta["keys"]
    assert len(keys) == 6 and len(set(keys)) == 6
    assert keys[0] in sample.question
    assert all(k not in sample.question for k in keys[1:])
    for value in sample.meta["distractor_values"]:
        assert sample.context.count(value) == 1
        assert value not in sample.answers


@pytest.mark.parametrize("key_type", ["words", "numbers", "uuids"])
@pytest.mark.parametrize("value_type", ["numbers", "uuids"])
def test_niah_key_and_value_types(key_type: Any, value_type: Any) -> None:
    sample = generate(
        "niah_multikey",
        2000,
        0.5,
        seed=1,
        key_type=key_type,
        value_type=value_type,
        filler="repeat",
    )
    assert sample.context.count(sample.answers[0]) == 1
    if value_type == "uuids":
        assert re.fullmatch(r"[0-9a-f-]{36}", sample.answers[0])


def test_variable_tracking_chain() -> None:
    sample = generate("variable_tracking", 4000, 0.3, seed=12, num_hops=4, num_chains=3)
    chain = sample.answers
    assert len(chain) == 5
    value = sample.meta["value"]
    assert sample.context.count(value) == 1
    assert value in sample.question
    # the chain reads forwards: the value assignment first, each hop after its source
    positions = [sample.context.index(f"VAR {chain[0]} = {value}.")]
    for prev, name in itertools.pairwise(chain):
        stmt = f"VAR {name} = VAR {prev}."
        assert sample.context.count(stmt) == 1
        positions.append(sample.context.index(stmt))
    assert positions == sorted(positions)
    for name in chain:
        assert sample.context.count(f"VAR {name} =") == 1
    # distractor chains hold other values and share no variables with the answer
    others = sample.meta["chains"][1:]
    assert len(others) == 2
    assert all(set(c).isdisjoint(chain) for c in others)
    assert value not in sample.meta["chain_values"][1:]
    assert M.score_sample(sample, " " + ", ".join(chain)) == 1.0
    assert M.score_sample(sample, ", ".join(chain[:2])) == pytest.approx(0.4)


def test_essay_filler_varies() -> None:
    sample = generate("niah_single", 3000, 0.5, seed=0, filler="essay")
    sentences = set(re.split(r"(?<=\.) ", sample.context))
    assert len(sentences) > 20


def test_argument_validation() -> None:
    with pytest.raises(ValueError, match="depth"):
        generate("passkey", 1000, 1.5)
    with pytest.raises(ValueError, match="target_tokens"):
        generate("passkey", 0)
    with pytest.raises(ValueError, match="too small"):
        generate("niah_multiquery", 20, 0.5, num_queries=8)
    with pytest.raises(KeyError, match="unknown synthetic task"):
        generate("nope", 1000)
    with pytest.raises(ValueError, match="filler"):
        generate("niah_single", 1000, filler="lorem")


def test_generate_grid() -> None:
    samples = list(
        generate_grid(["passkey", "niah_single"], [1000, 2000], [0.0, 1.0], samples_per_cell=2)
    )
    assert len(samples) == 16
    assert {s.task for s in samples} == {"passkey", "niah_single"}
    first = [s for s in samples if s.task == "passkey" and s.meta["seed"] == "0-0"]
    assert len({s.answers[0] for s in first}) == 1


def test_sample_is_frozen() -> None:
    sample = generate("passkey", 1000)
    with pytest.raises(AttributeError):
        sample.context = "x"  # type: ignore[misc]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_make_prompt_styles(task: str) -> None:
    sample = generate(task, 1500, 0.5, seed=0)
    plain = make_prompt(sample)
    assert plain.endswith(answer_cue(sample))
    assert sample.context in plain and sample.question in plain
    assert plain.index(sample.context) < plain.index(sample.question)
    chat = make_prompt(sample, style="chat")
    assert sample.context in chat and sample.question in chat
    assert not chat.endswith(answer_cue(sample))
    assert make_messages(sample) == [{"role": "user", "content": chat}]
    with pytest.raises(ValueError):
        make_prompt(sample, style="xml")  # type: ignore[arg-type]


def test_perfect_prediction_scores_one() -> None:
    for task in ALL_TASKS:
        sample = generate(task, 1500, 0.5, seed=0)
        prediction = " " + ", ".join(sample.answers) + "."
        assert M.score_sample(sample, prediction) == 1.0, task
        assert M.score_sample(sample, " I do not know.") == 0.0, task


# --------------------------------------------------------------------------------------------
# Metrics on hand-worked examples
# --------------------------------------------------------------------------------------------


def test_normalize_answer() -> None:
    assert M.normalize_answer("The  Eiffel-Tower, in an old PARIS!") == "eiffeltower in old paris"


def test_qa_f1_score() -> None:
    # pred tokens [eiffel, tower, paris]; gold [eiffel, tower, in, paris]: P=1, R=3/4
    assert M.qa_f1_score("The Eiffel Tower, Paris", "Eiffel Tower in Paris") == pytest.approx(6 / 7)
    # "x b b" vs "b b c": overlap 2 -> P = R = 2/3; the article "a" is dropped before matching
    assert M.qa_f1_score("x b b", "b b c") == pytest.approx(2 / 3)
    assert M.qa_f1_score("a b b", "b b c") == pytest.approx(0.8)
    assert M.qa_f1_score("London", "Paris") == 0.0
    assert M.qa_f1_score("", "Paris") == 0.0
    assert M.qa_f1_score("The Paris.", "paris") == 1.0


def test_lcs_and_rouge_l() -> None:
    assert M.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert M.lcs_length([], ["a"]) == 0
    # LCS("the cat on the mat", "the cat sat on the mat") = 5: P = 5/5, R = 5/6, F = 10/11
    p, r, f = M.rouge_l_prf("the cat on the mat", "The cat sat on the mat.")
    assert (p, r) == (1.0, pytest.approx(5 / 6))
    assert f == pytest.approx(10 / 11)
    assert M.rouge_l("cat the", "the cat") == pytest.approx(0.5)
    # P = 2/4, R = 2/3 -> F = 4/7
    assert M.rouge_l("police killed the gunman", "the gunman died") == pytest.approx(4 / 7)
    assert M.rouge_l("", "x") == 0.0
    assert M.rouge_l("a b", "c d") == 0.0


def test_classification_score() -> None:
    classes = ["Abbreviation", "Entity", "Human being", "Human", "Location"]
    assert M.classification_score("Location", "Location", classes) == 1.0
    assert M.classification_score("Location or Entity", "Location", classes) == 0.5
    assert M.classification_score("Entity", "Location", classes) == 0.0
    # "Human" is a strict substring of the gold "Human being": not counted as a rival
    assert M.classification_score("Human being", "Human being", classes) == 1.0
    with pytest.raises(ValueError):
        M.classification_score("x", "y", None)


def test_retrieval_and_count_scores() -> None:
    assert M.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert M.retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    assert M.retrieval_score("no idea", "Paragraph 12") == 0.0
    assert M.retrieval_score("Paragraph 1", "Paragraph 12") == 0.0
    assert M.count_score("There are 7 unique paragraphs.", "7") == 1.0
    assert M.count_score("between 6 and 7", "7") == 0.5
    assert M.count_score("seven", "7") == 0.0


def test_code_sim_score() -> None:
    assert M.code_sim_score("x = foo(1)", "x = foo(1)") == 1.0
    assert M.code_sim_score("abcd", "abce") == pytest.approx(0.75)
    # fenced / commented lines are skipped: the first plain line is scored
    assert M.code_sim_score("```python\n# set x\nx = 1\n```", "x = 1") == 1.0


def test_infinitebench_retrieval_scores() -> None:
    assert M.passkey_score("The pass key is 12345.", ["12345"]) == 1.0
    assert M.passkey_score(" 12345. Remember it.", "12345") == 1.0
    assert M.passkey_score("The 5-digit pass key is 12345", ["12345"]) == 0.0
    assert M.passkey_score("123456", ["12345"]) == 0.0
    assert M.number_string_score("0123456789", ["0123456789"]) == 1.0
    assert M.number_string_score("123456789", ["0123456789"]) == 0.0
    assert M.kv_retrieval_score('The value is "abc-def".', ["abc-def"]) == 1.0
    assert M.kv_retrieval_score("{abc-def}", ["abc-def"]) == 1.0
    assert M.kv_retrieval_score("abc-defg", ["abc-def"]) == 0.0


def test_ruler_string_match() -> None:
    assert M.string_match_all("A1 and c3", ["a1", "b2", "c3"]) == pytest.approx(2 / 3)
    assert M.string_match_part("A1 and c3", ["a1", "b2", "c3"]) == 1.0
    assert M.string_match_part("nothing", ["a1"]) == 0.0
    assert M.string_match_all("x", []) == 0.0


def test_longbench_mapping_and_dispatch() -> None:
    expected = {
        "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
        "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum", "passage_count",
        "passage_retrieval_en", "lcc", "repobench-p",
    }  # fmt: skip
    assert set(M.LONGBENCH_METRIC_NAMES) == expected
    assert M.LONGBENCH_DATASET_METRICS["gov_report"] is M.rouge_l
    assert M.LONGBENCH_DATASET_METRICS["lcc"] is M.code_sim_score
    # max over references
    assert M.longbench_score("hotpotqa", "Paris", ["London", "Paris"]) == 1.0
    # trec / triviaqa / samsum: only the first line is scored
    classes = ["Location", "Human"]
    assert M.longbench_score("trec", "\nLocation\nHuman", ["Location"], classes) == 1.0
    assert M.longbench_score("triviaqa", "Paris\nLondon", ["London"]) == 0.0
    assert M.longbench_score("hotpotqa_e", "Paris", ["Paris"]) == 1.0
    with pytest.raises(KeyError):
        M.longbench_score("unknown_ds", "x", ["y"])
    assert M.mean_percent([1.0, 0.0, 0.5]) == 50.0
    assert M.mean_percent([]) == 0.0


def test_choice_score() -> None:
    options = ["red", "green", "blue", "yellow"]
    assert M.choice_score("B", ["green"], options) == 1.0
    assert M.choice_score("(C) blue", ["green"], options) == 0.0
    assert M.choice_score("I think it is green.", ["green"], options) == 1.0
    assert M.choice_score("green or blue", ["green"], options) == 0.5
    assert M.choice_score("Because", ["green"], options) == 0.0


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[Any]) -> None:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _lb_row(i: int, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "input": f"Question {i}?",
        "context": f"Passage number {i} says hello world.",
        "answers": [f"answer {i}"],
        "length": 6,
        "dataset": "hotpotqa",
        "language": "en",
        "all_classes": None,
        "_id": f"id{i}",
    }
    row.update(over)
    return row


def test_load_longbench(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "hotpotqa.jsonl", [_lb_row(0), "", _lb_row(1)])
    samples = list(load_longbench(tmp_path, "hotpotqa", count_tokens=whitespace_tokens))
    assert len(samples) == 2
    s = samples[1]
    assert isinstance(s, Sample)
    assert s.task == "hotpotqa"
    assert s.question == "Question 1?"
    assert s.answers == ["answer 1"]
    assert s.length_tokens_target == 6
    assert s.depth == -1.0
    assert s.meta["suite"] == "longbench" and s.meta["id"] == "id1" and s.meta["line"] == 3
    assert M.score_sample(s, "Answer 1.") == 1.0
    assert len(list(load_longbench(tmp_path, "hotpotqa", limit=1))) == 1
    assert next(iter(load_longbench(tmp_path, "hotpotqa"))).length_tokens_target == 0
    prompt = make_prompt(s)
    assert s.context in prompt and prompt.endswith("Answer:")


def test_load_longbench_classes_and_code(tmp_path: Path) -> None:
    classes = ["Location", "Human"]
    _write_jsonl(
        tmp_path / "trec.jsonl",
        [_lb_row(0, dataset="trec", answers=["Location"], all_classes=classes)],
    )
    (s,) = load_longbench(tmp_path, "trec")
    assert s.meta["all_classes"] == classes
    assert M.score_sample(s, "Location") == 1.0
    _write_jsonl(
        tmp_path / "lcc.jsonl",
        [_lb_row(0, dataset="lcc", input="", context="def f():\n", answers=["    return 1"])],
    )
    (code,) = load_longbench(tmp_path, "lcc")
    assert make_prompt(code).endswith("def f():\nNext line of code:\n")
    assert M.score_sample(code, "    return 1") == 1.0


def test_load_longbench_missing_file(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "qasper.jsonl", [_lb_row(0)])
    with pytest.raises(FileNotFoundError, match=r"hotpotqa\.jsonl.*qasper\.jsonl"):
        load_longbench(tmp_path, "hotpotqa")  # raised eagerly, before iteration
    with pytest.raises(FileNotFoundError, match="directory"):
        load_longbench(tmp_path / "nope", "hotpotqa")


def test_load_longbench_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "hotpotqa.jsonl"
    _write_jsonl(path, [_lb_row(0), '{"input": "q", "context": ', _lb_row(2)])
    it = load_longbench(tmp_path, "hotpotqa")
    assert next(it).answers == ["answer 0"]
    with pytest.raises(DatasetFormatError, match=r"hotpotqa\.jsonl:2: invalid JSON") as info:
        next(it)
    assert info.value.line_no == 2


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"input": "q", "answers": ["a"]}, "missing required field 'context'"),
        ({"input": "q", "context": "c"}, "missing required field 'answers'"),
        ({"input": "q", "context": 5, "answers": ["a"]}, "'context' must be a string"),
        ({"input": "q", "context": "c", "answers": {"a": 1}}, "'answers' must be"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_load_longbench_bad_fields(tmp_path: Path, row: Any, message: str) -> None:
    _write_jsonl(tmp_path / "musique.jsonl", [_lb_row(0), _lb_row(1), row])
    with pytest.raises(DatasetFormatError, match=rf"musique\.jsonl:3: .*{re.escape(message)}"):
        list(load_longbench(tmp_path, "musique"))


def test_load_infinitebench(tmp_path: Path) -> None:
    _write_jsonl(
        tmp_path / "passkey.jsonl",
        [
            {"id": 0, "context": "filler 12345 filler", "input": "What is the pass key?",
             "answer": ["12345"], "options": []},
            {"id": 1, "context": "filler 67890", "input": "What is the pass key?",
             "answer": 67890},
        ],
    )  # fmt: skip
    samples = list(load_infinitebench(tmp_path, "passkey", count_tokens=approx_token_count))
    assert [s.answers for s in samples] == [["12345"], ["67890"]]
    assert samples[0].meta["suite"] == "infinitebench"
    assert samples[0].length_tokens_target == approx_token_count("filler 12345 filler")
    assert make_prompt(samples[0]).endswith("The pass key is")
    assert M.score_sample(samples[0], " 12345.") == 1.0
    assert M.score_sample(samples[1], " 12345.") == 0.0

    _write_jsonl(
        tmp_path / "longbook_choice_eng.jsonl",
        [{"id": 3, "context": "A story.", "input": "Which colour?", "answer": ["blue"],
          "options": ["red", "green", "blue", "yellow"]}],
    )  # fmt: skip
    (choice,) = load_infinitebench(tmp_path, "longbook_choice_eng")
    assert choice.meta["options"] == ["red", "green", "blue", "yellow"]
    assert "C. blue" in make_prompt(choice)
    assert M.score_sample(choice, "C") == 1.0
    assert M.score_sample(choice, "A") == 0.0


def test_load_infinitebench_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"kv_retrieval\.jsonl.*none"):
        load_infinitebench(tmp_path, "kv_retrieval")
    _write_jsonl(
        tmp_path / "kv_retrieval.jsonl",
        [{"context": "{}", "input": "k", "answer": "v"}, "not json", {"context": "x"}],
    )
    with pytest.raises(DatasetFormatError, match=r"kv_retrieval\.jsonl:2:"):
        list(load_infinitebench(tmp_path, "kv_retrieval"))
    _write_jsonl(tmp_path / "math_find.jsonl", [{"context": "x", "input": "q"}])
    with pytest.raises(DatasetFormatError, match=r"math_find\.jsonl:1: missing .*'answer'"):
        list(load_infinitebench(tmp_path, "math_find"))
