"""Seeded synthetic long-context tasks (InfiniteBench-style retrieval and RULER-style needles).

Every generator returns a :class:`Sample` whose ``context`` is sized to a requested number of
tokens, measured with a caller-supplied ``count_tokens`` function (typically
``lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)``). Without one, a rough
``ceil(len(text) / 4)`` estimate is used. The context alone (not the instruction, question or
answer cue added by :func:`make_prompt`) is fitted to ``target_tokens``; subtract the template
overhead from the target if the whole prompt must fit a budget.

Tasks
-----
``passkey``          a 5-digit pass key hidden in repeated filler (InfiniteBench Retrieve.PassKey).
``number_string``    a 10-digit number hidden in repeated filler (InfiniteBench Retrieve.Number).
``kv_retrieval``     a JSON object of UUID key/value pairs; ask the value of one key
                     (InfiniteBench Retrieve.KV).
``niah_single``      one "special magic number" needle (RULER NIAH single).
``niah_multikey``    the target needle plus distractor needles with other keys.
``niah_multivalue``  one key with several values; all must be returned.
``niah_multiquery``  several keys asked at once; all values must be returned.
``variable_tracking`` chains ``VAR A = 12345``, ``VAR B = VAR A`` ... scattered in filler; return
                     every variable that ends up holding the value.

``depth`` (0.0 = start, 1.0 = end) positions the *target* needle (for multi-needle tasks the
first target needle; other needles go to seeded random depths). Depth is measured in characters
of filler preceding the needle, so ``context.index(needle) / len(context)`` is within a fraction
of a percent of ``depth`` for contexts of a few hundred tokens or more.

Same ``(task, seed, options)`` -> same needles/values regardless of length and depth, so a
length x depth grid probes the same facts everywhere.
"""

from __future__ import annotations

import json
import math
import random
import string
import uuid
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ESSAY_SENTENCES",
    "REPEAT_FILLER",
    "SYNTHETIC_TASKS",
    "CountTokens",
    "Sample",
    "answer_cue",
    "approx_token_count",
    "generate",
    "generate_grid",
    "kv_retrieval",
    "make_messages",
    "make_prompt",
    "niah_multikey",
    "niah_multiquery",
    "niah_multivalue",
    "niah_single",
    "number_string",
    "passkey",
    "variable_tracking",
]

CountTokens = Callable[[str], int]
FillerKind = Literal["repeat", "essay"]
KeyType = Literal["words", "numbers", "uuids"]
ValueType = Literal["numbers", "uuids"]


@dataclass(frozen=True)
class Sample:
    """One benchmark item (synthetic or loaded from disk).

    ``length_tokens_target`` is the requested context length for synthetic samples; for loaded
    samples it is ``count_tokens(context)`` when a counter was given, else 0. ``depth`` is the
    relative needle position for synthetic samples and ``-1.0`` (unknown) for loaded ones.
    ``meta`` always holds ``"suite"`` (``"synthetic"``, ``"longbench"`` or ``"infinitebench"``).
    """

    task: str
    context: str
    question: str
    answers: list[str]
    length_tokens_target: int
    depth: float
    meta: dict[str, Any] = field(default_factory=dict)


def approx_token_count(text: str) -> int:
    """Rough token estimate: one token per four characters (rounded up)."""
    return math.ceil(len(text) / 4)


# --------------------------------------------------------------------------------------------
# Filler text
# --------------------------------------------------------------------------------------------

REPEAT_FILLER: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

# Original sentences written for this project: varied, digit-free, no hyphenated words and no
# vocabulary used by the needles, so planted values never collide with filler.
ESSAY_SENTENCES: tuple[str, ...] = (
    "Most cities grew up around rivers because water made trade and farming easier.",
    "A good notebook is less about the paper and more about the habit of opening it.",
    "When a team grows quickly, the informal rules that once worked start to fray.",
    "Bakers often say that patience matters more than any particular recipe.",
    "The first version of anything is usually a sketch of what it could become.",
    "Old maps reveal as much about their makers as about the land they describe.",
    "People tend to overestimate what they can do in a week and underestimate a year.",
    "Gardeners learn early that soil is a living system rather than inert dirt.",
    "A library is quiet not because nothing happens there but because so much does.",
    "Many useful inventions began as tools that someone built for their own problem.",
    "The hardest part of learning an instrument is the stretch where progress feels slow.",
    "Trains changed how people thought about distance long before airplanes did.",
    "Writing clearly forces you to discover what you actually believe.",
    "Small shops survive by knowing their customers better than large chains can.",
    "Mountains make their own weather, which is why forecasts there are so uncertain.",
    "A conversation with a curious child can be more challenging than an exam.",
    "The best teachers remember exactly what it felt like not to understand.",
    "Coffee houses were once the places where news, gossip and ideas all mixed together.",
    "Every software project eventually accumulates code that nobody wants to touch.",
    "Walking is an underrated way to think through a difficult decision.",
    "Markets reward products that solve real problems, though sometimes only after years.",
    "Birds that migrate navigate using the sun, the stars and the magnetic field.",
    "An apprentice learns as much from watching mistakes as from watching successes.",
    "A well designed kitchen puts the things used together close to one another.",
    "Some of the most durable friendships start with a shared inconvenience.",
    "Ideas that sound obviously wrong are occasionally the ones worth testing.",
    "Bridges are designed for the worst day they might see, not the average one.",
    "Translators know that a faithful sentence is not always a literal one.",
    "A budget is really a statement about priorities written in numbers.",
    "Rain on a tin roof sounds louder at night, when everything else is still.",
    "Founders often discover their real product only after building the wrong one first.",
    "The ocean absorbs an enormous amount of heat, which moderates coastal climates.",
    "Good questions are usually more valuable than quick answers.",
    "A city park works best when people can wander into it from every direction.",
    "Checklists help experts most on the days when they feel most confident.",
    "Handwritten letters carry a weight that typed messages rarely match.",
    "The shape of a mug changes how long the drink inside stays warm.",
    "Children invent games with rules more elaborate than many board games.",
    "Forests recover from fire in stages, with different plants taking turns.",
    "An honest review of a failure is worth more than a flattering account of a success.",
    "Lighthouses were once staffed by keepers who lived in near isolation for months.",
    "Learning a second language changes how you notice the grammar of your first.",
    "Most disagreements shrink once both sides describe the problem in the same words.",
    "Street food often tells you more about a place than its formal restaurants.",
    "The quiet hours before dawn are when many writers do their clearest work.",
    "Clocks in public squares once set the rhythm of an entire town.",
    "A sturdy table can outlast several generations of the family that eats at it.",
    "Scientists trust a result more when it survives attempts to break it.",
    "Snow muffles sound because the gaps between flakes trap and scatter noise.",
    "A river delta keeps shifting as the water searches for the easiest path to the sea.",
)

# Two small word lists for readable random keys such as "amber-lantern".
_ADJECTIVES: tuple[str, ...] = (
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly",
    "keen", "lofty", "mellow", "nimble", "opal", "proud", "quiet", "rustic", "silver", "tidy",
    "upbeat", "vivid", "wary", "young", "zesty", "bold", "crisp", "deep", "early", "fuzzy",
)  # fmt: skip
_NOUNS: tuple[str, ...] = (
    "lantern", "harbor", "meadow", "falcon", "pebble", "orchard", "compass", "violin", "canyon",
    "thistle", "kettle", "glacier", "saddle", "beacon", "walnut", "quarry", "ribbon", "anchor",
    "lagoon", "hammock", "pepper", "marble", "otter", "cobalt", "tundra", "summit", "willow",
    "garnet", "juniper", "basalt",
)  # fmt: skip


class _Filler:
    """Deterministic, lazily extended sequence of filler sentences (prefix-stable)."""

    def __init__(self, kind: FillerKind, rng_seed: str) -> None:
        if kind not in ("repeat", "essay"):
            raise ValueError(f"filler must be 'repeat' or 'essay', got {kind!r}")
        self.kind = kind
        self._rng = random.Random(rng_seed)
        self._units: list[str] = []
        self._words = {
            w.strip(".,").lower()
            for s in (REPEAT_FILLER if kind == "repeat" else ESSAY_SENTENCES)
            for w in s.split()
        }

    def take(self, n: int) -> list[str]:
        while len(self._units) < n:
            if self.kind == "repeat":
                self._units.append(REPEAT_FILLER[len(self._units) % len(REPEAT_FILLER)])
            else:
                choice = self._rng.choice(ESSAY_SENTENCES)
                if self._units and choice == self._units[-1]:
                    continue
                self._units.append(choice)
        return self._units[:n]

    def contains_word(self, word: str) -> bool:
        return word.lower() in self._words


# --------------------------------------------------------------------------------------------
# Assembly and length fitting
# --------------------------------------------------------------------------------------------


def _assemble(
    units: Sequence[str],
    inserts: Sequence[tuple[float, str]],
    sep: str = " ",
    prefix: str = "",
    suffix: str = "",
) -> tuple[str, list[int]]:
    """Join ``units`` with ``sep`` and splice each insert at its relative depth.

    Depth is measured over the characters of the filler units; inserts with equal positions
    keep their given order. Returns the text and each insert's start offset (in input order).
    """
    cum = [0]
    for unit in units:
        cum.append(cum[-1] + len(unit) + len(sep))
    total = cum[-1]
    slots: list[tuple[int, int]] = []
    for i, (depth, _) in enumerate(inserts):
        goal = depth * total
        k = bisect_left(cum, goal)
        if k > 0 and (k == len(cum) or goal - cum[k - 1] <= cum[k] - goal):
            k -= 1
        slots.append((min(k, len(units)), i))
    slots.sort()
    pieces: list[str] = []
    offsets = [0] * len(inserts)
    pos = len(prefix)
    emitted = 0
    for k, i in [*slots, (len(units), -1)]:
        while emitted < k:
            if pieces:
                pos += len(sep)
            pieces.append(units[emitted])
            pos += len(units[emitted])
            emitted += 1
        if i < 0:
            break
        if pieces:
            pos += len(sep)
        offsets[i] = pos
        pieces.append(inserts[i][1])
        pos += len(inserts[i][1])
    return prefix + sep.join(pieces) + suffix, offsets


def _fit_units(
    build: Callable[[int], str], count_tokens: CountTokens, target: int, rel_tol: float = 0.005
) -> tuple[int, int]:
    """Find the filler-unit count ``n`` whose ``build(n)`` is closest to ``target`` tokens.

    Uses a bracketed secant/bisection search on the real token count (tokenizers need not be
    additive). Stops early once within ``rel_tol`` of the target. Returns ``(n, tokens)``.
    """
    counts: dict[int, int] = {}

    def measure(n: int) -> int:
        if n not in counts:
            counts[n] = count_tokens(build(n))
        return counts[n]

    t0 = measure(0)
    tol = max(1, int(target * rel_tol))
    if t0 > target + tol:
        raise ValueError(
            f"target_tokens={target} is too small: the needles and scaffolding alone take "
            f"{t0} tokens"
        )
    if abs(t0 - target) <= tol:
        return 0, t0
    lo, t_lo = 0, t0
    hi: int | None = None
    t_hi = 0
    probe = 32
    t_p = measure(probe)
    per_unit = max((t_p - t0) / probe, 1e-3)
    if t_p <= target:
        lo, t_lo = probe, t_p
    else:
        hi, t_hi = probe, t_p
    guess = round((target - t0) / per_unit)
    for step in range(60):
        if hi is not None and hi - lo <= 1:
            break
        if hi is not None:
            if step % 3 == 2:  # periodic bisection guards against slow regula falsi
                guess = (lo + hi) // 2
            guess = min(max(guess, lo + 1), hi - 1)
        else:
            guess = max(guess, lo + 1)
        t = measure(guess)
        if abs(t - target) <= tol:
            return guess, t
        if t <= target:
            lo, t_lo = guess, t
        else:
            hi, t_hi = guess, t
        if hi is None:
            rate = max((t_lo - t0) / lo, 1e-3) if lo else per_unit
            guess = lo + max(1, math.ceil((target - t_lo) / rate))
        else:
            span = max(t_hi - t_lo, 1)
            guess = lo + round((target - t_lo) * (hi - lo) / span)
    best = min(counts, key=lambda n: (abs(counts[n] - target), n))
    return best, counts[best]


def _check_common(target_tokens: int, depth: float) -> None:
    if not isinstance(target_tokens, int) or target_tokens <= 0:
        raise ValueError(f"target_tokens must be a positive int, got {target_tokens!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth!r}")


def _rng(task: str, seed: int | str, salt: str = "") -> random.Random:
    # str seeds are hashed with SHA-512 by `random`, so this is stable across processes.
    return random.Random(f"{task}|{seed}|{salt}")


def _needle_sample(
    *,
    task: str,
    target_tokens: int,
    depth: float,
    seed: int | str,
    count_tokens: CountTokens | None,
    filler: FillerKind,
    needles: Sequence[tuple[float, str]],
    question: str,
    answers: list[str],
    cue: str,
    instruction: str,
    metric: str,
    extra_meta: dict[str, Any],
) -> Sample:
    counter = count_tokens or approx_token_count
    source = _Filler(filler, f"{task}|{seed}|filler")

    def build(n: int) -> str:
        return _assemble(source.take(n), needles)[0]

    n, tokens = _fit_units(build, counter, target_tokens)
    context, offsets = _assemble(source.take(n), needles)
    meta: dict[str, Any] = {
        "suite": "synthetic",
        "seed": seed,
        "filler": filler,
        "instruction": instruction,
        "answer_cue": cue,
        "metric": metric,
        "needles": [text for _, text in needles],
        "needle_depths": [off / max(len(context), 1) for off in offsets],
        "length_tokens_actual": tokens,
        "filler_units": n,
        **extra_meta,
    }
    return Sample(task, context, question, answers, target_tokens, depth, meta)


def _random_digits(rng: random.Random, n_digits: int) -> str:
    return str(rng.randint(10 ** (n_digits - 1), 10**n_digits - 1))


def _random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _distinct(make: Callable[[], str], k: int, taken: set[str] | None = None) -> list[str]:
    seen = set(taken or ())
    out: list[str] = []
    while len(out) < k:
        value = make()
        # Reject values that contain (or are contained in) an already chosen one so that every
        # planted value occurs exactly once as a substring of the context.
        if value in seen or any(value in s or s in value for s in seen):
            continue
        seen.add(value)
        out.append(value)
    return out


def _key_maker(rng: random.Random, key_type: KeyType) -> Callable[[], str]:
    if key_type == "words":
        return lambda: f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    if key_type == "numbers":
        return lambda: _random_digits(rng, 7)
    if key_type == "uuids":
        return lambda: _random_uuid(rng)
    raise ValueError(f"key_type must be 'words', 'numbers' or 'uuids', got {key_type!r}")


def _value_maker(rng: random.Random, value_type: ValueType) -> Callable[[], str]:
    if value_type == "numbers":
        return lambda: _random_digits(rng, 7)
    if value_type == "uuids":
        return lambda: _random_uuid(rng)
    raise ValueError(f"value_type must be 'numbers' or 'uuids', got {value_type!r}")


def _value_noun(value_type: ValueType, plural: bool = False) -> str:
    base = "number" if value_type == "numbers" else "uuid"
    return base + ("s" if plural else "")


def _join_names(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


_HIDDEN_INFO_INSTRUCTION = (
    "Some important information is hidden inside a long stretch of irrelevant text. "
    "Find it and remember it; you will be asked about it afterwards."
)
_NIAH_INSTRUCTION = (
    "A special magic value is hidden somewhere in the following text. "
    "Read it carefully and memorise it; a question about it follows the text."
)


# --------------------------------------------------------------------------------------------
# InfiniteBench-style retrieval
# --------------------------------------------------------------------------------------------


def passkey(
    target_tokens: int,
    depth: float = 0.5,
    seed: int | str = 0,
    count_tokens: CountTokens | None = None,
) -> Sample:
    """A 5-digit pass key hidden at ``depth`` in repeated filler; the answer is the key."""
    _check_common(target_tokens, depth)
    key = _random_digits(_rng("passkey", seed), 5)
    needle = f"The pass key is {key}. Remember it."
    return _needle_sample(
        task="passkey",
        target_tokens=target_tokens,
        depth=depth,
        seed=seed,
        count_tokens=count_tokens,
        filler="repeat",
        needles=[(depth, needle)],
        question="What is the pass key?",
        answers=[key],
        cue="The pass key is",
        instruction=_HIDDEN_INFO_INSTRUCTION,
        metric="passkey",
        extra_meta={},
    )


def number_string(
    target_tokens: int,
    depth: float = 0.5,
    seed: int | str = 0,
    count_tokens: CountTokens | None = None,
) -> Sample:
    """A 10-digit number hidden at ``depth`` in repeated filler; the answer is the number."""
    _check_common(target_tokens, depth)
    number = _random_digits(_rng("number_string", seed), 10)
    needle = f"The sequence of digits is {number}. Remember it."
    return _needle_sample(
        task="number_string",
        target_tokens=target_tokens,
        depth=depth,
        seed=seed,
        count_tokens=count_tokens,
        filler="repeat",
        needles=[(depth, needle)],
        question="What is the sequence of digits?",
        answers=[number],
        cue="The sequence of digits is",
        instruction=_HIDDEN_INFO_INSTRUCTION,
        metric="number_string",
        extra_meta={},
    )


def kv_retrieval(
    target_tokens: int,
    depth: float = 0.5,
    seed: int | str = 0,
    count_tokens: CountTokens | None = None,
) -> Sample:
    """A JSON object of random UUID pairs; ask for the value of the key placed at ``depth``.

    The context is valid JSON (``json.loads(sample.context)`` works). Distractor pairs are a
    prefix-stable seeded stream, so the same seed gives the same pairs at every length.
    """
    _check_common(target_tokens, depth)
    counter = count_tokens or approx_token_count
    rng = _rng("kv_retrieval", seed)
    key, value = _random_uuid(rng), _random_uuid(rng)
    target_unit = f"{json.dumps(key)}: {json.dumps(value)}"
    pair_rng = _rng("kv_retrieval", seed, "pairs")
    pairs: list[str] = []
    used = {key, value}

    def take(n: int) -> list[str]:
        while len(pairs) < n:
            k, v = _random_uuid(pair_rng), _random_uuid(pair_rng)
            if k in used or v in used or k == v:
                continue
            used.update((k, v))
            pairs.append(f"{json.dumps(k)}: {json.dumps(v)}")
        return pairs[:n]

    def build(n: int) -> str:
        return _assemble(take(n), [(depth, target_unit)], sep=", ", prefix="{", suffix="}")[0]

    n, tokens = _fit_units(build, counter, target_tokens)
    context, offsets = _assemble(take(n), [(depth, target_unit)], ", ", "{", "}")
    question = f'What is the value associated with the key "{key}" in the JSON object above?'
    meta: dict[str, Any] = {
        "suite": "synthetic",
        "seed": seed,
        "filler": "json",
        "instruction": "Extract the value corresponding to the specified key in the JSON object "
        "below.",
        "answer_cue": "The value associated with the specified key is",
        "metric": "kv_retrieval",
        "key": key,
        "needles": [target_unit],
        "needle_depths": [offsets[0] / len(context)],
        "num_pairs": n + 1,
        "length_tokens_actual": tokens,
        "filler_units": n,
    }
    return Sample("kv_retrieval", context, question, [value], target_tokens, depth, meta)


# --------------------------------------------------------------------------------------------
# RULER-style needles
# --------------------------------------------------------------------------------------------


def _magic_needle(key: str, value: str, value_type: ValueType) -> str:
    return f"Remember this: the special magic {_value_noun(value_type)} for {key} is {value}."


def _magic_needles(
    depths: Sequence[float], keys: Sequence[str], values: Sequence[str], value_type: ValueType
) -> list[tuple[float, str]]:
    return [
        (d, _magic_needle(k, v, value_type)) for d, k, v in zip(depths, keys, values, strict=True)
    ]


def niah_single(
    target_tokens: int,
    depth: float = 0.5,
    seed: int | str = 0,
    count_tokens: CountTokens | None = None,
    *,
    filler: FillerKind = "essay",
    key_type: KeyType = "words",
    value_type: ValueType = "numbers",
) -> Sample:
    """One needle ``the special magic number for <key> is <value>`` at ``depth``."""
    _check_common(target_tokens, depth)
    rng = _rng("niah_single", seed)
    key = _key_maker(rng, key_type)()
    value = _value_maker(rng, value_type)()
    noun = _value_noun(value_type)
    return _needle_sample(
        task="niah_single",
        target_tokens=target_tokens,
        depth=depth,
        seed=seed,
        count_tokens=count_tokens,
        filler=filler,
        needles=[(depth, _magic_needle(key, value, value_type))],
        question=f"What is the special magic {noun} for {key} mentioned in the provided text?",
        answers=[value],
        cue=f"The special magic {noun} for {key} mentioned in the provided text is",
        instruction=_NIAH_INSTRUCTION,
        metric="string_match_all",
        extra_meta={"keys": [key], "key_type": key_type, "value_type": value_type},
    )


def niah_multikey(
    target_tokens: int,
    depth: float = 0.5,
    seed: int | str = 0,
    count_tokens: CountTokens | None = None,
    *,
    num_distractors: int = 3,
    filler: FillerKind = "essay",
    key_type: KeyType = "words",
    value_type: ValueType = "numbers",
) -> Sample:
    """The target needle at ``depth`` plus ``num_distractors`` needles with other keys."""
    _check_common(target_tokens, depth)
    if num_distractors < 0:
        raise ValueError("num_distractors must be >= 0")
    rng = _rng("niah_multikey", seed)
    keys = _distinct(_key_maker(rng, key_type), 1 + num_distractors)
    values = _distinct(_value_maker(rng, value_type), 1 + num_distractors, set(keys))
    depths = [depth] + [rng.random() for _ in range(num_distractors)]
    needles = _magic_needles(depths, keys, values, value_type)
    noun = _value_noun(value_type)
    key = keys[0]
    return _needle_sample(
        task="niah_multikey",
        target_tokens=target_tokens,
        depth=depth,
        seed=seed,
        count_tokens=count_tokens,
        filler=filler,
        needles=needles,
        question=f"What is the special magic {noun} for {key} mentioned in the provided text?",
        answers=[values[0]],
        cue=f"The special magic {noun} for {key} mentioned in the provided text is",
        instruction=_NIAH_INSTRUCTION,
        metric="string_match_all",
        extra_meta={
            "keys": keys,
            "distractor_values": values[1:],
            "key_type": key_type,
            "value_type": value_type,
        },
    )


def niah_multivalue(
    target_tokens: int,
    depth: float = 0.5,
    seed: int | str = 0,
    count_tokens: CountTokens | None = None,
    *,
    num_values: int = 4,
    filler: FillerKind = "essay",
    key_type: KeyType = "words",
    value_type: ValueType = "numbers",
) -> Sample:
    """One key with ``num_values`` values; the first at ``depth``, the rest at random depths."""
    _check_common(target_tokens, depth)
    if num_values < 1:
        raise ValueError("num_values must be >= 1")
    rng = _rng("niah_multivalue", seed)
    key = _key_maker(rng, key_type)()
    values = _distinct(_value_maker(rng, value_type), num_values, {key})
    depths = [depth] + [rng.random() for _ in range(num_values - 1)]
    needles = [(d, _magic_needle(key, v, value_type)) for d, v in zip(depths, values, strict=True)]
    nouns = _value_noun(value_type, plural=True)
    return _needle_sample(
        task="niah_multivalue",
        target_tokens=target_tokens,
        depth=depth,
        seed=seed,
        count_tokens=count_tokens,
        filler=filler,
        needles=needles,
        question=f"What are all the special magic {nouns} for {key} mentioned in the provided "
        "text?",
        answers=values,
        cue=f"The special magic {nouns} for {key} mentioned in the provided text are",
        instruction=_NIAH_INSTRUCTION,
        metric="string_match_all",
        extra_meta={"keys": [key], "key_type": key_type, "value_type": value_type},
    )


def niah_multiquery(
    target_tokens: int,
    depth: float = 0.5,
    seed: int | str = 0,
    count_tokens: CountTokens | None = None,
    *,
    num_queries: int = 4,
    filler: FillerKind = "essay",
    key_type: KeyType = "words",
    value_type: ValueType = "numbers",
) -> Sample:
    """``num_queries`` needles with distinct keys, all asked at once; answers in key order."""
    _check_common(target_tokens, depth)
    if num_queries < 1:
        raise ValueError("num_queries must be >= 1")
    rng = _rng("niah_multiquery", seed)
    keys = _distinct(_key_maker(rng, key_type), num_queries)
    values = _distinct(_value_maker(rng, value_type), num_queries, set(keys))
    depths = [depth] + [rng.random() for _ in range(num_queries - 1)]
    needles = _magic_needles(depths, keys, values, value_type)
    nouns = _value_noun(value_type, plural=True)
    names = _join_names(keys)
    return _needle_sample(
        task="niah_multiquery",
        target_tokens=target_tokens,
        depth=depth,
        seed=seed,
        count_tokens=count_tokens,
        filler=filler,
        needles=needles,
        question=f"What are the special magic {nouns} for {names} mentioned in the provided text?",
        answers=values,
        cue=f"The special magic {nouns} for {names} mentioned in the provided text are",
        instruction=_NIAH_INSTRUCTION,
        metric="string_match_all",
        extra_meta={"keys": keys, "key_type": key_type, "value_type": value_type},
    )


def variable_tracking(
    target_tokens: int,
    depth: float = 0.5,
    seed: int | str = 0,
    count_tokens: CountTokens | None = None,
    *,
    num_hops: int = 4,
    num_chains: int = 1,
    filler: FillerKind = "repeat",
) -> Sample:
    """Variable-assignment chains hidden in filler; answer every variable holding the value.

    The target chain ``VAR A = 12345.``, ``VAR B = VAR A.`` ... has ``num_hops + 1`` variables.
    Its first statement sits at ``depth`` and the following hops at sorted random depths in
    ``[depth, 1]`` so the chain always reads forwards. ``num_chains - 1`` distractor chains with
    other values are placed at sorted random depths anywhere.
    """
    _check_common(target_tokens, depth)
    if num_hops < 0 or num_chains < 1:
        raise ValueError("num_hops must be >= 0 and num_chains >= 1")
    rng = _rng("variable_tracking", seed)
    source = _Filler(filler, "names")

    def make_name() -> str:
        while True:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if not source.contains_word(name):
                return name

    names = _distinct(make_name, num_chains * (num_hops + 1))
    values = _distinct(lambda: _random_digits(rng, 5), num_chains, set(names))
    needles: list[tuple[float, str]] = []
    chains: list[list[str]] = []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        chains.append(chain)
        if c == 0:
            depths = [depth, *sorted(depth + (1.0 - depth) * rng.random() for _ in chain[1:])]
        else:
            depths = sorted(rng.random() for _ in chain)
        statements = [f"VAR {chain[0]} = {values[c]}."]
        statements += [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, len(chain))]
        needles.extend(zip(depths, statements, strict=True))
    value = values[0]
    return _needle_sample(
        task="variable_tracking",
        target_tokens=target_tokens,
        depth=depth,
        seed=seed,
        count_tokens=count_tokens,
        filler=filler,
        needles=needles,
        question=f"Find all variables that are assigned the value {value} in the text above, "
        "directly or through other variables.",
        answers=list(chains[0]),
        cue=f"The variables that end up holding the value {value} are:",
        instruction="Memorise every variable assignment in the following text; a question "
        "about them follows.",
        metric="string_match_all",
        extra_meta={"value": value, "chains": chains, "chain_values": values},
    )


SYNTHETIC_TASKS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey,
    "number_string": number_string,
    "kv_retrieval": kv_retrieval,
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "variable_tracking": variable_tracking,
}


def generate(
    task: str,
    target_tokens: int,
    depth: float = 0.5,
    seed: int | str = 0,
    count_tokens: CountTokens | None = None,
    **options: Any,
) -> Sample:
    """Dispatch to the generator named ``task`` (see :data:`SYNTHETIC_TASKS`)."""
    try:
        fn = SYNTHETIC_TASKS[task]
    except KeyError:
        raise KeyError(
            f"unknown synthetic task {task!r}; choose from {sorted(SYNTHETIC_TASKS)}"
        ) from None
    return fn(target_tokens, depth, seed, count_tokens, **options)


def generate_grid(
    tasks: Iterable[str],
    lengths: Iterable[int],
    depths: Iterable[float],
    *,
    samples_per_cell: int = 1,
    seed: int | str = 0,
    count_tokens: CountTokens | None = None,
    **options: Any,
) -> Iterator[Sample]:
    """Yield samples for every ``task x length x depth x repeat`` cell.

    Repeat ``i`` uses seed ``f"{seed}-{i}"`` so cells at different lengths/depths share needles.
    ``options`` are forwarded to every generator (only pass options all listed tasks accept).
    """
    lengths, depths = list(lengths), list(depths)
    for task in tasks:
        for length in lengths:
            for depth in depths:
                for i in range(samples_per_cell):
                    yield generate(task, length, depth, f"{seed}-{i}", count_tokens, **options)


# --------------------------------------------------------------------------------------------
# Prompt rendering
# --------------------------------------------------------------------------------------------

_LONGBENCH_SUMMARY = {"gov_report", "qmsum", "multi_news", "vcsum", "samsum"}
_LONGBENCH_CODE = {"lcc", "repobench-p"}

_DEFAULT_INSTRUCTIONS: dict[str, str] = {
    "passkey": _HIDDEN_INFO_INSTRUCTION,
    "number_string": _HIDDEN_INFO_INSTRUCTION,
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object "
    "below.",
    "longbook_qa_eng": "Read the book below and answer the question that follows.",
    "longbook_sum_eng": "Summarise the book below.",
    "longbook_choice_eng": "Read the book below and answer the multiple-choice question that "
    "follows.",
    "longdialogue_qa_eng": "Below is a dialogue script in which one character's name has been "
    "replaced by $$MASK$$. Work out which character it is.",
    "code_debug": "One of the functions in the code below contains a deliberate error. "
    "Identify it.",
    "code_run": "Read the code below and work out the value it computes.",
    "math_find": "Read the list of numbers below and answer the question about it.",
    "math_calc": "Compute the running result of the arithmetic expression below.",
}
_DEFAULT_CUES: dict[str, str] = {
    "passkey": "The pass key is",
    "number_string": "The sequence of digits is",
    "kv_retrieval": "The value associated with the specified key is",
    "longbook_choice_eng": "The correct option is",
    "longdialogue_qa_eng": "The masked character is",
    "trec": "Type:",
}


def answer_cue(sample: Sample) -> str:
    """The answer prefix appended in ``plain`` style (e.g. ``"The pass key is"``)."""
    cue = sample.meta.get("answer_cue")
    if isinstance(cue, str):
        return cue
    if sample.task in _DEFAULT_CUES:
        return _DEFAULT_CUES[sample.task]
    if sample.task in _LONGBENCH_SUMMARY:
        return "Summary:"
    if sample.task in _LONGBENCH_CODE:
        return "Next line of code:"
    return "Answer:"


def _instruction(sample: Sample) -> str:
    instr = sample.meta.get("instruction")
    if isinstance(instr, str):
        return instr
    if sample.task in _DEFAULT_INSTRUCTIONS:
        return _DEFAULT_INSTRUCTIONS[sample.task]
    if sample.task in _LONGBENCH_SUMMARY:
        return "Read the material below; you will be asked to summarise it."
    if sample.task in _LONGBENCH_CODE:
        return "Complete the code below with its next line."
    if sample.task == "trec":
        return "Classify the type of the question at the end, following the examples below."
    if sample.task == "passage_count":
        return "Below are several paragraphs, some of which may be duplicates of each other."
    if sample.task.startswith("passage_retrieval"):
        return "Below are several numbered paragraphs, followed by an abstract."
    return "Read the text below and answer the question that follows."


def _question_text(sample: Sample) -> str:
    options = sample.meta.get("options")
    q = sample.question.strip()
    if sample.task == "passage_count" and not q:
        q = "How many unique paragraphs are there after removing duplicates? Answer with a number."
    elif sample.task.startswith("passage_retrieval"):
        q = f"Abstract: {q}\nWhich paragraph is this abstract from? Answer like 'Paragraph N'."
    elif not q and sample.task in _LONGBENCH_SUMMARY:
        q = "Write a concise summary of the material above."
    if isinstance(options, list) and options:
        letters = string.ascii_uppercase
        q += "\n" + "\n".join(f"{letters[i]}. {opt}" for i, opt in enumerate(options))
    return q


def make_prompt(sample: Sample, style: Literal["plain", "chat"] = "plain") -> str:
    """Render ``sample`` as a single text prompt.

    ``plain``: completion style, ending with the answer cue so a base model continues with the
    answer (``"...What is the pass key?\\nThe pass key is"``).
    ``chat``: the content of one user message (no cue; it asks for a short answer that starts
    with the cue) for use with a chat template. Code-completion tasks keep the code last.
    """
    if style not in ("plain", "chat"):
        raise ValueError(f"style must be 'plain' or 'chat', got {style!r}")
    instruction = _instruction(sample)
    question = _question_text(sample)
    cue = answer_cue(sample)
    if sample.task in _LONGBENCH_CODE:
        body = f"{instruction}\n\n{sample.context}"
        if sample.question.strip():
            body += f"\n{sample.question}"
        if not body.endswith("\n"):
            body += "\n"
        return f"{body}{cue}\n" if style == "plain" else body
    parts = [instruction, sample.context]
    if question:
        parts.append(question)
    body = "\n\n".join(parts)
    if style == "plain":
        return f"{body}\n{cue}"
    return f'{body}\n\nAnswer briefly, starting with "{cue}".'


def make_messages(sample: Sample) -> list[dict[str, str]]:
    """A one-turn chat (``[{"role": "user", "content": make_prompt(sample, "chat")}]``)."""
    return [{"role": "user", "content": make_prompt(sample, "chat")}]
