"""Document reader: read a long generated report page by page, then answer questions
whose answers are on pages far outside the engine's attention span.

The report (a port authority's yearly report) is generated from a seed: pages of
filler prose with a few planted facts (an access code, a person, a capacity ...), each
on an early page. The agent reads every page through ``read_page(n)``; then each
question is a new user turn answered from memory (the tool is closed by then). The
local window plus the retrieved blocks cover a small part of the report, so the facts
must come back through InfLLM's block retrieval.

Run: ``python -m agents.document_reader --config config/agents-cpu.yaml --size small``
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from langchain_core.tools import BaseTool, tool

from agents.common import (
    FINISH_WORD,
    AgentTask,
    Guide,
    PlannedCall,
    Question,
    Score,
    approx_tokens,
    main_for,
    score_answers,
)

NAME = "document_reader"
DESCRIPTION = "Read a generated report page by page, then answer questions from memory."


@dataclass(frozen=True)
class SizeSpec:
    pages: int
    words_per_page: int
    questions: int


SIZES: dict[str, SizeSpec] = {
    # for tests: a handful of short pages
    "tiny": SizeSpec(pages=4, words_per_page=110, questions=2),
    # CPU demo: 3-4x the attention span of config/agents-cpu.yaml (2112 tokens)
    "small": SizeSpec(pages=8, words_per_page=600, questions=3),
    "medium": SizeSpec(pages=40, words_per_page=400, questions=6),
    # GPU: several times Qwen2.5's native 32K window
    "large": SizeSpec(pages=160, words_per_page=520, questions=8),
    # about twice Qwen2.5's native 32K window (~64K tokens): beyond-the-window checks
    "beyond": SizeSpec(pages=88, words_per_page=500, questions=6),
}

# ============================================================================ generator

_PORTS = ["Varnholm", "Ostrava Bay", "Kellmouth", "Saltrige", "Brennfjord", "Lowmarsh"]
_FACT_PEOPLE = ["Ilse Varga", "Tomas Okafor", "Greta Lindqvist", "Rafael Quintero",
                "Amara Nwosu", "Henrik Dahl", "Sofia Marchetti", "Yusuf Demir"]
_PLACES = ["east warehouse", "north archive", "fuel depot", "customs vault", "signal tower"]
_SHIPS = ["Aurora", "Kestrel", "Morning Star", "Sea Lantern", "Tern", "Halcyon"]
_COMPANIES = ["Halvorsen Steel", "Brightwater Cranes", "Nordkapp Marine", "Castellan Works"]
_PETS = ["Biscuit", "Pepper", "Admiral", "Juniper", "Marlow", "Whiskers"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]

_FILLER_PEOPLE = ["the deputy clerk", "a senior pilot", "the safety officer", "the treasurer",
                  "an external auditor", "the dredging foreman", "the union delegate"]
_TEAMS = ["maintenance crews", "survey teams", "pilot boats", "dock workers", "inspectors",
          "cleaning contractors", "night watch teams"]
_VERBS = ["inspected", "repainted", "replaced", "counted", "repaired", "surveyed", "logged"]
_OBJECTS = ["buoys", "mooring lines", "fenders", "bollards", "lamp posts", "drain covers",
            "ladders", "gangways", "tide gauges"]
_AREAS = ["northern channel", "inner basin", "old quay", "ferry terminal", "breakwater",
          "container yard", "fishing harbour", "southern slipway"]
_TOPICS = ["silt levels near the river mouth", "the cost of winter heating",
           "seagull nesting on the roofs", "queues at the ticket office",
           "rust on the railway bridge", "lighting along the promenade",
           "noise from the night shift", "parking for visiting crews"]
_OUTCOMES = ["the matter was postponed to the next meeting", "a small budget was approved",
             "a working group was formed", "no action was needed this year",
             "the contractor agreed to return in spring", "the board asked for a second quote"]
_SECTIONS = ["Operations", "Maintenance", "Finance", "Safety", "Community", "Environment",
             "Staff", "Traffic", "Infrastructure", "Outlook"]


@dataclass(frozen=True)
class Fact:
    page: int
    sentence: str
    question: str
    answer: str
    kind: str


@dataclass(frozen=True)
class Document:
    title: str
    pages: list[str]
    facts: list[Fact]

    @property
    def text(self) -> str:
        return "\n\n".join(self.pages)


def _number(rng: random.Random, low: int, high: int, avoid: set[str]) -> int:
    """A random number in ``[low, high]`` that is not a planted answer."""
    while True:
        value = rng.randint(low, high)
        if str(value) not in avoid:
            return value


def _month(rng: random.Random, avoid: set[str]) -> str:
    return rng.choice([m for m in _MONTHS if m not in avoid])


def _filler_sentence(rng: random.Random, avoid: set[str]) -> str:
    pick = rng.randrange(4)
    if pick == 0:
        return (f"During {_month(rng, avoid)} the {rng.choice(_TEAMS)} {rng.choice(_VERBS)} "
                f"{_number(rng, 2, 99, avoid)} {rng.choice(_OBJECTS)} along the "
                f"{rng.choice(_AREAS)}.")
    if pick == 1:
        return (f"At the {_month(rng, avoid)} meeting {rng.choice(_FILLER_PEOPLE)} raised "
                f"{rng.choice(_TOPICS)}, and {rng.choice(_OUTCOMES)}.")
    if pick == 2:
        return (f"Work at the {rng.choice(_AREAS)} took {_number(rng, 2, 40, avoid)} days "
                f"longer than planned because of {rng.choice(_TOPICS)}.")
    return (f"The {rng.choice(_TEAMS)} reported {_number(rng, 2, 60, avoid)} minor incidents "
            f"near the {rng.choice(_AREAS)}; none of them was serious.")


def _make_facts(rng: random.Random, port: str) -> list[tuple[str, str, str, str]]:
    """Candidate facts as ``(sentence, question, answer, kind)``; kinds: number / name."""
    place = rng.choice(_PLACES)
    code = str(rng.randint(1000, 9999))
    master = rng.choice(_FACT_PEOPLE)
    ship = rng.choice(_SHIPS)
    capacity = str(rng.randint(120, 980))
    company = rng.choice(_COMPANIES)
    pier = str(rng.randint(11, 49))
    pet = rng.choice(_PETS)
    month = rng.choice(_MONTHS)
    channel = str(rng.randint(50, 89))
    keeper = rng.choice([p for p in _FACT_PEOPLE if p != master])
    return [
        (f"The access code of the {place} is {code}.",
         f"What is the access code of the {place}?", code, "number"),
        (f"The harbour master of {port} is {master}.",
         f"Who is the harbour master of {port}?", master, "person"),
        (f"The ferry {ship} can carry {capacity} passengers.",
         f"How many passengers can the ferry {ship} carry?", capacity, "number"),
        (f"The new harbour crane was bought from {company}.",
         "Which company sold the new harbour crane?", company, "company"),
        (f"After the spring storm, pier {pier} was closed for repairs.",
         "Which pier was closed for repairs after the spring storm?", pier, "number"),
        (f"The lighthouse cat is named {pet}.",
         "What is the name of the lighthouse cat?", pet, "pet"),
        (f"The harbour festival is held every year in {month}.",
         "In which month is the harbour festival held?", month, "month"),
        (f"The emergency radio channel of the port is channel {channel}.",
         "Which radio channel is the port's emergency channel?", channel, "number"),
        (f"The lighthouse keeper is {keeper}.",
         "Who is the lighthouse keeper?", keeper, "person"),
    ]


def generate_document(size: str | SizeSpec = "small", seed: int = 0) -> Document:
    """A seeded report: ``spec.pages`` pages, facts planted in the first half."""
    spec = SIZES[size] if isinstance(size, str) else size
    if spec.pages < 2:
        raise ValueError("a document needs at least 2 pages")
    rng = random.Random(seed)
    port = rng.choice(_PORTS)
    candidates = _make_facts(rng, port)
    rng.shuffle(candidates)
    chosen = candidates[: min(spec.questions, len(candidates))]
    # Facts go on the first half of the report (page 1 included), so every answer is
    # at least half the report away when the questions come.
    early = list(range(1, max(2, spec.pages // 2 + 1)))
    fact_pages = sorted(rng.sample(early, len(chosen))) if len(chosen) <= len(early) else [
        early[i % len(early)] for i in range(len(chosen))
    ]
    facts = [
        Fact(page=page, sentence=s, question=q, answer=a, kind=k)
        for page, (s, q, a, k) in zip(fact_pages, chosen, strict=True)
    ]
    title = f"Yearly report of the Port of {port}"
    avoid = {fact.answer for fact in facts}
    pages: list[str] = []
    for number in range(1, spec.pages + 1):
        sentences: list[str] = []
        words = 0
        while words < spec.words_per_page:
            sentence = _filler_sentence(rng, avoid)
            sentences.append(sentence)
            words += len(sentence.split())
        for fact in facts:
            if fact.page == number:
                sentences.insert(rng.randrange(len(sentences) + 1), fact.sentence)
        section = _SECTIONS[(number - 1) % len(_SECTIONS)]
        paragraphs = [" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5)]
        pages.append(f"{title} - {section}\n\n" + "\n\n".join(paragraphs))
    return Document(title=title, pages=pages, facts=facts)


def questions_for(document: Document) -> list[Question]:
    """One question per planted fact; values of other facts of the same kind distract."""
    result = []
    for fact in document.facts:
        others = tuple(
            f.answer for f in document.facts if f.kind == fact.kind and f.answer != fact.answer
        )
        result.append(
            Question(
                prompt=fact.question,
                answer=fact.answer,
                distractors=others,
                source=PlannedCall("read_page", {"n": fact.page}),
            )
        )
    return result


def score(document: Document, answers: Sequence[str]) -> Score:
    """Score final answers (in question order) against the planted facts."""
    return score_answers(questions_for(document), answers)


# ============================================================================ agent


def make_read_page(document: Document, guide: Guide) -> BaseTool:
    """The ``read_page(n)`` tool over ``document``; every result names the next call."""
    total = len(document.pages)

    @tool
    def read_page(n: int) -> str:
        """Read page n (1-based) of the report."""
        if guide.closed:
            return guide.closed_message()
        guide.record("read_page", {"n": n})
        if not 1 <= n <= total:
            return f"There is no page {n}; the report has pages 1 to {total}. {guide.hint()}"
        return f"Page {n} of {total}\n\n{document.pages[n - 1]}\n\n[end of page {n}] {guide.hint()}"

    return read_page


def build_task(size: str | SizeSpec = "small", seed: int = 0) -> AgentTask:
    """The reading task for ``size`` and ``seed``."""
    document = generate_document(size, seed)
    total = len(document.pages)
    guide = Guide(
        [PlannedCall("read_page", {"n": n}) for n in range(1, total + 1)],
        finish_hint=f"That was the last page. Reply with the single word {FINISH_WORD}.",
    )
    system = (
        "You read a long report one page at a time with the read_page tool, one call per "
        "reply. Read every page in order, starting with page 1; each page ends with the "
        "next call to make. Remember the facts you read: you will be asked about them "
        f"later, when the tool is closed. When a page says so, reply with {FINISH_WORD}."
    )
    return AgentTask(
        name=NAME,
        system_prompt=system,
        tools=[make_read_page(document, guide)],
        start_message=(
            f"Read the report '{document.title}' ({total} pages). "
            "Start with read_page with n=1."
        ),
        guide=guide,
        questions=questions_for(document),
        info={
            "title": document.title,
            "pages": total,
            "approx_tokens": approx_tokens(document.text),
            "fact_pages": [f.page for f in document.facts],
        },
    )


def _make_task(size: str, seed: int, out: Path) -> AgentTask:
    return build_task(size, seed)


def main(argv: Sequence[str] | None = None) -> int:
    entry: Callable[..., int] = main_for
    return entry(NAME, DESCRIPTION, SIZES, _make_task, argv)


if __name__ == "__main__":
    sys.exit(main())
