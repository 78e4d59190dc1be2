"""Render normalised message dicts into the token ids a session consumes.

Rendering goes through the tokenizer's own chat template (tools through its ``tools=``
argument). Two properties matter more than the exact text:

* **Stable prefixes.** The ids for a conversation must start with the ids that were
  used for any earlier, shorter version of it, or the session recomputes. The text is
  therefore tokenized in *segments* cut at assistant-turn boundaries, never across
  them, so appending messages never changes the tokens of earlier segments.
* **Exact assistant tokens.** An assistant message the core generated comes back as
  the exact ids the model produced (looked up in ``tokens.GeneratedTokenStore``)
  instead of a re-render, because templates do not always re-render a turn to the same
  tokens. The splice is only made where the template verifiably renders the turn as a
  contiguous region after the generation prompt; elsewhere the re-render is used
  (correct, just recomputed).

Message content never becomes control tokens: special-token strings in it are escaped
before the template runs and encoded as plain text afterwards.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from langchain_infllm.chat_core.messages import PromptError, normalize_messages, template_message

__all__ = ["CODE_BASE", "ESC", "PromptError", "PromptRenderer", "RenderedPrompt", "TokenLookup"]

# Special-token strings written in message content are swapped for an escape before the
# template runs and encoded as plain text afterwards (``PromptRenderer.encode``), so no
# message can forge a role or an end of turn. ESC + chr(CODE_BASE + j) stands for the
# j-th special string, ESC + ESC for a literal ESC. Plane-15 private-use characters.
ESC = "\U000f0000"
CODE_BASE = 0xF0001
_ESCAPE = re.compile(re.escape(ESC) + "(.)", re.DOTALL)

TokenLookup = Callable[[Mapping[str, Any]], "Sequence[int] | None"]
"""Returns the exact ids generated for a (normalised) assistant message, or None."""


# ----------------------------------------------------------------------------- tools

_FALLBACK_TOOL_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def _inject_tools(
    dicts: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """For templates without tool support: describe the tools in the system message."""
    listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    text = _FALLBACK_TOOL_PROMPT.format(tools=listing)
    out = [dict(d) for d in dicts]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{text}" if out[0]["content"] else text
    else:
        out.insert(0, {"role": "system", "content": text})
    # Tool calls and results become plain text the template can show.
    for d in out:
        calls = d.pop("tool_calls", None)
        if calls:
            rendered = "\n".join(
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                    ensure_ascii=False,
                )
                + "\n</tool_call>"
                for c in calls
            )
            d["content"] = f"{d['content']}\n{rendered}" if d["content"] else rendered
        if d["role"] == "tool":
            d["role"] = "user"
            d["content"] = f"<tool_response>\n{d['content']}\n</tool_response>"
            d.pop("tool_call_id", None)
            d.pop("name", None)
    return out


def _tool_format(template: str, supports_tools: bool) -> str:
    """The tool-call format the template teaches (a ``tool_call_prefill`` format name)."""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template or not supports_tools:
        return "hermes"  # our fallback tool prompt is Hermes-style too
    return "llama"  # templates that list tools but define no markup expect bare JSON


# ----------------------------------------------------------------------------- render


def _stable_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


class _PrefixHasher:
    """sha256 of growing prefixes of one text; each character is hashed once."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._hasher = hashlib.sha256()
        self._upto = 0

    def digest(self, length: int) -> str | None:
        """Digest of ``text[:length]``; None for a length behind the last one asked or
        past the end (prefixes are asked for in increasing order)."""
        if length < self._upto or length > len(self.text):
            return None
        self._hasher.update(self.text[self._upto : length].encode())
        self._upto = length
        return self._hasher.copy().hexdigest()


@dataclass
class RenderedPrompt:
    """Token ids for one call and how they were put together."""

    token_ids: list[int]
    text: str
    """The template's rendering (what the ids decode to, except spliced turns)."""
    spliced_messages: int = 0
    spliced_tokens: int = 0
    segments: list[tuple[int, int]] = field(default_factory=list)
    """(start, end) token positions of each spliced assistant turn."""
    message_spans: list[tuple[int, int] | None] = field(default_factory=list)
    """Token range ``[start, end)`` of each message (its template tokens included), or
    None where the template does not render the conversation as growing prefixes; empty
    when the tokenizer cannot report character offsets."""


class PromptRenderer:
    """Renders conversations with one tokenizer's chat template."""

    def __init__(self, tokenizer: Any, end_of_turn_ids: Sequence[int] = ()) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise PromptError(
                "the tokenizer has no chat template; ChatInfLLM needs an instruct/chat model"
            )
        self.tokenizer = tokenizer
        template = tokenizer.chat_template
        if isinstance(template, dict):
            template = " ".join(str(v) for v in template.values())
        self.template_supports_tools = "tools" in str(template)
        self.tool_format = _tool_format(str(template), self.template_supports_tools)
        self.end_of_turn_ids = tuple(dict.fromkeys(int(i) for i in end_of_turn_ids))
        self.max_cached_regions = 100_000
        # Per message-prefix digest: where the turn's generation prompt ends (-1: the
        # template does not render the turn as a region after it), and the conversation's
        # length through the message with a digest of that text.
        self._regions: OrderedDict[str, int] = OrderedDict()
        self._ends: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._end_of_turn_texts = [
            text
            for text in (tokenizer.convert_ids_to_tokens(int(i)) for i in self.end_of_turn_ids)
            if isinstance(text, str) and text
        ]
        self._specials = _special_strings(tokenizer)
        self._special_re = (
            re.compile("|".join(re.escape(t) for t in self._specials)) if self._specials else None
        )
        self._codes = {t: ESC + chr(CODE_BASE + j) for j, t in enumerate(self._specials)}
        self._plain: dict[str, list[int]] = {}

    # -- content escaping ----------------------------------------------------------------
    def escape(self, text: str) -> str:
        """`text` with its special-token strings (and ESC) escaped; see ``ESC``."""
        if ESC in text:
            text = text.replace(ESC, ESC + ESC)
        if self._special_re is None:
            return text
        codes = self._codes
        return self._special_re.sub(lambda m: codes[m.group(0)], text)

    def unescape(self, text: str) -> str:
        """The text an escaped rendering stands for."""
        if ESC not in text:
            return text
        return _ESCAPE.sub(lambda m: self._escaped_text(m.group(1)), text)

    def _escaped_text(self, code: str) -> str:
        if code == ESC:
            return ESC
        j = ord(code) - CODE_BASE
        return self._specials[j] if 0 <= j < len(self._specials) else ESC + code

    def normalize(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Validated, normalised message dicts (see ``messages.normalize_messages``)."""
        return normalize_messages(messages)

    def _dicts(self, normalized: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Template dicts with every content escaped (all roles: content is never control)."""
        dicts = [template_message(d) for d in normalized]
        for d in dicts:
            if isinstance(d.get("content"), str):
                d["content"] = self.escape(d["content"])
        return dicts

    def _plain_ids(self, text: str) -> list[int]:
        """Ids of `text` read as plain text: special-token strings are not matched."""
        ids = self._plain.get(text)
        if ids is None:
            try:
                ids = list(
                    self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
                )
            except TypeError:
                ids = None
            special = set(getattr(self.tokenizer, "all_special_ids", ()))
            special |= {
                int(i)
                for i, tok in getattr(self.tokenizer, "added_tokens_decoder", {}).items()
                if getattr(tok, "special", False)
            }
            if ids is None or special & set(ids):
                # The tokenizer ignores the flag: one character at a time cannot match.
                encode = self.tokenizer.encode
                ids = [t for ch in text for t in encode(ch, add_special_tokens=False)]
            self._plain[text] = ids
        return list(ids)

    def _pieces(self, text: str) -> list[tuple[int, str, bool]]:
        """`text` cut at escapes: (start, text, plain) where plain pieces must be encoded
        with no special-token matching; the others are exact substrings of `text`."""
        pieces: list[tuple[int, str, bool]] = []
        pos = 0
        for m in _ESCAPE.finditer(text):
            if m.start() > pos:
                pieces.append((pos, text[pos : m.start()], False))
            pieces.append((m.start(), self._escaped_text(m.group(1)), True))
            pos = m.end()
        if pos < len(text):
            pieces.append((pos, text[pos:], False))
        return pieces

    # -- plain rendering ---------------------------------------------------------------
    def apply(
        self,
        dicts: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        *,
        add_generation_prompt: bool,
    ) -> str:
        """The template's text for these message dicts."""
        msgs = [dict(d) for d in dicts]
        kwargs: dict[str, Any] = {}
        if tools:
            if self.template_supports_tools:
                kwargs["tools"] = [dict(t) for t in tools]
            else:
                msgs = _inject_tools(msgs, tools)
        try:
            text = self.tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except Exception as error:  # template errors come as jinja2 exceptions
            raise PromptError(f"the chat template rejected the messages: {error}") from error
        if not isinstance(text, str):
            raise PromptError("the chat template did not return text")
        return text

    def encode(self, text: str) -> list[int]:
        """Ids of a piece of rendered text (the template writes any BOS itself); escaped
        content (see ``ESC``) becomes plain-text ids, never special tokens."""
        if not text:
            return []
        if ESC not in text:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        ids: list[int] = []
        for _, piece, plain in self._pieces(text):
            if plain:
                ids.extend(self._plain_ids(piece))
            else:
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False))
        return ids

    def count(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """Tokens of the rendered prompt (with the generation prompt)."""
        text = self.apply(self._dicts(self.normalize(messages)), tools, add_generation_prompt=True)
        return len(self.encode(text))

    # -- prompt with splices -----------------------------------------------------------
    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        lookup: TokenLookup | None = None,
    ) -> RenderedPrompt:
        """Ids for the conversation followed by the assistant generation prompt."""
        return self.render_normalized(self.normalize(messages), tools, lookup)

    def render_normalized(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        lookup: TokenLookup | None = None,
    ) -> RenderedPrompt:
        """``render`` for messages already through ``normalize``."""
        dicts = self._dicts(messages)
        full = self.apply(dicts, tools, add_generation_prompt=True)
        ids: list[int] = []
        starts: list[int] | None = []  # character offset in `full` of each token
        spans: list[tuple[int, int]] = []
        ends: list[int | None] = []  # character end of each message in `full`
        spliced_tokens = 0
        pos = 0
        # Rolling digest of the message prefix (the cache key of a turn's boundaries) and
        # a running hash of `full`, which verifies cached boundaries in linear time.
        chain = hashlib.sha256(_stable_json(list(tools or [])).encode())
        prefix = _PrefixHasher(full)
        for index, message in enumerate(messages):
            chain.update(_stable_json(dicts[index]).encode())
            key = chain.hexdigest()
            ends.append(self._message_end(dicts, index, tools, key, prefix))
            if message.get("role") != "assistant" or lookup is None:
                continue
            generated = lookup(message)
            if not generated:
                continue
            # Cuts happen only at spliced turns; the text between cuts is tokenized in one
            # piece, so the same conversation prefix always yields the same ids.
            region = self._assistant_region(dicts, index, tools, key, full, ends[-1])
            if region is None or region[0] < pos:
                continue
            start, end = region
            splice = self._splice(full[start:end], generated)
            if splice is None:
                continue
            starts = self._extend_located(ids, starts, full, pos, start)
            begin = len(ids)
            ids.extend(splice)
            if starts is not None:
                starts.extend([start] * len(splice))
            spans.append((begin, len(ids)))
            spliced_tokens += len(generated)
            pos = end
        starts = self._extend_located(ids, starts, full, pos, len(full))
        return RenderedPrompt(
            token_ids=ids,
            text=self.unescape(full),
            spliced_messages=len(spans),
            spliced_tokens=spliced_tokens,
            segments=spans,
            message_spans=[] if starts is None else _token_ranges(ends, starts),
        )

    def _extend_located(
        self, ids: list[int], starts: list[int] | None, full: str, a: int, b: int
    ) -> list[int] | None:
        """Append the ids of ``full[a:b]``; also their character offsets while the
        tokenizer can report them (None from then on when it cannot)."""
        text = full[a:b]
        if not text:
            return starts
        if starts is not None and ESC in text:
            for at, chunk, plain in self._pieces(text):
                if plain:
                    plain_ids = self._plain_ids(chunk)
                    ids.extend(plain_ids)
                    starts.extend([a + at] * len(plain_ids))
                else:
                    starts = self._extend_located(ids, starts, full, a + at, a + at + len(chunk))
                    if starts is None:  # offsets unavailable: encode the rest without them
                        ids.extend(self.encode(full[a + at + len(chunk) : b]))
                        return None
            return starts
        if starts is not None:
            try:
                encoded = self.tokenizer(
                    text, add_special_tokens=False, return_offsets_mapping=True
                )
                piece = [int(t) for t in encoded["input_ids"]]
                offsets = encoded["offset_mapping"]
            except (NotImplementedError, ValueError, TypeError, KeyError):
                piece, offsets = [], None
            if offsets is not None and len(offsets) == len(piece):
                ids.extend(piece)
                starts.extend(a + int(o[0]) for o in offsets)
                return starts
        ids.extend(self.encode(text))
        return None

    def _message_end(
        self,
        dicts: Sequence[Mapping[str, Any]],
        index: int,
        tools: Sequence[Mapping[str, Any]] | None,
        key: str,
        prefix: _PrefixHasher,
    ) -> int | None:
        """Character end of message ``index`` in the full rendering: the length of the
        conversation through it, when the full rendering starts with that text. Cached
        by message-prefix digest like the assistant regions, so a call renders only its
        new messages."""
        cached = _cache_get(self._ends, key)
        if cached is not None:
            length, digest = cached
            if prefix.digest(length) == digest:
                return length
        try:
            through = self.apply(dicts[: index + 1], tools, add_generation_prompt=False)
        except PromptError:
            return None
        digest = hashlib.sha256(through.encode()).hexdigest()
        _cache_put(self._ends, key, (len(through), digest), self.max_cached_regions)
        if prefix.digest(len(through)) != digest:
            return None
        return len(through)

    def _assistant_region(
        self,
        dicts: Sequence[Mapping[str, Any]],
        index: int,
        tools: Sequence[Mapping[str, Any]] | None,
        key: str,
        full: str,
        through_len: int | None,
    ) -> tuple[int, int] | None:
        """Character span of assistant turn ``index`` in the full rendering: from the end
        of the generation prompt to the end of the turn, if the template renders it so.

        ``through_len`` is the turn's verified end (see ``_message_end``): the full text
        starts with the conversation through this turn, so the start of the turn, cached
        by the same message-prefix digest, is valid whenever the end is.
        """
        if index == 0 or through_len is None:
            return None
        before_len = _cache_get(self._regions, key)
        if before_len is None:
            try:
                before = self.apply(dicts[:index], tools, add_generation_prompt=True)
            except PromptError:
                return None
            fits = len(before) <= through_len and full.startswith(before)
            before_len = len(before) if fits else -1
            _cache_put(self._regions, key, before_len, self.max_cached_regions)
        return None if before_len < 0 else (before_len, through_len)

    def _splice(self, region: str, generated: Sequence[int]) -> list[int] | None:
        """The generated ids plus the template's closing of the turn, or None when the
        turn's end cannot be located in the rendered region."""
        best = -1
        best_text = ""
        for text in self._end_of_turn_texts:
            at = region.rfind(text)
            if at > best:
                best, best_text = at, text
        if best < 0:
            return None
        ids = [int(t) for t in generated]
        if ids and ids[-1] in self.end_of_turn_ids:
            closing = region[best + len(best_text) :]
        else:
            closing = region[best:]
        return ids + self.encode(closing)


def _special_strings(tokenizer: Any) -> list[str]:
    """The tokenizer's special-token strings, longest first (so overlaps escape whole)."""
    found = {str(t) for t in getattr(tokenizer, "all_special_tokens", ()) or ()}
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(getattr(tok, "content", tok)))
    return sorted((t for t in found if t), key=lambda t: (-len(t), t))


def _token_ranges(
    ends: Sequence[int | None], starts: Sequence[int]
) -> list[tuple[int, int] | None]:
    """Token ranges of messages from their character ends: message ``i`` covers the
    characters from the previous message's end to its own, and a token belongs to the
    message in which its first character lies."""
    ranges: list[tuple[int, int] | None] = []
    previous: int | None = 0
    for end in ends:
        if end is None or previous is None:
            ranges.append(None)
        else:
            ranges.append((bisect.bisect_left(starts, previous), bisect.bisect_left(starts, end)))
        previous = end
    return ranges


_V = TypeVar("_V")


def _cache_get(cache: OrderedDict[str, _V], key: str) -> _V | None:
    """LRU lookup: a hit becomes the most recently used entry."""
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def _cache_put(cache: OrderedDict[str, _V], key: str, value: _V, limit: int) -> None:
    cache[key] = value
    while len(cache) > limit:
        cache.popitem(last=False)
