"""Python source as data: this Python's standard library, for the code tasks, the
docstring probe and pre-training.

- `stdlib_sources`: every library module's source; `stripped_stdlib` the same without
  docstrings and comments (a habit pre-training shows and fine-tuning does not);
- `chunk_code`: a module cut into fine-tuning examples;
- `code_modules`: the seeded split of modules into training and held-out, shared by
  the code tasks, the docstring probe and `mix_in_code`;
- `function_headers`: the prompts of the docstring probe;
- `mix_in_code`: whole training modules, docstrings and comments kept, shuffled in
  among the prose of pre-training until they make up a given share of its
  characters. A held-out module never enters pre-training, so the code tasks'
  held-out loss and the docstring probe's prompts stay unseen.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import random
import re
import sysconfig
import tokenize
from functools import lru_cache
from pathlib import Path

from overtrain.data.packages import cache_dir
from overtrain.data.splits import split_by_group
from overtrain.errors import DataError

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


def stripped_stdlib(sources: dict[str, str]) -> dict[str, str]:
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


def mix_in_code(prose: list[str], fraction: float, seed: int) -> list[str]:
    """`prose` plus code modules making up `fraction` of the characters of the result."""
    if not 0 <= fraction < 1:
        raise DataError(f"data.code_fraction={fraction}: must be in [0, 1)")
    sources = stdlib_sources()
    modules, _ = code_modules(seed)
    random.Random(seed).shuffle(modules)
    wanted = fraction / (1 - fraction) * sum(map(len, prose))
    code, chars = [], 0
    for module in modules:
        if chars >= wanted:
            break
        code.append(sources[module])
        chars += len(sources[module])
    if chars < wanted:
        raise DataError(f"data.code_fraction={fraction}: the code tasks' training modules hold {chars:,} characters, "
                        f"{wanted:,.0f} are needed; lower it")
    documents = prose + code
    random.Random(seed + 1).shuffle(documents)
    return documents
