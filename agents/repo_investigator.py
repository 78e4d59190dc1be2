"""Repository investigator: list, read and grep a generated code base, then answer
questions about files read many steps (and thousands of tokens) earlier.

The workspace (a small Python service) is generated from a seed and written to disk:
a README, a config file, an OWNERS file, a retry module and a journal module hold the
planted facts; many ordinary modules fill the rest. The agent follows an investigation
plan (list the tree, read the README and config, grep for a function, read the owners,
then read module after module); each tool result names the next call. Afterwards each
question is a new user turn, answered from memory (the tools are closed by then).

Run: ``python -m agents.repo_investigator --config config/agents-cpu.yaml --size small``
"""

from __future__ import annotations

import random
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

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

NAME = "repo_investigator"
DESCRIPTION = "Investigate a generated repository with list/read/grep tools, then answer."
MAX_GREP_MATCHES = 20
MARKER = ".generated-workspace"


@dataclass(frozen=True)
class SizeSpec:
    modules: int
    """Ordinary modules in the workspace."""
    read_modules: int
    """How many of them the plan reads after the fact-bearing files."""
    functions_per_module: int
    questions: int


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(modules=4, read_modules=1, functions_per_module=2, questions=2),
    # CPU demo: 3-4x the attention span of config/agents-cpu.yaml (2112 tokens)
    "small": SizeSpec(modules=10, read_modules=6, functions_per_module=7, questions=3),
    "medium": SizeSpec(modules=40, read_modules=20, functions_per_module=9, questions=4),
    # GPU: several times Qwen2.5's native 32K window
    "large": SizeSpec(modules=160, read_modules=110, functions_per_module=10, questions=5),
}

# ============================================================================ generator

_PROJECTS = ["ledgerd", "tidepool", "quaystore", "ferrolog", "harbourd", "sextant"]
_PEOPLE = ["Priya Raman", "Lukas Brandt", "Chiara Esposito", "Kwame Mensah", "Elin Sandberg",
           "Mateo Alvarez", "Noor Haddad", "Jonas Weber"]
_PACKAGES = ["api", "storage", "billing", "net", "auth", "reports", "scheduler", "cache",
             "metrics", "export", "audit", "search"]
_NOUNS = ["record", "invoice", "batch", "entry", "account", "payload", "cursor", "token",
          "segment", "snapshot", "ticket", "bucket", "window", "policy", "receipt"]
_VERBS = ["load", "merge", "validate", "render", "flush", "split", "resolve", "archive",
          "encode", "collect", "prune", "rotate", "schedule", "refresh", "summarise"]
_ADJECTIVES = ["pending", "stale", "partial", "signed", "cached", "remote", "daily", "draft"]
_TYPES = ["list[dict]", "dict[str, int]", "str", "bytes", "int", "list[str]"]


@dataclass(frozen=True)
class RepoFact:
    path: str
    question: str
    answer: str
    distractors: tuple[str, ...]
    via: PlannedCall


@dataclass
class Workspace:
    project: str
    files: dict[str, str]
    facts: list[RepoFact]
    plan: list[PlannedCall]
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n".join(self.files.values())


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _identifier(rng: random.Random, used: set[str]) -> str:
    while True:
        name = f"{rng.choice(_VERBS)}_{rng.choice(_ADJECTIVES)}_{rng.choice(_NOUNS)}"
        if name not in used:
            used.add(name)
            return name


def _function(rng: random.Random, name: str, project: str) -> str:
    noun = rng.choice(_NOUNS)
    arg = _plural(noun)
    limit = rng.randint(2, 64)
    kind = rng.randrange(3)
    if kind == 0:
        body = (
            f"    selected = []\n"
            f"    for item in {arg}:\n"
            f"        if item.get(\"{rng.choice(_NOUNS)}_count\", 0) > limit:\n"
            f"            selected.append(item)\n"
            f"    logger.debug(\"{name}: kept %d of %d\", len(selected), len({arg}))\n"
            f"    return selected\n"
        )
        signature = f"def {name}({arg}: list[dict], limit: int = {limit}) -> list[dict]:"
    elif kind == 1:
        body = (
            f"    totals: dict[str, int] = {{}}\n"
            f"    for key, value in {arg}.items():\n"
            f"        bucket = key.split(\".\", 1)[0]\n"
            f"        totals[bucket] = totals.get(bucket, 0) + value\n"
            f"    return {{k: v for k, v in totals.items() if v >= limit}}\n"
        )
        signature = f"def {name}({arg}: dict[str, int], limit: int = {limit}) -> dict[str, int]:"
    else:
        body = (
            f"    parts = [p.strip() for p in {arg}.split(\",\") if p.strip()]\n"
            f"    if len(parts) > limit:\n"
            f"        raise ValueError(f\"{name}: {{len(parts)}} parts, at most {limit}\")\n"
            f"    return \"|\".join(sorted(parts))\n"
        )
        signature = f"def {name}({arg}: str, limit: int = {limit}) -> str:"
    doc = (f"    \"\"\"{name.split('_')[0].capitalize()} the {rng.choice(_ADJECTIVES)} {arg} "
           f"of a {project} {rng.choice(_NOUNS)}.\"\"\"\n")
    return f"{signature}\n{doc}{body}"


def _module(rng: random.Random, project: str, package: str, functions: int,
            used: set[str], extra: str = "") -> str:
    names = [_identifier(rng, used) for _ in range(functions)]
    constant = f"DEFAULT_{rng.choice(_NOUNS).upper()}_LIMIT = {rng.randint(100, 999)}"
    parts = [
        f"\"\"\"{project}.{package}: helpers for {rng.choice(_ADJECTIVES)} "
        f"{_plural(rng.choice(_NOUNS))}.\"\"\"\n\nfrom __future__ import annotations\n\n"
        f"import logging\n\nlogger = logging.getLogger(__name__)\n\n{constant}\n",
    ]
    if extra:
        parts.append(extra)
    parts.extend(_function(rng, name, project) for name in names)
    return "\n\n".join(parts)


def generate_workspace(size: str | SizeSpec = "small", seed: int = 0) -> Workspace:
    """A seeded repository, its planted facts and the investigation plan."""
    spec = SIZES[size] if isinstance(size, str) else size
    if spec.read_modules > spec.modules:
        raise ValueError("read_modules cannot exceed modules")
    rng = random.Random(seed)
    project = rng.choice(_PROJECTS)
    used: set[str] = set()
    owners = rng.sample(_PEOPLE, 3)
    billing_owner, maintainer, storage_owner = owners
    port, metrics_port = rng.sample(range(8000, 9999), 2)
    # above every function's default limit (2..64), below the module constants
    retries, backoff = rng.sample(range(65, 100), 2)
    incident, other_incident = rng.sample(range(1000, 9999), 2)
    files: dict[str, str] = {}
    src = f"src/{project}"

    files["README.md"] = (
        f"# {project}\n\nA small ledger service. Maintainer: {maintainer}.\n\n"
        f"Layout: `config/` holds the service settings, `{src}/` the code, one package per "
        "area (billing, storage, net, ...). Every package has an OWNERS file.\n\n"
        "Run `python -m " + project + " --config config/service.ini` to start it.\n"
    )
    files["config/service.ini"] = (
        "[server]\n"
        f"host = 0.0.0.0\nport = {port}\nworkers = {rng.randint(2, 9)}\n\n"
        "[metrics]\n"
        f"enabled = true\nmetrics_port = {metrics_port}\n\n"
        "[storage]\n"
        f"path = /var/lib/{project}\nsync_every = {rng.randint(10, 99)}s\n"
    )
    files[f"{src}/billing/OWNERS"] = f"# owners of the billing package\nowner: {billing_owner}\n"
    files[f"{src}/storage/OWNERS"] = f"# owners of the storage package\nowner: {storage_owner}\n"
    files[f"{src}/net/retry.py"] = _module(
        rng, project, "net.retry", 2, used,
        extra=f"MAX_RETRIES = {retries}\nBACKOFF_SECONDS = {backoff}\n",
    )
    journal_extra = (
        "def reconcile_ledger(entries: list[dict], limit: int = 10) -> list[dict]:\n"
        "    \"\"\"Match journal entries against the ledger; return the unmatched ones.\"\"\"\n"
        "    return [e for e in entries if not e.get(\"matched\")][:limit]\n"
    )
    files[f"{src}/storage/journal.py"] = _module(rng, project, "storage.journal", 2, used,
                                                 extra=journal_extra)
    files["CHANGELOG.md"] = (
        f"# Changelog\n\n## 2.3.1\n- Fixed the double-charge bug of incident INC-{incident}.\n\n"
        f"## 2.3.0\n- Faster exports; closes INC-{other_incident}.\n"
    )
    module_paths: list[str] = []
    for index in range(spec.modules):
        package = _PACKAGES[index % len(_PACKAGES)]
        stem = f"{rng.choice(_ADJECTIVES)}_{_plural(rng.choice(_NOUNS))}"
        path = f"{src}/{package}/{stem}.py"
        while path in files:
            path = path.replace(".py", "_x.py")
        files[path] = _module(rng, project, f"{package}.{stem}", spec.functions_per_module, used)
        module_paths.append(path)

    journal = f"{src}/storage/journal.py"
    python_names = sorted({PurePosixPath(p).name for p in files if p.endswith(".py")})
    grep_call = PlannedCall("grep", {"pattern": "def reconcile_ledger"})
    facts = [
        RepoFact("config/service.ini",
                 "Which port does the service listen on, according to config/service.ini?",
                 str(port), (str(metrics_port),),
                 PlannedCall("read_file", {"path": "config/service.ini"})),
        RepoFact(f"{src}/billing/OWNERS", "Who is the owner of the billing package?",
                 billing_owner, (maintainer, storage_owner),
                 PlannedCall("read_file", {"path": f"{src}/billing/OWNERS"})),
        RepoFact(journal, "In which file is the function reconcile_ledger defined?",
                 PurePosixPath(journal).name,
                 tuple(n for n in python_names if n != PurePosixPath(journal).name),
                 grep_call),
        RepoFact(f"{src}/net/retry.py", "What is the value of MAX_RETRIES in retry.py?",
                 str(retries), (str(backoff),),
                 PlannedCall("read_file", {"path": f"{src}/net/retry.py"})),
        RepoFact("CHANGELOG.md", "Which incident did release 2.3.1 fix, according to the "
                 "CHANGELOG?", f"INC-{incident}", (f"INC-{other_incident}",),
                 PlannedCall("read_file", {"path": "CHANGELOG.md"})),
    ]
    facts = facts[: spec.questions]
    plan = [PlannedCall("list_files", {"directory": "."}),
            PlannedCall("read_file", {"path": "README.md"})]
    for fact in facts:
        if fact.via not in plan:
            plan.append(fact.via)
    plan.extend(
        PlannedCall("read_file", {"path": p})
        for p in rng.sample(module_paths, spec.read_modules)
    )
    return Workspace(project=project, files=files, facts=facts, plan=plan)


def write_workspace(workspace: Workspace, root: str | Path) -> Path:
    """Write the files under ``root``, replacing a workspace generated there before.

    A non-empty ``root`` without the marker file is refused rather than overwritten.
    """
    base = Path(root)
    if base.exists() and any(base.iterdir()):
        if not (base / MARKER).is_file():
            raise FileExistsError(f"{base} is not empty and holds no generated workspace")
        shutil.rmtree(base)
    base.mkdir(parents=True, exist_ok=True)
    (base / MARKER).write_text(f"generated workspace of {workspace.project}\n")
    for relative, content in workspace.files.items():
        target = base / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
    return base


def questions_for(workspace: Workspace) -> list[Question]:
    return [
        Question(prompt=f.question, answer=f.answer, distractors=f.distractors, source=f.via)
        for f in workspace.facts
    ]


def score(workspace: Workspace, answers: Sequence[str]) -> Score:
    """Score final answers (in question order) against the planted facts."""
    return score_answers(questions_for(workspace), answers)


# ============================================================================ tools


def _inside(root: Path, relative: str) -> Path | None:
    """``root/relative`` if it stays inside ``root``, else None."""
    candidate = (root / relative.strip().lstrip("/")).resolve()
    base = root.resolve()
    return candidate if candidate == base or base in candidate.parents else None


def _files(folder: Path) -> list[Path]:
    """Files under ``folder``, hidden ones (the marker) left out, in path order."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def make_tools(root: str | Path, guide: Guide) -> list[BaseTool]:
    """``list_files``, ``read_file`` and ``grep`` over the workspace at ``root``."""
    base = Path(root).resolve()

    def finish(text: str) -> str:
        return f"{text}\n\n{guide.hint()}"

    @tool
    def list_files(directory: str = ".") -> str:
        """List the files under a directory of the repository (recursively)."""
        if guide.closed:
            return guide.closed_message()
        guide.record("list_files", {"directory": directory})
        folder = _inside(base, directory)
        if folder is None or not folder.is_dir():
            return finish(f"No directory {directory!r} in the repository.")
        rows = [
            f"{path.relative_to(base).as_posix()} ({len(path.read_text().splitlines())} lines)"
            for path in _files(folder)
        ]
        return finish("\n".join(rows) or "(empty)")

    @tool
    def read_file(path: str) -> str:
        """Read a file of the repository, given its path relative to the repository root."""
        if guide.closed:
            return guide.closed_message()
        guide.record("read_file", {"path": path})
        target = _inside(base, path)
        if target is None or not target.is_file():
            return finish(f"No file {path!r} in the repository.")
        return finish(f"=== {path} ===\n{target.read_text()}")

    @tool
    def grep(pattern: str) -> str:
        """Search every file of the repository for a regular expression; returns
        matching lines as path:line: text."""
        if guide.closed:
            return guide.closed_message()
        guide.record("grep", {"pattern": pattern})
        try:
            regex = re.compile(pattern)
        except re.error:
            regex = re.compile(re.escape(pattern))
        hits: list[str] = []
        for path in _files(base):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if regex.search(line):
                    hits.append(f"{path.relative_to(base).as_posix()}:{number}: {line.strip()}")
        shown = hits[:MAX_GREP_MATCHES]
        more = f"\n({len(hits) - len(shown)} more matches)" if len(hits) > len(shown) else ""
        return finish("\n".join(shown) + more if shown else f"No match for {pattern!r}.")

    return [list_files, read_file, grep]


# ============================================================================ agent


def build_task(size: str | SizeSpec = "small", seed: int = 0,
               root: str | Path = "runs/repo_investigator/workspace") -> AgentTask:
    """Generate the workspace under ``root`` and the task that investigates it."""
    workspace = generate_workspace(size, seed)
    write_workspace(workspace, root)
    guide = Guide(
        workspace.plan,
        finish_hint=f"The investigation is complete. Reply with the single word {FINISH_WORD}.",
    )
    system = (
        f"You investigate the {workspace.project} repository with the tools list_files, "
        "read_file and grep, one call per reply. Follow the investigation plan: every tool "
        "result ends with the next call to make. Remember what you read (settings, owners, "
        "where functions are defined): you will be asked about it later, when the tools are "
        f"closed. When a result says the investigation is complete, reply with {FINISH_WORD}."
    )
    return AgentTask(
        name=NAME,
        system_prompt=system,
        tools=make_tools(root, guide),
        start_message=(
            f"Investigate the {workspace.project} repository. "
            "Start with list_files with directory='.'."
        ),
        guide=guide,
        questions=questions_for(workspace),
        info={
            "project": workspace.project,
            "files": len(workspace.files),
            "workspace": str(root),
            "approx_tokens": sum(
                approx_tokens(workspace.files[c.args["path"]])
                for c in workspace.plan
                if c.tool == "read_file"
            ),
        },
    )


def _make_task(size: str, seed: int, out: Path) -> AgentTask:
    return build_task(size, seed, out / "workspace")


def main(argv: Sequence[str] | None = None) -> int:
    return main_for(NAME, DESCRIPTION, SIZES, _make_task, argv)


if __name__ == "__main__":
    sys.exit(main())
