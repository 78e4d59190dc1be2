"""Recall diagnostic: does the memory bring back the block that holds the fact?

    python -m benchmarks.recall [--cases document_reader repo_investigator passkey]
        [--size small] [--seeds 0 1 2 3 4] [--methods infllm maxkey sinks_window full]
        [--config config/agents-cpu.yaml] [--model qwen2.5-coder-0.5b-instruct]

For every planted fact of the agents' generators (the agent's transcript replayed: every
planned tool call with its real result, then the question as a new user turn) and of the
needle tasks, and for every method, in one run on the same token ids:

* the answer: greedy decoding, scored with the agent's / task's own scorer;
* at the answer's value (teacher-forced: the full-attention control's own answer up to
  the value where it gave one, else "The answer is"): the log-probability of
  the value, and for every layer at each step that predicts a value token, whether the
  block holding the fact was attended (by any KV head, and the share of KV heads) and its
  rank under the method's own scores;
* decode time per token.

Methods: the retrieval methods of `InfLLMConfig.retrieval` with the given config,
``sinks_window`` (``topk=0``), ``full`` (the same engine with a window larger than
the prompt: full attention, which the oracle tests prove equal to the unmodified model)
and ``truncate`` (full attention on the last tokens that fit the model's native window
with the question and answer: what a plain server does past its window).
Writes ``benchmarks/results/recall.{json,csv,md,png}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.common import (
    RESULTS_DIR,
    engine_config,
    engine_generate,
    machine,
    set_threads,
    write_csv,
    write_results,
)
from langchain_infllm.engine.retrieval import RETRIEVAL_METHODS

FORCED_PREFIX = "The answer is"
CONTROL_METHODS = ("sinks_window", "full", "truncate")


@dataclass
class RecallQuestion:
    """One planted fact: what to append after the shared prefix, and where the fact is."""

    label: str
    suffix_ids: list[int]
    value: str
    value_ids: list[int]
    fact_positions: tuple[int, int]  # token positions [start, end) of the value in context
    is_correct: Callable[[str], bool]


@dataclass
class RecallCase:
    name: str
    seed: int
    prefix_ids: list[int]
    questions: list[RecallQuestion]
    info: dict[str, Any] = field(default_factory=dict)
    decoded: list[tuple[int, int]] = field(default_factory=list)
    """Token spans ``[start, end)`` the agent generated: fed one token per step, as the
    agent's decoding did, so a transcript replay chunks its history as the agent did."""


# ----------------------------------------------------------------------------- cases


def _token_index(offsets: Sequence[tuple[int, int]], char: int) -> int:
    return next(i for i, (_, end) in enumerate(offsets) if end > char)


def _build_task(agent: str, size: str, seed: int, work: Path) -> Any:
    from agents import document_reader, repo_investigator

    if agent == "document_reader":
        return document_reader.build_task(size, seed)
    if agent == "repo_investigator":
        return repo_investigator.build_task(size, seed, work / f"ws-{seed}")
    raise ValueError(f"unknown agent {agent!r}")


def _question(q: Any, suffix_ids: list[int], span: tuple[int, int], tokenizer: Any) -> (
    RecallQuestion
):
    """One agent question as a recall question (the value found at token `span`)."""
    return RecallQuestion(
        label=q.prompt,
        suffix_ids=suffix_ids,
        value=q.answer,
        value_ids=tokenizer.encode(" " + q.answer, add_special_tokens=False),
        fact_positions=span,
        is_correct=partial(_judge, q),
    )


def agent_case(agent: str, size: str, seed: int, tokenizer: Any, work: Path) -> RecallCase:
    """The agent's conversation replayed: every planned call with its real tool result."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from agents.common import FINISH_WORD
    from langchain_infllm.chat_prompt import PromptRenderer

    task = _build_task(agent, size, seed, work)
    tools = {t.name: t for t in task.tools}
    messages: list[Any] = [SystemMessage(task.system_prompt), HumanMessage(task.start_message)]
    results: dict[int, str] = {}
    for i, call in enumerate(task.guide.plan):
        messages.append(AIMessage("", tool_calls=[
            {"name": call.tool, "args": dict(call.args), "id": f"call{i}"}]))
        results[i] = str(tools[call.tool].invoke(dict(call.args)))
        messages.append(ToolMessage(results[i], tool_call_id=f"call{i}"))
    messages.append(AIMessage(FINISH_WORD))
    task.guide.closed = True
    renderer = PromptRenderer(tokenizer)
    schemas = [convert_to_openai_tool(t) for t in task.tools]
    def asked(question: Any) -> list[Any]:
        return [*messages, HumanMessage(task.question_template.format(question=question))]

    renders = [renderer.render(asked(q.prompt), schemas) for q in task.questions]
    common = min(_shared_prefix(renders[0].token_ids, r.token_ids) for r in renders)
    common = min(common, min(len(r.token_ids) for r in renders) - 1)
    questions = []
    for q, rendered in zip(task.questions, renders, strict=True):
        enc = tokenizer(rendered.text, return_offsets_mapping=True, add_special_tokens=False)
        if list(enc["input_ids"]) != rendered.token_ids:
            raise RuntimeError("rendered text does not re-tokenise to the prompt ids")
        offsets = enc["offset_mapping"]
        index = next(i for i, c in enumerate(task.guide.plan) if c == q.source)
        at = rendered.text.index(results[index])
        char = rendered.text.index(q.answer, at)
        span = (_token_index(offsets, char), _token_index(offsets, char + len(q.answer) - 1) + 1)
        questions.append(_question(q, rendered.token_ids[common:], span, tokenizer))
    return RecallCase(agent, seed, renders[0].token_ids[:common], questions,
                      {"size": size, "tokens": len(renders[0].token_ids)})


def transcript_case(
    agent: str, size: str, seed: int, path: Path, tokenizer: Any, work: Path
) -> RecallCase:
    """An agent's own run replayed exactly: the transcript it saved (``messages.json``),
    each question asked after the earlier questions and the answers the agent gave, the
    history fed in the agent's steps (every generated token one step at a time).

    The plain ``agent_case`` asks each question on a fork of the planned reading; this
    one reproduces what the agent saw, so a miss of the agent can be studied per method.
    """
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from langchain_infllm.chat_core.prompt import PromptRenderer

    task = _build_task(agent, size, seed, work)
    transcript = json.loads(path.read_text(encoding="utf-8"))
    messages = [{"role": "system", "content": task.system_prompt}, *transcript]
    asked = [i for i, m in enumerate(messages) if m["role"] == "user"][1:]
    if len(asked) != len(task.questions):
        raise ValueError(f"{path}: {len(asked)} question turns, the task has "
                         f"{len(task.questions)}")
    renderer = PromptRenderer(tokenizer)
    schemas = [convert_to_openai_tool(t) for t in task.tools]
    full = renderer.render(messages, schemas)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    decoded = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            begin = len(renderer.render(messages[:i], schemas).token_ids)
            end = full.token_ids.index(end_of_turn, begin) + 1  # the stop token too
            decoded.append((begin, end))
    renders = [renderer.render(messages[: u + 1], schemas) for u in asked]
    common = min(_shared_prefix(renders[0].token_ids, r.token_ids) for r in renders)
    common = min(common, min(len(r.token_ids) for r in renders) - 1)
    enc = tokenizer(full.text, return_offsets_mapping=True, add_special_tokens=False)
    if list(enc["input_ids"]) != full.token_ids:
        raise RuntimeError("rendered text does not re-tokenise to the prompt ids")
    offsets = enc["offset_mapping"]
    questions = []
    for q, rendered in zip(task.questions, renders, strict=True):
        source = q.source
        result = next(
            messages[i + 1]["content"] for i, m in enumerate(messages)
            if m["role"] == "assistant" and source is not None and any(
                source.matches(c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in m.get("tool_calls") or ()))
        char = full.text.index(q.answer, full.text.index(result))
        span = (_token_index(offsets, char), _token_index(offsets, char + len(q.answer) - 1) + 1)
        questions.append(_question(q, rendered.token_ids[common:], span, tokenizer))
    return RecallCase(f"{agent}-transcript", seed, renders[0].token_ids[:common], questions,
                      {"size": size, "tokens": len(full.token_ids), "transcript": str(path)},
                      decoded=decoded)


def feed(session: Any, ids: Sequence[int], decoded: Sequence[tuple[int, int]]) -> None:
    """Append `ids` at the session's end, the tokens inside `decoded` spans (absolute
    positions) one per step, everything between them in one append."""
    at = len(session)
    end = at + len(ids)
    cuts = sorted({at, end, *(p for a, b in decoded for p in range(a, b + 1) if at < p < end)})
    for a, b in itertools.pairwise(cuts):
        session.append(list(ids[a - at : b - at]))


def _judge(question: Any, text: str) -> bool:
    from agents.common import score_answer

    return bool(score_answer(question, text).correct)


def needle_case(task: str, length: int, depth: float, seed: int, tokenizer: Any) -> RecallCase:
    """A needle task (plain completion ending with its answer cue)."""
    from benchmarks.tasks import generate, make_prompt, score_sample

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    sample = generate(task, length, depth, seed=f"{seed}", count_tokens=count)
    text = make_prompt(sample)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = list(enc["input_ids"])
    value = sample.answers[0]
    char = text.index(value)
    offsets = enc["offset_mapping"]
    span = (_token_index(offsets, char), _token_index(offsets, char + len(value) - 1) + 1)
    question = RecallQuestion(
        label=f"{task} depth {depth}",
        suffix_ids=ids[-1:],
        value=value,
        value_ids=tokenizer.encode(" " + value, add_special_tokens=False),
        fact_positions=span,
        is_correct=lambda out: score_sample(sample, out) >= 1.0,
    )
    return RecallCase(f"{task}-{length}", seed, ids[:-1], [question],
                      {"depth": depth, "tokens": len(ids)})


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


# ----------------------------------------------------------------------------- measuring


def _fact_blocks(span: tuple[int, int], n_init: int, block_size: int) -> set[int]:
    return {(p - n_init) // block_size for p in range(*span) if p >= n_init}


def measure_question(
    engine: Any, base: Any, q: RecallQuestion, method: str, *, stop_ids: set[int],
    decode_tokens: int, tokenizer: Any, cut: int = 0,
    decoded: Sequence[tuple[int, int]] = (),
    lead: tuple[list[int], list[int]] | None = None,
) -> dict[str, Any]:
    """Answer, value log-probability and the fact block's fate at the value steps.

    `cut`: how many leading context tokens the method dropped (``truncate``);
    `decoded`: spans fed one token per step (`feed`); `lead`: the control's answer up
    to the value and the value's tokens as it wrote them (`value_lead`), where the value
    is forced instead of after "The answer is".
    """
    from langchain_infllm.engine.retrieval import chunk_queries, score_blocks

    cfg = engine.config
    fact = _fact_blocks(q.fact_positions, cfg.n_init, cfg.block_size)
    # 1. free answer
    session = base.fork()
    feed(session, q.suffix_ids, decoded)
    began = time.perf_counter()
    produced = engine_generate(session, decode_tokens,
                               stop=lambda ids: bool(ids) and ids[-1] in stop_ids)
    seconds = time.perf_counter() - began
    answer = tokenizer.decode(produced, skip_special_tokens=True)
    session.close()
    # 2. teacher-forced value: after the control's own words where it said the value,
    # else after a neutral cue
    session = base.fork()
    feed(session, q.suffix_ids, decoded)
    forced, value_ids = lead if lead is not None else (
        tokenizer.encode(" " + FORCED_PREFIX, add_special_tokens=False), q.value_ids)
    step = session.append(forced)
    ranks: dict[int, list[int]] = {}

    def observe(layer: int, start: int, q_mem: torch.Tensor, memory: Any) -> None:
        if not fact or memory.n_blocks <= max(fact):
            return
        queries = chunk_queries(q_mem, memory.retrieval, cfg.query_group)
        scores = score_blocks(memory.retrieval, queries, reprs=memory.reprs,
                              index_keys=memory.index_keys, kv_heads=memory.shape.kv_heads,
                              block_size=memory.block_size, neighbours=cfg.neighbours)
        order = scores.argsort(dim=1, descending=True)
        best = min(int((order == b).nonzero()[:, 1].min()) for b in fact)
        ranks.setdefault(layer, []).append(best)

    logp = 0.0
    layer_hits: dict[int, list[float]] = {}
    for token in value_ids:
        assert step.logits is not None
        logp += float(torch.log_softmax(step.logits, -1)[token])
        session.observer = observe if method in RETRIEVAL_METHODS else None
        step = session.append([token])
        session.observer = None
        for rec in step.retrievals:
            rows = rec.head_block_ids or (rec.block_ids,)
            share = sum(bool(fact & set(r)) for r in rows) / len(rows)
            layer_hits.setdefault(rec.layer, []).append(share)
    # The logits above came from the step *before* each token; the observer ran on the
    # step that consumed it, i.e. the query predicting the next value token. Both cover
    # the value's steps; the last observation predicts the token after the value.
    session.close()
    layers = engine.num_layers
    if method == "full":
        any_share = head_share = 1.0  # every key is in the window
    elif method == "truncate":
        any_share = head_share = float(q.fact_positions[0] >= cut)  # kept, hence attended
    elif method == "sinks_window" or not layer_hits:
        any_share = head_share = 0.0
    else:
        per_layer = [statistics.mean(layer_hits.get(i, [0.0])) for i in range(layers)]
        any_share = statistics.mean(
            float(any(h > 0 for h in layer_hits.get(i, []))) for i in range(layers))
        head_share = statistics.mean(per_layer)
    return {
        "answer": answer,
        "answer_ids": produced,
        "forced": "control's answer" if lead is not None else FORCED_PREFIX,
        "correct": bool(q.is_correct(answer)),
        "value_logp": round(logp, 3),
        "fact_layers_selected": round(any_share, 3),
        "fact_heads_selected": round(head_share, 3),
        "layer_share": {i: round(statistics.mean(v), 3) for i, v in sorted(layer_hits.items())},
        "median_rank": (statistics.median(min(v) for v in ranks.values()) if ranks else None),
        "decode_s_per_token": round(seconds / max(1, len(produced)), 4),
        "fact_blocks": sorted(fact),
    }


def value_lead(
    produced: Sequence[int], value: str, tokenizer: Any
) -> tuple[list[int], list[int]] | None:
    """The tokens of an answer before the value and the tokens that spell it, or None
    if the answer does not contain the value (the decision point every method is then
    measured at: does it say the value where the control did?)."""
    text = tokenizer.decode(list(produced), skip_special_tokens=True)
    at = text.find(value)
    if at < 0:
        return None
    lengths = [len(tokenizer.decode(list(produced[:k]), skip_special_tokens=True))
               for k in range(len(produced) + 1)]
    first = max(k for k, n in enumerate(lengths) if n <= at)
    # A space the tokenizer keeps apart belongs to the value: the choice is made there.
    while first > 0 and not tokenizer.decode([produced[first - 1]]).strip():
        first -= 1
    last = next(k for k, n in enumerate(lengths) if n >= at + len(value))
    return list(produced[:first]), list(produced[first:last])


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``maxkey`` or ``maxkey:block_size=32,topk=32`` (an ablation row's overrides)."""
    name, _, rest = spec.partition(":")
    if name not in (*RETRIEVAL_METHODS, *CONTROL_METHODS):
        raise SystemExit(f"unknown method {name!r}")
    changes: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        changes[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, changes


def method_config(base: Any, spec: str, longest: int) -> Any:
    name, changes = parse_method(spec)
    if name == "sinks_window":
        return engine_config(base, topk=0, **changes)
    if name in ("full", "truncate"):
        window = 1 << math.ceil(math.log2(longest + 64))
        return engine_config(base, n_local=window, **changes)
    return engine_config(base, retrieval=name, **changes)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from langchain_infllm import InfLLMConfig, InfLLMEngine
    from langchain_infllm.models.embedded import load_model_and_tokenizer

    set_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, device="cpu")
    base_cfg = engine_config(InfLLMConfig.from_yaml(args.config), trace="full")
    work = Path(tempfile.mkdtemp(prefix="recall-"))
    cases: list[RecallCase] = []
    for seed in args.seeds:
        for name in args.cases:
            pattern = getattr(args, "transcripts", None)
            if name in ("document_reader", "repo_investigator") and pattern:
                path = Path(pattern.format(agent=name, size=args.size, seed=seed))
                cases.append(transcript_case(name, args.size, seed, path, tokenizer, work))
            elif name in ("document_reader", "repo_investigator"):
                cases.append(agent_case(name, args.size, seed, tokenizer, work))
            else:
                for depth in args.depths:
                    cases.append(needle_case(name, args.length, depth, seed, tokenizer))
    longest = max(len(c.prefix_ids) + max(len(q.suffix_ids) for q in c.questions)
                  for c in cases) + args.decode_tokens + 16
    stop_ids = {int(i) for i in [tokenizer.eos_token_id,
                                 tokenizer.convert_tokens_to_ids("<|im_end|>")] if i is not None}
    native = int(model.config.max_position_embeddings)
    rows: list[dict[str, Any]] = []
    engines = {m: InfLLMEngine(model, tokenizer, method_config(base_cfg, m, longest))
               for m in args.methods}
    total = len(cases) * len(args.methods)
    # Rows as they complete, so an interrupted run keeps them (only for a named run).
    progress = RESULTS_DIR / f"{args.out}.partial.jsonl" if getattr(args, "out", None) else None
    if progress is not None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        progress.write_text("")
    # The full-attention control goes first on each case: its answers give every other
    # method the decision point to be measured at (`value_lead`).
    order = sorted(args.methods, key=lambda m: parse_method(m)[0] != "full")
    with tqdm(total=total, desc="recall", unit="case") as bar:
        for case in cases:
            leads: dict[str, tuple[list[int], list[int]] | None] = {}
            for method in order:  # interleaved: every method sees the same load
                engine = engines[method]
                engine.model.set_attn_implementation("infllm")  # type: ignore[operator]
                base = engine.new_session()
                prefix = case.prefix_ids
                if parse_method(method)[0] == "truncate":
                    keep = native - max(len(q.suffix_ids) for q in case.questions) - (
                        args.decode_tokens + 16)
                    prefix = prefix[-keep:]
                began = time.perf_counter()
                if case.decoded and len(prefix) == len(case.prefix_ids):
                    feed(base, prefix, case.decoded)
                else:  # a truncated prefix is not the agent's history anyway
                    base.append(prefix)
                prefill = time.perf_counter() - began
                for q in case.questions:
                    result = measure_question(engine, base, q, parse_method(method)[0],
                                              stop_ids=stop_ids,
                                              cut=len(case.prefix_ids) - len(prefix),
                                              decode_tokens=args.decode_tokens,
                                              tokenizer=tokenizer, decoded=case.decoded,
                                              lead=leads.get(q.label))
                    if parse_method(method)[0] == "full":
                        leads[q.label] = value_lead(result["answer_ids"], q.value, tokenizer)
                    rows.append({"case": case.name, "seed": case.seed, "method": method,
                                 "question": q.label, "value": q.value,
                                 "tokens": case.info["tokens"],
                                 "prefill_tok_s": round(len(prefix) / prefill, 1),
                                 **result})
                    if progress is not None:
                        with progress.open("a") as f:
                            f.write(json.dumps(rows[-1]) + "\n")
                base.close()
                bar.update(1)
    return {"machine": machine(), "args": vars(args), "config": base_cfg.model_dump(),
            "rows": rows}


# ----------------------------------------------------------------------------- report


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (case, method): accuracy, value log-prob, fact-block selection."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["method"]), []).append(r)
    out = []
    for (case, method), items in groups.items():
        ranks = [r["median_rank"] for r in items if r["median_rank"] is not None]
        out.append({
            "case": case, "method": method, "questions": len(items),
            "seeds": len({r["seed"] for r in items}),
            "accuracy": round(statistics.mean(float(r["correct"]) for r in items), 3),
            "value_logp": round(statistics.mean(r["value_logp"] for r in items), 3),
            "fact_layers_selected": round(
                statistics.mean(r["fact_layers_selected"] for r in items), 3),
            "fact_heads_selected": round(
                statistics.mean(r["fact_heads_selected"] for r in items), 3),
            "median_rank": statistics.median(ranks) if ranks else None,
            "decode_s_per_token": round(
                statistics.mean(r["decode_s_per_token"] for r in items), 4),
        })
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    head = ("| case | method | questions (seeds) | answers right | log p(value) | "
            "fact block attended, share of layers | share of KV heads | median rank | "
            "decode s/token |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for s in summary:
        rank = "-" if s["median_rank"] is None else f"{s['median_rank']:.0f}"
        lines.append(
            f"| {s['case']} | {s['method']} | {s['questions']} ({s['seeds']}) | "
            f"{s['accuracy']:.0%} | {s['value_logp']:.2f} | {s['fact_layers_selected']:.2f} | "
            f"{s['fact_heads_selected']:.2f} | {rank} | {s['decode_s_per_token']:.3f} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Share of KV heads that attended the fact's block, per layer and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for method in sorted({r["method"] for r in rows if r["method"] in RETRIEVAL_METHODS}):
        per_layer: dict[int, list[float]] = {}
        for r in rows:
            if r["method"] == method:
                for layer, share in r["layer_share"].items():
                    per_layer.setdefault(int(layer), []).append(share)
        xs = sorted(per_layer)
        ax.plot(xs, [statistics.mean(per_layer[x]) for x in xs], marker="o", label=method)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of KV heads attending the fact's block")
    ax.set_ylim(0, 1.05)
    ax.set_title("Recall at the answer's value tokens (all cases, all seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["document_reader", "repo_investigator"])
    parser.add_argument("--size", default="small")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+",
                        default=[*RETRIEVAL_METHODS, *CONTROL_METHODS])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--config", default="config/agents-cpu.yaml")
    parser.add_argument("--length", type=int, default=16384, help="needle tasks: tokens")
    parser.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5])
    parser.add_argument("--decode-tokens", type=int, default=24)
    parser.add_argument(
        "--transcripts", default=None,
        help="replay the agents' own runs: a path pattern of their messages.json with "
        "{agent}, {size}, {seed} (e.g. runs/x/{agent}-{size}-s{seed}-maxkey/messages.json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="recall")
    args = parser.parse_args(argv)
    payload = run(args)
    payload["summary"] = summarise(payload["rows"])
    write_results(args.out, payload)
    write_csv(args.out, payload["summary"])
    (RESULTS_DIR / f"{args.out}.md").write_text(markdown(payload["summary"]))
    plot(payload["rows"], RESULTS_DIR / f"{args.out}.png")
    print(markdown(payload["summary"]))


if __name__ == "__main__":
    main()
