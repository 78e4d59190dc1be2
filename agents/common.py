"""Shared machinery of the demo agents: questions and scoring, the guided plan, the run
loop with per-step progress, retrieval tracing and the command line.

An agent run has two phases on one LangGraph thread (so one engine session):

1. **reading**: the model works through a plan of tool calls (read a page, read a file,
   grep ...). Every tool result ends with a hint naming the next planned call, so a
   small model stays on track, but the model itself makes every call.
2. **questions**: each question is a new user turn on the same thread. Tools stay bound,
   but they are closed ("answer from memory"), so the answer has to come from the
   context memory: the facts were read many steps and thousands of tokens earlier.

The scorer reads only the model's final answer of each question turn.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.tools import BaseTool

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
DEFAULT_CONFIG = "config/agents-cpu.yaml"
DEFAULT_MAX_TOKENS = 64
FINISH_WORD = "DONE"

# ============================================================================ text


def approx_tokens(text: str) -> int:
    """Rough token count of English text (about 4 characters per token for BPE tokenizers)."""
    return max(1, round(len(text) / 4))


def normalise(text: str) -> str:
    """Lower case, punctuation that is not part of a value turned to spaces, spaces collapsed."""
    flat = re.sub(r"[^a-z0-9_./-]+", " ", text.lower())
    return " ".join(flat.split())


def mentions(text: str, value: str) -> bool:
    """Whether ``value`` appears in ``text`` as a whole word sequence (case-insensitive)."""
    needle = normalise(value)
    if not needle:
        return False
    pattern = r"(?<![a-z0-9_])" + re.escape(needle).replace(r"\ ", r"\s+") + r"(?![a-z0-9_])"
    return re.search(pattern, normalise(text)) is not None


# ============================================================================ questions


@dataclass(frozen=True)
class PlannedCall:
    """One tool call of the reading plan."""

    tool: str
    args: Mapping[str, Any]

    def describe(self) -> str:
        """``read_page with n=3`` (the wording the hints use)."""
        shown = ", ".join(f"{key}={value!r}" for key, value in self.args.items())
        return f"{self.tool} with {shown}" if shown else self.tool

    def matches(self, tool: str, args: Mapping[str, Any]) -> bool:
        if tool != self.tool:
            return False
        return all(str(args.get(key)).strip() == str(value) for key, value in self.args.items())


@dataclass(frozen=True)
class Question:
    """A question whose answer is one planted value.

    An answer counts as correct when it mentions ``answer`` and none of ``distractors``
    (values of the same kind planted elsewhere), so listing every candidate scores 0.
    """

    prompt: str
    answer: str
    distractors: tuple[str, ...] = ()
    source: PlannedCall | None = None
    """The planned call whose result holds the fact (for the distance report)."""


@dataclass(frozen=True)
class Verdict:
    question: str
    expected: str
    answer: str
    correct: bool
    reason: str


@dataclass(frozen=True)
class Score:
    correct: int
    total: int
    verdicts: tuple[Verdict, ...]

    @property
    def fraction(self) -> float:
        return self.correct / self.total if self.total else 0.0


def score_answer(question: Question, answer: str) -> Verdict:
    """Judge one answer (see :class:`Question`)."""
    wrong = [d for d in question.distractors if d != question.answer and mentions(answer, d)]
    if not mentions(answer, question.answer):
        reason = f"names {wrong[0]!r} instead" if wrong else "expected value missing"
        correct = False
    elif wrong:
        reason = f"also names {', '.join(map(repr, wrong))}"
        correct = False
    else:
        reason = "ok"
        correct = True
    return Verdict(question.prompt, question.answer, answer, correct, reason)


def score_answers(questions: Sequence[Question], answers: Sequence[str]) -> Score:
    """Score the final answers, one per question (missing answers count as wrong)."""
    padded = list(answers) + [""] * (len(questions) - len(answers))
    verdicts = tuple(score_answer(q, a) for q, a in zip(questions, padded, strict=False))
    return Score(sum(v.correct for v in verdicts), len(questions), verdicts)


# ============================================================================ guide


class Guide:
    """Tracks the reading plan: which planned calls were made and what to call next."""

    def __init__(self, plan: Sequence[PlannedCall], finish_hint: str | None = None) -> None:
        if not plan:
            raise ValueError("the reading plan is empty")
        self.plan = list(plan)
        self.done = [False] * len(self.plan)
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.closed = False
        self.finish_hint = finish_hint or (
            f"That was the last step of the plan. Reply with the single word {FINISH_WORD}."
        )

    @property
    def complete(self) -> bool:
        return all(self.done)

    @property
    def progress(self) -> int:
        return sum(self.done)

    def record(self, tool: str, args: Mapping[str, Any]) -> None:
        """Note a call the model made (it may deviate from the plan; that is fine)."""
        self.calls.append((tool, dict(args)))
        for index, planned in enumerate(self.plan):
            if not self.done[index] and planned.matches(tool, args):
                self.done[index] = True
                break

    def hint(self) -> str:
        """The line appended to every tool result while reading."""
        for index, planned in enumerate(self.plan):
            if not self.done[index]:
                return f"Next call: {planned.describe()}. (step {index + 1} of {len(self.plan)})"
        return self.finish_hint

    def closed_message(self) -> str:
        return (
            "The tools are closed now: the reading is over. Answer the user's question "
            "from what you read earlier, in one short sentence, without calling a tool."
        )


# ============================================================================ task


@dataclass
class AgentTask:
    """Everything one run needs: tools, prompts, plan and questions."""

    name: str
    system_prompt: str
    tools: list[BaseTool]
    start_message: str
    guide: Guide
    questions: list[Question]
    question_template: str = (
        "Question about what you read: {question} Answer from memory in one short "
        "sentence. Do not call any tool."
    )
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def expected_steps(self) -> int:
        # one model call per planned tool call, one to say DONE, one per question
        return len(self.guide.plan) + 1 + len(self.questions)


# ============================================================================ run


@dataclass
class StepRecord:
    """One model call as the run saw it (from the AIMessage's metadata)."""

    index: int
    phase: str
    input_tokens: int
    cache_read: int
    cache_creation: int
    output_tokens: int
    context_tokens: int
    retrievals: int
    tool_calls: list[str]
    text: str
    seconds: float

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class RunResult:
    task: str
    model: str
    config: dict[str, Any]
    attention_span: int
    steps: list[StepRecord]
    answers: list[str]
    score: Score
    distances: list[int | None]
    plan_completed: int
    plan_length: int
    tool_calls: int
    seconds: float
    trace_path: str | None
    info: dict[str, Any]

    @property
    def context_tokens(self) -> int:
        return max((s.context_tokens for s in self.steps), default=0)

    @property
    def tokens_reused(self) -> int:
        return sum(s.cache_read for s in self.steps)

    @property
    def tokens_computed(self) -> int:
        return sum(s.cache_creation for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["score"] = {
            "correct": self.score.correct,
            "total": self.score.total,
            "fraction": self.score.fraction,
            "verdicts": [asdict(v) for v in self.score.verdicts],
        }
        data["context_tokens"] = self.context_tokens
        data["tokens_reused"] = self.tokens_reused
        data["tokens_computed"] = self.tokens_computed
        data["history_reused"] = history_reused(self.steps)
        return data


def history_reused(steps: Sequence[StepRecord]) -> bool:
    """Whether every step reused all the previous step held (prompt plus generation)."""
    return all(
        later.cache_read >= earlier.total_tokens
        for earlier, later in itertools.pairwise(steps)
    )


def attention_span(config: Any) -> int:
    """Tokens one query attends at most: sinks + local window + retrieved blocks."""
    return int(config.n_init + config.n_local + config.topk * config.block_size)


def _model_step(message: BaseMessage) -> bool:
    """An AIMessage the chat model produced (middleware-injected ones carry no usage)."""
    return isinstance(message, AIMessage) and message.usage_metadata is not None


def _step_record(message: AIMessage, index: int, phase: str, seconds: float) -> StepRecord:
    usage: Any = message.usage_metadata or {}
    details: Any = usage.get("input_token_details") or {}
    infllm: Any = message.response_metadata.get("infllm") or {}
    return StepRecord(
        index=index,
        phase=phase,
        input_tokens=int(usage.get("input_tokens") or 0),
        cache_read=int(details.get("cache_read") or 0),
        cache_creation=int(details.get("cache_creation") or 0),
        output_tokens=int(usage.get("output_tokens") or 0),
        context_tokens=int(infllm.get("context_tokens") or 0),
        retrievals=int(infllm.get("retrievals") or 0),
        tool_calls=[_describe_call(c) for c in message.tool_calls],
        text=message.text,
        seconds=round(seconds, 3),
    )


def _describe_call(call: Mapping[str, Any]) -> str:
    args = call.get("args") or {}
    shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return f"{call.get('name')}({shown})"


class _Progress:
    """tqdm bar over model steps with reuse figures; silent when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool, verbose: bool) -> None:
        self.bar: Any = None
        self.verbose = verbose and enabled
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def step(self, record: StepRecord) -> None:
        if self.bar is None:
            return
        call = record.tool_calls[0] if record.tool_calls else repr(record.text[:30])
        self.bar.set_postfix_str(
            f"ctx={record.context_tokens} reused={record.cache_read} "
            f"computed={record.cache_creation} {call}",
            refresh=False,
        )
        self.bar.update(1)
        if self.verbose:
            self.bar.write(
                f"[{record.index:3d} {record.phase}] in={record.input_tokens} "
                f"reused={record.cache_read} computed={record.cache_creation} "
                f"out={record.output_tokens} retrievals={record.retrievals} "
                f"{record.seconds:.1f}s -> {', '.join(record.tool_calls) or repr(record.text[:80])}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _stream_turn(
    agent: Any,
    message: str,
    config: Mapping[str, Any],
    phase: str,
    steps: list[StepRecord],
    progress: _Progress,
) -> list[AIMessage]:
    """Run one user turn, recording every model step as it happens."""
    produced: list[AIMessage] = []
    last = time.perf_counter()
    for update in agent.stream(
        {"messages": [HumanMessage(message)]}, config, stream_mode="updates"
    ):
        if not isinstance(update, Mapping):
            continue
        for node_update in update.values():
            messages = node_update.get("messages") if isinstance(node_update, Mapping) else None
            for item in messages or ():
                if not _model_step(item):
                    continue
                now = time.perf_counter()
                record = _step_record(item, len(steps), phase, now - last)
                last = now
                steps.append(record)
                produced.append(item)
                progress.step(record)
    return produced


def final_answer(messages: Iterable[AIMessage]) -> str:
    """The last text the model produced in a turn (preferring replies without tool calls)."""
    items = list(messages)
    for message in reversed(items):
        if not message.tool_calls and message.text.strip():
            return message.text.strip()
    for message in reversed(items):
        if message.text.strip():
            return message.text.strip()
    return ""


def fact_markers(
    questions: Sequence[Question], steps: Sequence[StepRecord]
) -> list[tuple[str, int, int]]:
    """Where each question's fact entered the history: the token span of the tool result
    of its source call (from the step that made the call to the next step's prompt)."""
    markers = []
    for question in questions:
        if question.source is None:
            continue
        for index, step in enumerate(steps[:-1]):
            if any(_call_matches(call, question.source) for call in step.tool_calls):
                begin, end = step.total_tokens, steps[index + 1].input_tokens
                markers.append((f"{question.prompt} -> {question.answer}", begin, end))
                break
    return markers


def _call_offsets(steps: Sequence[StepRecord]) -> dict[str, int]:
    """Token offset at which each tool call's result enters the context (first time)."""
    offsets: dict[str, int] = {}
    for step in steps:
        for call in step.tool_calls:
            offsets.setdefault(call, step.total_tokens)
    return offsets


def run_task(
    task: AgentTask,
    llm: Any,
    out_dir: str | Path,
    *,
    thread_id: str | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> RunResult:
    """Run ``task`` with ``llm`` (a ``ChatInfLLM``) on ``create_agent``; write the trace
    report (``trace.html`` + ``trace.png``) and ``result.json`` into ``out_dir``."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelCallLimitMiddleware
    from langgraph.checkpoint.memory import InMemorySaver

    from langchain_infllm import RetrievalTraceHandler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    handler = RetrievalTraceHandler()
    # Reading needs one call per planned step plus the closing reply; the limit stops a
    # model that loops (each question turn gets the same allowance, it needs 1-2 calls).
    limit = ModelCallLimitMiddleware(run_limit=len(task.guide.plan) + 6, exit_behavior="end")
    agent = create_agent(
        llm,
        tools=task.tools,
        system_prompt=task.system_prompt,
        middleware=[limit],
        checkpointer=InMemorySaver(),
    )
    config: dict[str, Any] = {
        "configurable": {"thread_id": thread_id or f"{task.name}-run"},
        "callbacks": [handler],
        "recursion_limit": 4 * len(task.guide.plan) + 40,
    }
    steps: list[StepRecord] = []
    bar = _Progress(task.expected_steps, task.name, progress, verbose)
    began = time.perf_counter()
    answers: list[str] = []
    distances: list[int | None] = []
    try:
        _stream_turn(agent, task.start_message, config, "read", steps, bar)
        task.guide.closed = True
        offsets = _call_offsets(steps)
        for question in task.questions:
            asked_at = steps[-1].total_tokens if steps else 0
            prompt = task.question_template.format(question=question.prompt)
            produced = _stream_turn(agent, prompt, config, "ask", steps, bar)
            answers.append(final_answer(produced))
            source = question.source
            offset = None
            if source is not None:
                offset = next(
                    (at for call, at in offsets.items() if _call_matches(call, source)), None
                )
            distances.append(None if offset is None else max(0, asked_at - offset))
    finally:
        bar.close()
    seconds = time.perf_counter() - began
    _save_transcript(agent, config, out / "messages.json")
    trace_path: str | None = None
    try:
        markers = fact_markers(task.questions, steps)
        trace_path = str(handler.save_report(out / "trace.html", markers=markers))
    except Exception:  # the report is a by-product: never lose the run's result over it
        logger.exception("could not write the trace report")
    engine_config = llm.resolved_config
    result = RunResult(
        task=task.name,
        model=llm.model_name,
        config=engine_config.model_dump(),
        attention_span=attention_span(engine_config),
        steps=steps,
        answers=answers,
        score=score_answers(task.questions, answers),
        distances=distances,
        plan_completed=task.guide.progress,
        plan_length=len(task.guide.plan),
        tool_calls=len(task.guide.calls),
        seconds=round(seconds, 2),
        trace_path=trace_path,
        info=task.info,
    )
    (out / "result.json").write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return result


def _save_transcript(agent: Any, config: Mapping[str, Any], path: Path) -> None:
    """The thread's whole message list, OpenAI-shaped, so a diagnostic can replay exactly
    what the agent saw (benchmarks/recall.py ``--transcripts``)."""
    from langchain_core.messages import convert_to_openai_messages

    try:
        messages = agent.get_state(config).values.get("messages", [])
        path.write_text(json.dumps(convert_to_openai_messages(messages), indent=1),
                        encoding="utf-8")
    except Exception:  # a by-product, like the trace report
        logger.exception("could not write the transcript")


def _call_matches(described: str, planned: PlannedCall) -> bool:
    """Whether a recorded call description (``tool(k='v')``) is the planned call."""
    match = re.fullmatch(r"(\w+)\((.*)\)", described, flags=re.S)
    if match is None or match.group(1) != planned.tool:
        return False
    return all(f"{key}={value!r}" in match.group(2) or f"{key}={str(value)!r}" in match.group(2)
               for key, value in planned.args.items())


# ============================================================================ CLI


def build_parser(description: str, sizes: Iterable[str], default_size: str = "small") -> (
    argparse.ArgumentParser
):
    """The options every agent shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--model",
        default=None,
        help=f"embedded model name, hub id or local folder (default: the config's model.path, "
        f"else {DEFAULT_MODEL})",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="InfLLM YAML config")
    parser.add_argument("--size", default=default_size, choices=list(sizes))
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated task")
    parser.add_argument("--out", default=None, help="output folder (default runs/<agent>-<size>)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="most tokens the model may generate per step")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: best)")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16, float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is fastest on a "
                        "machine shared with other busy processes)")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per step")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def make_llm(args: argparse.Namespace) -> Any:
    """The chat model for the parsed options (the engine loads on first use)."""
    from langchain_infllm import ChatInfLLM

    config_path = Path(args.config)
    if not config_path.is_file():
        raise SystemExit(f"config file not found: {config_path}")
    from langchain_infllm.config import model_path_from_yaml

    model = args.model or model_path_from_yaml(config_path) or DEFAULT_MODEL
    return ChatInfLLM(
        model=model,
        infllm_config=config_path,
        device=args.device,
        dtype=args.dtype,
        temperature=0,
        max_tokens=args.max_tokens,
    )


def print_summary(result: RunResult) -> None:
    """The CLI's closing report."""
    span = result.attention_span
    ctx = result.context_tokens
    print(f"\n== {result.task}: {result.model}, {len(result.steps)} model steps, "
          f"{result.tool_calls} tool calls, {result.seconds:.1f}s")
    print(f"plan: {result.plan_completed}/{result.plan_length} planned calls made")
    print(f"context: {ctx} tokens = {ctx / span:.1f}x the attention span ({span} tokens: "
          f"n_init + n_local + topk*block_size)")
    total = result.tokens_reused + result.tokens_computed
    share = result.tokens_reused / total if total else 0.0
    print(f"prompt tokens: {result.tokens_reused} reused, {result.tokens_computed} computed "
          f"({share:.0%} reused); every step reused the whole previous history: "
          f"{'yes' if history_reused(result.steps) else 'NO'}")
    for verdict, distance in zip(result.score.verdicts, result.distances, strict=False):
        mark = "+" if verdict.correct else "-"
        back = f", fact {distance} tokens back" if distance is not None else ""
        print(f" {mark} {verdict.question}\n    expected {verdict.expected!r}{back}; "
              f"answer {verdict.answer[:160]!r} ({verdict.reason})")
    print(f"score: {result.score.correct}/{result.score.total} = {result.score.fraction:.0%}")
    if result.trace_path:
        print(f"trace report: {result.trace_path}")


def main_for(
    name: str,
    description: str,
    sizes: Iterable[str],
    make_task: Callable[[str, int, Path], AgentTask],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, build the task, run it and print the summary; returns the exit code."""
    args = build_parser(description, sizes).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/{name}-{args.size}")
    task = make_task(args.size, args.seed, out)
    llm = make_llm(args)
    print(f"{name}: size {args.size}, seed {args.seed}, ~{task.info.get('approx_tokens')} "
          f"tokens to read in {len(task.guide.plan)} tool calls, {len(task.questions)} "
          f"questions; model {llm.model_name}, config {args.config}")
    result = run_task(
        task, llm, out, progress=not args.no_progress, verbose=args.verbose
    )
    print_summary(result)
    print(f"result: {out / 'result.json'}")
    return 0
