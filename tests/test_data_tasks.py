"""Fine-tuning tasks: loading, group-wise splits, prompt masking, docstring stripping."""

from __future__ import annotations

import ast
import io
import json
import sysconfig
import tokenize
from pathlib import Path

import pytest

from overtrain.data.code import strip_docstrings_and_comments
from overtrain.data.examples import tokenize_examples
from overtrain.data.tasks import BUILTIN_TASKS, Example, load_task, normalize
from overtrain.data.tokenizer import train_tokenizer
from overtrain.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(python_docs):
    return train_tokenizer(python_docs, 600)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_builtin_task_loads_with_disjoint_seeded_splits(name):
    task = load_task(name, seed=1)
    assert len(task.train) > 500 and len(task.heldout) > 100
    assert all(e.completion for e in task.train + task.heldout)
    if not name.startswith("code"):  # code chunks have no prompt; they are split by module (below)
        assert not {normalize(e.prompt) for e in task.heldout} & {normalize(e.prompt) for e in task.train}
    again = load_task(name, seed=1)
    assert [e.completion for e in again.heldout] == [e.completion for e in task.heldout]
    assert [e.completion for e in load_task(name, seed=2).heldout] != [e.completion for e in task.heldout]


def test_math_heldout_questions_never_appear_in_train():
    task = load_task("math")
    question = lambda e: normalize(e.prompt.removeprefix("Question: ").removesuffix("\nAnswer:"))  # noqa: E731
    train_questions = {question(e) for e in task.train}
    assert len(task.train) + len(task.heldout) == 1319
    assert not any(question(e) in train_questions for e in task.heldout)
    example = task.heldout[0]
    assert example.prompt.startswith("Question: ") and example.prompt.endswith("\nAnswer:")
    assert example.completion.startswith(" ") and "\n#### " in example.completion
    assert "<<" not in example.completion  # calculator annotations removed


@pytest.mark.parametrize("name, n_choices", [("qa", 3), ("classify", 2)])
def test_multiple_choice_tasks_keep_choices_and_gold(name, n_choices):
    task = load_task(name)
    assert task.is_multiple_choice
    for example in task.heldout[:200]:
        assert len(example.choices) == n_choices and example.choices[example.gold] == example.completion
    if name == "classify":
        assert {e.completion for e in task.train} == {" yes", " no"}
        assert task.heldout[0].prompt.endswith("?\nAnswer:")


def test_code_task_is_split_by_module_and_records_python():
    task = load_task("code")
    assert task.metadata["python"].count(".") == 2 and len(task.metadata["stdlib_sha256"]) == 64
    assert 0 < len(task.metadata["heldout_modules"]) < task.metadata["modules"]
    assert all(e.prompt == "" and len(e.completion) <= 1500 for e in task.train[:500])


SAMPLE = '''#!/usr/bin/env python3
"""Module docstring."""
import os  # a trailing comment

# a comment line
class Thing:
    """Class docstring
    over two lines."""

    def method(self):
        """Only a docstring."""

    def other(self):
        \'\'\'Docstring.\'\'\'
        text = "# not a comment"
        return text  # trailing


def one_liner(): "doc"; return 1
'''


def _docstrings(source: str) -> list[str]:
    nodes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
    return [ast.get_docstring(n) for n in nodes if ast.get_docstring(n)]


def _comments(source: str) -> list[str]:
    return [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]


def test_strip_docstrings_and_comments_keeps_code_that_compiles():
    stripped = strip_docstrings_and_comments(SAMPLE)
    compile(stripped, "<stripped>", "exec")
    assert not _docstrings(stripped) and not _comments(stripped)
    assert 'text = "# not a comment"' in stripped and "import os\n" in stripped
    assert "    def method(self):\n        pass\n" in stripped
    assert "def one_liner(): return 1" in stripped.replace("  ", " ")


@pytest.mark.parametrize("module", ["textwrap.py", "json/decoder.py", "collections/__init__.py", "argparse.py"])
def test_strip_docstrings_on_real_stdlib_modules(module):
    source = (Path(sysconfig.get_paths()["stdlib"]) / module).read_text(encoding="utf-8")
    stripped = strip_docstrings_and_comments(source)
    compile(stripped, module, "exec")
    assert _docstrings(source) and not _docstrings(stripped) and not _comments(stripped)


def test_code_task_without_docstrings():
    plain, stripped = load_task("code"), load_task("code", strip_docstrings=True)
    assert stripped.metadata["strip_docstrings"] and stripped.metadata["heldout_modules"] == plain.metadata["heldout_modules"]

    def count(task, marker):
        return sum(line.lstrip().startswith(marker) for e in task.train for line in e.completion.splitlines())

    # Triple-quoted strings that are not docstrings (templates, test data) remain.
    assert count(stripped, '"""') < count(plain, '"""') / 5
    assert count(stripped, "#") < count(plain, "#") / 20


def test_prompt_tokens_are_masked_exactly(tokenizer):
    examples = [Example("Question: what is two and two?\nAnswer:", " four"), Example("", "print('hi')\n")]
    rows = tokenize_examples(examples, tokenizer, max_len=64)
    for example, row in zip(examples, rows):
        prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == prompt_ids + completion_ids + [tokenizer.eos_token_id]
        assert row["labels"] == [-100] * len(prompt_ids) + completion_ids + [tokenizer.eos_token_id]
        assert row["completion_bytes"] == len(example.completion.encode()) + 1


def test_long_examples_lose_prompt_from_the_left_then_completion_from_the_right(tokenizer):
    example = Example("word " * 100 + "Answer:", " yes")
    row = tokenize_examples([example], tokenizer, max_len=16)[0]
    assert len(row["input_ids"]) == 16 and row["labels"][-2:] == row["input_ids"][-2:]
    assert row["labels"][-1] == tokenizer.eos_token_id and row["completion_bytes"] == 5
    long_completion = Example("Q:", " é" * 100)
    row = tokenize_examples([long_completion], tokenizer, max_len=16)[0]
    kept = [t for t in row["labels"] if t != -100]
    assert len(row["input_ids"]) == 16 and tokenizer.eos_token_id not in kept
    # A byte-level token stands for as many bytes as it has characters; the cut may split "é".
    assert row["completion_bytes"] == sum(len(token) for token in tokenizer.convert_ids_to_tokens(kept)) < 200


def test_jsonl_user_task_and_its_errors(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Q{i}:", "completion": f" A{i}"}) for i in range(20)) + "\n")
    task = load_task(f"jsonl:{path}", seed=0)
    assert len(task.train) == 18 and len(task.heldout) == 2
    assert load_task(str(path)).heldout == task.heldout
    path.write_text('{"prompt": "Q:", "completion": " A"}\n{"prompt": "Q2:"}\n')
    with pytest.raises(DataError, match=r"task\.jsonl: line 2: missing field 'completion'"):
        load_task(str(path))
    path.write_text('{"prompt": "Q:", "completion": " A"}\nnot json\n')
    with pytest.raises(DataError, match=r"task\.jsonl: line 2: malformed JSON"):
        load_task(str(path))
    path.write_bytes(b'{"prompt": "Q:", "completion": " A"}\n{"prompt": "\xe9", "completion": " B"}\n')
    with pytest.raises(DataError, match=r"task\.jsonl: line 2 is not UTF-8 \(byte 0xe9 at column 13\)"):
        load_task(str(path))
    path.write_text('{"prompt": "Q:", "completion": " A"}\n{"prompt": "q: ", "completion": " B"}\n')
    with pytest.raises(DataError, match="1 distinct group"):
        load_task(str(path))
    with pytest.raises(DataError, match="unknown"):
        load_task("no-such-task")
    with pytest.raises(DataError, match="unknown option"):
        load_task("math", strip_docstrings=True)
    with pytest.raises(DataError, match="heldout_fraction=0"):
        load_task("math", heldout_fraction=0)
