"""Tests for langchain_infllm.tool_parsing: every format, failure modes, streaming."""

from __future__ import annotations

import itertools
import json
import random
import re
import time
from collections.abc import Collection, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessageChunk
from langchain_core.messages.tool import tool_call_chunk

from langchain_infllm.chat_core.tool_parsing import _scan_all
from langchain_infllm.tool_parsing import (
    ParsedResponse,
    StreamEvent,
    TextEvent,
    ToolCallEvent,
    ToolCallStreamParser,
    generate_tool_call_id,
    parse_tool_calls,
    tool_call_prefill,
)

ID_RE = re.compile(r"^[A-Za-z0-9]{9}$")

HERMES_2 = (
    "Let me look that up.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
)


def calls_of(parsed: ParsedResponse) -> list[tuple[str, dict[str, Any]]]:
    """Names and args of the valid calls, for compact assertions."""
    return [(c["name"], c["args"]) for c in parsed.tool_calls]


def run_stream(
    pieces: Sequence[str], tool_names: Collection[str] | None = None
) -> tuple[str, list[ToolCallEvent], ToolCallStreamParser]:
    """Feed pieces to a fresh streaming parser; return content, call events, parser."""
    parser = ToolCallStreamParser(tool_names)
    events: list[StreamEvent] = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    events.extend(parser.finish())
    text = "".join(e.text for e in events if isinstance(e, TextEvent))
    calls = [e for e in events if isinstance(e, ToolCallEvent)]
    return text, calls, parser


def split_at(text: str, cuts: Sequence[int]) -> list[str]:
    """Cut text at the given positions (any order, duplicates allowed)."""
    points = sorted({min(max(c, 0), len(text)) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def assert_stream_matches_batch(
    text: str, pieces: Sequence[str], tool_names: Collection[str] | None = None
) -> None:
    """The streaming parser, however fed, must reproduce the batch result."""
    assert "".join(pieces) == text
    batch = parse_tool_calls(text, tool_names)
    content, events, parser = run_stream(pieces, tool_names)
    assert not parser._broken, "streaming parser hit its internal safety net"
    assert parser.pending == ""
    assert content.strip() == batch.content
    assert [e.chunk["index"] for e in events] == list(range(len(events)))
    assert all(ID_RE.match(e.chunk["id"]) for e in events)
    valid = [(e.chunk["name"], e.chunk["args"]) for e in events if e.invalid is None]
    expected = [(c["name"], json.dumps(c["args"], ensure_ascii=False)) for c in batch.tool_calls]
    assert valid == expected
    invalid = [
        (e.invalid["name"], e.invalid["args"], e.invalid["error"]) for e in events if e.invalid
    ]
    assert invalid == [(c["name"], c["args"], c["error"]) for c in batch.invalid_tool_calls]
    for e in events:
        if e.invalid is not None:
            assert e.chunk["id"] == e.invalid["id"]
            assert json.loads(e.chunk["args"]) == e.invalid["args"]


# ------------------------------------------------------------------- ids


def test_generated_ids_are_nine_alphanumerics_and_distinct() -> None:
    ids = {generate_tool_call_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(ID_RE.match(i) for i in ids)


def test_every_parsed_call_gets_an_id() -> None:
    parsed = parse_tool_calls(HERMES_2 + '\n<tool_call>\n{"name": "x", "arguments": {')
    records = [*parsed.tool_calls, *parsed.invalid_tool_calls]
    assert len(records) == 3
    assert all(ID_RE.match(r["id"] or "") for r in records)
    assert len({r["id"] for r in records}) == 3


# ---------------------------------------------------------------- Hermes


def test_hermes_single_call_with_prose() -> None:
    text = (
        "Sure, checking.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
        "</tool_call>\nOne moment."
    )
    parsed = parse_tool_calls(text)
    assert calls_of(parsed) == [("get_weather", {"city": "Paris", "days": 2})]
    assert parsed.content == "Sure, checking.\n\nOne moment."
    assert parsed.invalid_tool_calls == []
    assert parsed.tool_calls[0]["type"] == "tool_call"


def test_hermes_multiple_calls() -> None:
    parsed = parse_tool_calls(HERMES_2)
    assert calls_of(parsed) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]
    assert parsed.content == "Let me look that up."


def test_hermes_unterminated_final_call() -> None:
    text = 'Calling.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n'
    parsed = parse_tool_calls(text)
    assert calls_of(parsed) == [("f", {"x": 1})]
    assert parsed.content == "Calling."


def test_hermes_missing_close_before_next_open() -> None:
    text = (
        '<tool_call>\n{"name": "a", "arguments": {}}\n'
        '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>'
    )
    assert calls_of(parse_tool_calls(text)) == [("a", {}), ("b", {})]


def test_hermes_arguments_as_json_string() -> None:
    text = '<tool_call>\n{"name": "f", "arguments": "{\\"x\\": [1, 2]}"}\n</tool_call>'
    assert calls_of(parse_tool_calls(text)) == [("f", {"x": [1, 2]})]


def test_hermes_variants_inside_tags() -> None:
    text = (
        '<tool_call>{"name": "a", "parameters": {"k": "v"}}</tool_call>'
        '<tool_call>\n```json\n{"name": "b", "arguments": {}}\n```\n</tool_call>'
        '<tool_call>{"type": "function", "function": {"name": "c", "arguments": "{}"}}'
        "</tool_call>"
        '<tool_call>[{"name": "d"}, {"name": "e", "arguments": null}]</tool_call>'
        '<tool_call>{"name": "f", "arguments": {}}}</tool_call>'  # stray brace tolerated
    )
    parsed = parse_tool_calls(text)
    assert calls_of(parsed) == [
        ("a", {"k": "v"}),
        ("b", {}),
        ("c", {}),
        ("d", {}),
        ("e", {}),
        ("f", {}),
    ]
    assert parsed.invalid_tool_calls == []
    assert parsed.content == ""


def test_stray_closing_tag_is_removed() -> None:
    text = '{"name": "f", "arguments": {}}\n</tool_call>'
    parsed = parse_tool_calls(text)
    assert calls_of(parsed) == [("f", {})]
    assert parsed.content == ""


@pytest.mark.parametrize(
    ("body", "name", "error_part"),
    [
        ('{"name": "get_weather", "arguments": {"city": "Paris"', "get_weather", "malformed"),
        ('{"name": "f", "arguments": {"x": }}', "f", "malformed"),
        ("not json at all", None, "malformed"),
        ("", None, "empty"),
        ('{"arguments": {}}', None, "no name"),
        ('{"name": "f", "arguments": "{oops"}', "f", "not valid JSON"),
        ('{"name": "f", "arguments": [1, 2]}', "f", "not a JSON object"),
        ("42", None, "not a JSON object"),
    ],
)
def test_hermes_malformed_becomes_invalid_tool_call(
    body: str, name: str | None, error_part: str
) -> None:
    parsed = parse_tool_calls(f"Before.\n<tool_call>\n{body}\n</tool_call>\nAfter.")
    assert parsed.tool_calls == []
    assert len(parsed.invalid_tool_calls) == 1
    bad = parsed.invalid_tool_calls[0]
    assert bad["type"] == "invalid_tool_call"
    assert bad["name"] == name
    assert bad["args"] == body.strip()
    assert error_part in (bad["error"] or "")
    assert ID_RE.match(bad["id"] or "")
    assert parsed.content == "Before.\n\nAfter."


def test_truncated_hermes_call_is_invalid() -> None:
    parsed = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"x": 1')
    assert parsed.tool_calls == []
    assert parsed.invalid_tool_calls[0]["name"] == "f"


def test_valid_and_invalid_calls_together() -> None:
    text = (
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "b", "arguments": {</tool_call>'
    )
    parsed = parse_tool_calls(text)
    assert calls_of(parsed) == [("a", {})]
    assert [c["name"] for c in parsed.invalid_tool_calls] == ["b"]


# ------------------------------------------------------------- bare JSON


@pytest.mark.parametrize(
    "obj",
    [
        {"name": "get_weather", "parameters": {"city": "Oslo"}},
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
        {"type": "function", "name": "get_weather", "parameters": {"city": "Oslo"}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})},
    ],
)
def test_bare_json_call(obj: dict[str, Any]) -> None:
    parsed = parse_tool_calls(json.dumps(obj))
    assert calls_of(parsed) == [("get_weather", {"city": "Oslo"})]
    assert parsed.content == ""


def test_bare_json_with_prose_and_several_lines() -> None:
    text = (
        "I will call two tools.\n"
        '{"name": "a", "parameters": {"x": 1}}\n'
        '  {"name": "b", "parameters": {"y": 2}}\n'
        "Done."
    )
    parsed = parse_tool_calls(text)
    assert calls_of(parsed) == [("a", {"x": 1}), ("b", {"y": 2})]
    assert parsed.content == "I will call two tools.\n\n  \nDone."


def test_bare_json_list_of_calls() -> None:
    text = '[{"name": "a", "parameters": {}}, {"name": "b", "arguments": {"q": "z"}}]'
    assert calls_of(parse_tool_calls(text)) == [("a", {}), ("b", {"q": "z"})]


def test_python_tag_is_dropped() -> None:
    parsed = parse_tool_calls('<|python_tag|>{"name": "f", "parameters": {"a": 1}}')
    assert calls_of(parsed) == [("f", {"a": 1})]
    assert parsed.content == ""


def test_bare_json_mid_line_is_content() -> None:
    text = 'The call would be {"name": "a", "parameters": {}} in JSON.'
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == []
    assert parsed.content == text


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "Bob", "age": 31}',
        '[{"name": "Bob", "age": 31}, {"name": "Al", "age": 3}]',
        '{"city": "Paris", "name": "x", "arguments": {}}',
        '{"name": "x"}',  # no arguments key and no tool list: not a call
        '{"name": 3, "arguments": {}}',
        "{}",
        "[]",
        "{not json}",
        '{"name": "x", "arguments": {}',
        "[1, 2, 3]",
        "[link](http://example.com)",
    ],
)
def test_non_call_json_stays_content(text: str) -> None:
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == []
    assert parsed.invalid_tool_calls == []
    assert parsed.content == text


def test_bare_call_with_bad_string_arguments_is_invalid() -> None:
    parsed = parse_tool_calls('{"name": "f", "arguments": "{not json"}', tool_names=["f"])
    assert parsed.tool_calls == []
    assert parsed.invalid_tool_calls[0]["name"] == "f"


# ------------------------------------------------------------ fenced JSON


def test_fenced_json_single_and_list() -> None:
    text = (
        "Here you go:\n```json\n"
        '{"name": "search", "arguments": {"q": "llm"}}\n'
        "```\n"
        "and\n```\n"
        '[{"name": "a", "arguments": {}}, {"name": "b", "parameters": {"n": 1}}]\n'
        "```\nThanks."
    )
    parsed = parse_tool_calls(text)
    assert calls_of(parsed) == [("search", {"q": "llm"}), ("a", {}), ("b", {"n": 1})]
    assert parsed.content == "Here you go:\n\nand\n\nThanks."


@pytest.mark.parametrize(
    "text",
    [
        "```python\nprint({'name': 1})\n```",
        '```json\n{"name": "Bob", "age": 3}\n```',
        "```",
        "```json",
    ],
)
def test_fenced_non_calls_stay_content(text: str) -> None:
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == []
    assert parsed.content == text.strip()


def test_broken_fence_still_yields_the_call_line() -> None:
    # The fence is not a clean call block, but its call line is a bare call by itself.
    for text, rest in [
        ('```json\n{"name": "a", "arguments": {}}\nextra\n```', "```json\n\nextra\n```"),
        ('```json\n{"name": "a", "arguments": {}}', "```json"),
    ]:
        parsed = parse_tool_calls(text)
        assert calls_of(parsed) == [("a", {})]
        assert parsed.content == rest


# ---------------------------------------------------------------- Mistral


def test_mistral_json_list() -> None:
    text = (
        "Checking both.\n[TOOL_CALLS] "
        '[{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "abc123def"}, '
        '{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}]'
    )
    parsed = parse_tool_calls(text)
    assert calls_of(parsed) == [("get_weather", {"city": "Rome"}), ("get_time", {"tz": "CET"})]
    assert parsed.content == "Checking both."


def test_mistral_single_object() -> None:
    parsed = parse_tool_calls('[TOOL_CALLS] {"name": "f", "arguments": {"a": 1}}')
    assert calls_of(parsed) == [("f", {"a": 1})]


def test_mistral_name_args_form() -> None:
    text = (
        'Ok.[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}'
        "[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{}"
    )
    parsed = parse_tool_calls(text)
    assert calls_of(parsed) == [("get_weather", {"city": "Rome"}), ("get_time", {})]
    assert parsed.content == "Ok."


@pytest.mark.parametrize(
    ("text", "name", "args"),
    [
        ('[TOOL_CALLS] [{"name": "f", "arguments": {"x": }}]', "f", None),
        ('[TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}', "f", None),
        ('[TOOL_CALLS]f[ARGS]{"x": ', "f", '{"x":'),
        ('[TOOL_CALLS]f[ARGS]{"x": ]', "f", '{"x": ]'),
        ("[TOOL_CALLS]f[ARGS]nope", "f", "nope"),
        ("[TOOL_CALLS]f", "f", None),
        ("[TOOL_CALLS]", None, ""),
        ('[TOOL_CALLS] "huh"', None, '"huh"'),
        ("[TOOL_CALLS] []", None, "[]"),
    ],
)
def test_mistral_malformed_becomes_invalid(text: str, name: str | None, args: str | None) -> None:
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == []
    assert len(parsed.invalid_tool_calls) == 1
    bad = parsed.invalid_tool_calls[0]
    assert bad["name"] == name
    assert bad["error"]
    if args is not None:
        assert bad["args"] == args


def test_mistral_malformed_call_does_not_swallow_next_call() -> None:
    text = '[TOOL_CALLS]f[ARGS]{"x": [TOOL_CALLS]g[ARGS]{"y": 2}'
    parsed = parse_tool_calls(text)
    assert calls_of(parsed) == [("g", {"y": 2})]
    assert [c["name"] for c in parsed.invalid_tool_calls] == ["f"]


# ------------------------------------------------------- tool name filter


def test_unknown_name_in_bare_or_fenced_json_stays_content() -> None:
    bare = '{"name": "format_answer", "parameters": {"x": 1}}'
    fenced = f"```json\n{bare}\n```"
    for text in (bare, fenced):
        parsed = parse_tool_calls(text, tool_names=["get_weather"])
        assert parsed.tool_calls == []
        assert parsed.content == text
        assert calls_of(parse_tool_calls(text, tool_names=["format_answer"])) == [
            ("format_answer", {"x": 1})
        ]


def test_known_name_without_arguments_key_is_a_call_only_with_tool_names() -> None:
    assert calls_of(parse_tool_calls('{"name": "now"}', tool_names={"now"})) == [("now", {})]
    assert parse_tool_calls('{"name": "now"}').tool_calls == []


def test_unknown_name_in_explicit_markup_is_still_a_call() -> None:
    # The agent's tool node answers an unknown name with a helpful error message.
    text = '<tool_call>{"name": "nope", "arguments": {}}</tool_call>[TOOL_CALLS]nah[ARGS]{}'
    parsed = parse_tool_calls(text, tool_names=["get_weather"])
    assert calls_of(parsed) == [("nope", {}), ("nah", {})]


def test_partial_list_with_unknown_name_stays_content() -> None:
    text = '[{"name": "a", "parameters": {}}, {"name": "zzz", "parameters": {}}]'
    parsed = parse_tool_calls(text, tool_names=["a"])
    assert parsed.tool_calls == []
    assert parsed.content == text


# ------------------------------------------------------------ robustness


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "<",
        "<tool_call>",
        "</tool_call>",
        "[TOOL_CALLS",
        "[" * 5000,
        "{" * 5000,
        "<tool_call>" + "[" * 5000,
        "[TOOL_CALLS]" + "[" * 5000 + "]" * 5000,
        '{"name": "' + "\\" * 7,
        "```json\n" + "{" * 3000 + "}" * 3000 + "\n```",
        '{"name": "f", "arguments": 1' + "0" * 5000 + "}",
        '<tool_call>{"name": "f", "arguments": {"n": 1' + "0" * 5000 + "}}</tool_call>",
        "\x00\ud800\U0010ffff",
    ],
)
def test_pathological_inputs_never_raise(text: str) -> None:
    _scan_all(text, None)  # the internal scanner itself, without the safety net
    parse_tool_calls(text)
    assert_stream_matches_batch(text, [text])
    assert_stream_matches_batch(text, [*text[:300], text[300:]])


# -------------------------------------------------------------- streaming


STREAM_SAMPLES = [
    HERMES_2,
    'Calling.\n<tool_call>\n{"name": "f", "arguments": {"x": "a}b{c\\"d"}}\n',
    '{"name": "a", "parameters": {"x": [1, {"y": "]"}]}}\n{"name": "b", "parameters": {}}',
    '  [{"name": "a", "arguments": {}}]\ntrailing words',
    'Result:\n```json\n{"name": "search", "arguments": {"q": "```"}}\n```\ndone',
    '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]',
    '[TOOL_CALLS]f[ARGS]{"x": 1}[TOOL_CALLS]g[CALL_ID]abcdefghi[ARGS]{"y": "<tool_call>"}',
    '<tool_call>{"name": "b", "arguments": {</tool_call> text after',
    "Plain prose with <b>html</b>, [links](x) and {braces}.\n{not json}\n```py\nx = 1\n```",
    '{"name": "Bob", "age": 3}\n```json\n{"name": "Bob"}\n```',
    "<tool_call" + "<tool_call>{}</tool_call>" + "[TOOL_CALLS][TOOL_CALLS]x[ARGS]{}",
]


@pytest.mark.parametrize("text", STREAM_SAMPLES)
def test_stream_one_character_at_a_time_matches_batch(text: str) -> None:
    assert_stream_matches_batch(text, list(text))
    assert_stream_matches_batch(text, list(text), tool_names=["a", "f", "search"])


@pytest.mark.parametrize("text", STREAM_SAMPLES)
def test_stream_random_splits_match_batch(text: str) -> None:
    rng = random.Random(1234)
    for _ in range(30):
        cuts = [rng.randrange(len(text) + 1) for _ in range(rng.randrange(1, 8))]
        assert_stream_matches_batch(text, split_at(text, cuts))


def test_stream_emits_prose_before_call_completes() -> None:
    parser = ToolCallStreamParser()
    events = parser.feed("Hello there. <tool_")
    assert events == [TextEvent("Hello there. ")]
    assert parser.pending == "<tool_"
    assert parser.feed('call>\n{"name": "f", "arguments": {"x": 1') == []
    events = parser.feed("}}\n</tool_call> Bye")
    assert isinstance(events[0], ToolCallEvent)
    assert events[0].chunk["name"] == "f"
    assert json.loads(events[0].chunk["args"]) == {"x": 1}
    assert events[1:] == [TextEvent(" Bye")]
    assert parser.finish() == []


def test_stream_releases_non_markup_quickly() -> None:
    parser = ToolCallStreamParser()
    assert parser.feed("a [link") == [TextEvent("a [link")]
    parser = ToolCallStreamParser()
    out = parser.feed("Line\n{x} and <b>")
    assert "".join(e.text for e in out if isinstance(e, TextEvent)) == "Line\n{x} and <b>"
    assert parser.pending == ""
    parser = ToolCallStreamParser()
    parser.feed("```python\n")
    assert parser.pending == ""
    parser = ToolCallStreamParser()
    parser.feed('{"answer": 42')  # a first key that no call has: plain JSON output
    assert parser.pending == ""


def test_stream_holds_back_possible_markup() -> None:
    for partial in ["<", "<tool_c", "</tool", "[TOOL_", "x\n{", '{"name": "f"', "```", "```js"]:
        parser = ToolCallStreamParser()
        parser.feed(partial)
        assert parser.pending, partial


def test_stream_invalid_call_becomes_invalid_in_langchain_chunks() -> None:
    text = '<tool_call>\n{"name": "f", "arguments": {"x": 1\n'  # truncated generation
    _, events, _ = run_stream(list(text))
    assert len(events) == 1 and events[0].invalid is not None
    message = AIMessageChunk(content="", tool_call_chunks=[tool_call_chunk(**events[0].chunk)])
    assert message.tool_calls == []
    assert message.invalid_tool_calls[0]["name"] == "f"


def test_stream_chunks_build_langchain_tool_calls() -> None:
    _, events, _ = run_stream(list(HERMES_2))
    message = AIMessageChunk(content="")
    for event in events:
        message = message + AIMessageChunk(
            content="", tool_call_chunks=[tool_call_chunk(**event.chunk)]
        )
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "UTC"}),
    ]
    assert all(ID_RE.match(c["id"] or "") for c in message.tool_calls)


def test_stream_parser_is_reusable_after_finish() -> None:
    parser = ToolCallStreamParser()
    parser.feed('{"name": "f", "arguments": {}')
    first = parser.finish()
    assert [e.text for e in first if isinstance(e, TextEvent)] == ['{"name": "f", "arguments": {}']
    second = parser.feed('{"name": "f", "arguments": {}}') + parser.finish()
    assert isinstance(second[0], ToolCallEvent)
    assert second[0].chunk["index"] == 0


def test_stream_long_arguments_stay_fast() -> None:
    payload = "word " * 4000  # ~20 kB of arguments fed one character at a time
    for text in (
        '<tool_call>\n{"name": "write", "arguments": {"text": "' + payload + '"}}\n</tool_call>',
        '{"name": "write", "arguments": {"text": "' + payload + '"}}',
        '[TOOL_CALLS]write[ARGS]{"text": "' + payload + '"}',
    ):
        start = time.perf_counter()
        _, events, _ = run_stream(list(text))
        assert time.perf_counter() - start < 5
        assert len(events) == 1 and events[0].invalid is None


# --------------------------------------------------------------- prefill


def test_prefill_hermes() -> None:
    assert tool_call_prefill("hermes", None) == '<tool_call>\n{"name": "'
    named = tool_call_prefill("hermes", "get_weather")
    assert named == '<tool_call>\n{"name": "get_weather", "arguments": '
    completion = '{"city": "Paris"}}\n</tool_call>'
    assert calls_of(parse_tool_calls(named + completion)) == [("get_weather", {"city": "Paris"})]
    unnamed = tool_call_prefill("qwen", None) + 'f", "arguments": {}}'
    assert calls_of(parse_tool_calls(unnamed)) == [("f", {})]


@pytest.mark.parametrize("fmt", ["hermes", "qwen", "mistral", "json", "llama", "Hermes"])
def test_prefill_round_trips_through_parser(fmt: str) -> None:
    completion = '{"q": 1}}' + ("]" if fmt == "mistral" else "")
    text = tool_call_prefill(fmt, 'we"ird') + completion
    assert calls_of(parse_tool_calls(text, tool_names=['we"ird'])) == [('we"ird', {"q": 1})]


def test_prefill_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown tool-call format"):
        tool_call_prefill("xml", None)


# ------------------------------------------------------------ properties

FRAGMENTS = [
    "<tool_call>",
    "</tool_call>",
    "<tool_call>\n",
    "<tool_",
    "<",
    "<|python_tag|>",
    "[TOOL_CALLS]",
    "[TOOL_",
    "[ARGS]",
    "[CALL_ID]",
    "[",
    "]",
    "{",
    "}",
    '{"name":',
    '{"name": "f", "arguments": ',
    '{"name": "get_weather", "parameters": {"city": "x"}}',
    '"arguments":',
    '"parameters":',
    '"f"',
    "f",
    "get_weather",
    "{}",
    '"',
    "\\",
    ",",
    ":",
    "1",
    "```",
    "```json\n",
    "\n",
    " ",
    "\t",
]

fragment_text = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=25
).map("".join)


@st.composite
def call_text(draw: st.DrawFn) -> str:
    """Well-formed calls in random formats mixed with prose and noise."""
    parts: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(["f", "get_weather", "search"]))
        args = draw(
            st.dictionaries(
                st.text(max_size=3), st.one_of(st.integers(), st.text(max_size=5)), max_size=2
            )
        )
        call = {"name": name, "arguments": args}
        kind = draw(st.integers(0, 5))
        if kind == 0:
            piece = f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
        elif kind == 1:
            piece = "\n" + json.dumps({"name": name, "parameters": args}) + "\n"
        elif kind == 2:
            piece = f"\n```json\n{json.dumps(call)}\n```\n"
        elif kind == 3:
            piece = f"[TOOL_CALLS] {json.dumps([call])}"
        elif kind == 4:
            piece = f"[TOOL_CALLS]{name}[ARGS]{json.dumps(args)}"
        else:
            piece = f"<tool_call>\n{json.dumps(call)[:-3]}"  # truncated: invalid
        parts.append(draw(st.one_of(st.text(max_size=8), fragment_text)))
        parts.append(piece)
    parts.append(draw(st.text(max_size=8)))
    return "".join(parts)


any_text = st.one_of(st.text(), fragment_text, call_text())
tool_name_sets = st.one_of(st.none(), st.sampled_from([(), ("f",), ("f", "get_weather")]))

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(text=any_text, tool_names=tool_name_sets)
def test_property_batch_parser_never_raises(text: str, tool_names: tuple[str, ...] | None) -> None:
    _scan_all(text, None if tool_names is None else frozenset(tool_names))
    parsed = parse_tool_calls(text, tool_names)
    assert parsed.content == parsed.content.strip()
    for call in parsed.tool_calls:
        assert isinstance(call["args"], dict) and call["name"]
        assert ID_RE.match(call["id"] or "")


@PROPERTY_SETTINGS
@given(text=any_text, tool_names=tool_name_sets)
def test_property_stream_char_by_char_agrees(text: str, tool_names: tuple[str, ...] | None) -> None:
    assert_stream_matches_batch(text, list(text), tool_names)


@PROPERTY_SETTINGS
@given(text=any_text, cuts=st.lists(st.integers(0, 400), max_size=10), tool_names=tool_name_sets)
def test_property_stream_random_splits_agree(
    text: str, cuts: list[int], tool_names: tuple[str, ...] | None
) -> None:
    assert_stream_matches_batch(text, split_at(text, cuts), tool_names)


@st.composite
def clean_calls(draw: st.DrawFn) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """Prose and well-formed calls, plus the calls the parser must find."""
    prose = st.text(alphabet="abc XYZ.,!?-", max_size=10)
    parts: list[str] = []
    expected: list[tuple[str, dict[str, Any]]] = []
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(["f", "get_weather", "search"]))
        args = draw(
            st.dictionaries(
                st.text(max_size=4),
                st.one_of(st.integers(), st.text(max_size=6), st.lists(st.booleans())),
                max_size=3,
            )
        )
        call = {"name": name, "arguments": args}
        kind = draw(st.integers(0, 5))
        if kind == 0:
            piece = f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
        elif kind == 1:
            piece = "\n" + json.dumps({"name": name, "parameters": args}) + "\n"
        elif kind == 2:
            piece = f"\n```json\n{json.dumps(call)}\n```\n"
        elif kind == 3:
            piece = f"[TOOL_CALLS] {json.dumps([call])}"
        elif kind == 4:
            piece = f"[TOOL_CALLS]{name}[ARGS]{json.dumps(args)}"
        else:
            as_string = {"name": name, "arguments": json.dumps(args)}
            piece = f"<tool_call>{json.dumps(as_string, ensure_ascii=False)}</tool_call>"
        parts += [draw(prose), piece]
        expected.append((name, args))
    parts.append(draw(prose))
    return "".join(parts), expected


@PROPERTY_SETTINGS
@given(case=clean_calls())
def test_property_well_formed_calls_are_all_found(
    case: tuple[str, list[tuple[str, dict[str, Any]]]],
) -> None:
    text, expected = case
    parsed = parse_tool_calls(text)
    assert calls_of(parsed) == expected
    assert parsed.invalid_tool_calls == []
    assert "tool_call" not in parsed.content and "TOOL_CALLS" not in parsed.content
    assert calls_of(parse_tool_calls(text, tool_names=["f", "get_weather", "search"])) == expected


def test_hermes_call_one_closing_brace_short_is_repaired() -> None:
    """Small models often stop a `}` short before `</tool_call>`: only missing closers are
    added, so a call with other damage is still reported invalid."""
    short = '<tool_call>\n{"name": "f", "arguments": {"a": "x}"}\n</tool_call>'
    parsed = parse_tool_calls(short, ["f"])
    assert [(c["name"], c["args"]) for c in parsed.tool_calls] == [("f", {"a": "x}"})]
    assert not parsed.invalid_tool_calls
    mismatched = '<tool_call>\n{"name": "f", "arguments": {"a": [1, 2}}\n</tool_call>'
    parsed = parse_tool_calls(mismatched, ["f"])
    assert not parsed.tool_calls and len(parsed.invalid_tool_calls) == 1
    streamed = ToolCallStreamParser(["f"])
    events = [e for piece in (short[:20], short[20:]) for e in streamed.feed(piece)]
    events += streamed.finish()
    calls = [e for e in events if not isinstance(e, TextEvent)]
    assert len(calls) == 1 and calls[0].invalid is None
