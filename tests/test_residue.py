"""Behavioural residue: code in pre-training without held-out modules, the docstring probe, a study."""

from __future__ import annotations

import ast
import itertools
import os

import pytest
import torch
import yaml

from overtrain.data.code import code_modules, function_headers, mix_in_code, stdlib_sources, strip_docstrings_and_comments
from overtrain.data.tasks import load_task
from overtrain.probes.residue import docstring_prompts, docstring_rate, opens_with_docstring, sample_continuations
from overtrain.train.loop import TrainConfig, train
from overtrain.train.schedules import Schedule

DOCUMENTABLE = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@pytest.mark.parametrize("body, expected", [
    ('"""Return x."""\n', True), ("'''Doc'''", True), ('r"""raw"""', True), ('  "one line"', True),
    ('\n        """Doc."""', True), ("\n\n    'x'", True),
    ("return x\n", False), ("# comment\n", False), ("x = '''not first'''", False), ("\n    pass", False), ("", False),
])
def test_a_body_opens_with_a_docstring_only_if_its_first_statement_is_a_string(body, expected):
    assert opens_with_docstring(body) is expected


def test_function_headers_end_at_the_colon_before_the_body():
    source = 'class A:\n    def f(self,\n          x):\n        """Doc."""\n        return x\n\ndef g(): return 1\n'
    assert function_headers(source) == ["    def f(self,\n          x):"]  # g's body is on its def line


def test_a_prompt_ends_on_a_token_boundary_of_the_function_it_comes_from():
    """With a BPE vocabulary the prompt's tokens begin the function's tokens: the model
    continues from a state that real code puts it in."""
    from overtrain.data.tokenizer import train_tokenizer

    sources = stdlib_sources()
    train_modules, heldout_modules = code_modules(seed=0)
    tokenizer = train_tokenizer([sources[m] for m in train_modules[:60]], 2048)
    source = sources[heldout_modules[0]]
    for header in function_headers(source)[:20]:
        function = source[source.index(header):]
        prompt_ids = tokenizer(header, add_special_tokens=False)["input_ids"]
        assert tokenizer(function, add_special_tokens=False)["input_ids"][:len(prompt_ids)] == prompt_ids, header


def test_code_mixed_into_pretraining_never_holds_a_held_out_module():
    prose = ["A sentence of prose. " * 40] * 200
    mixed = mix_in_code(prose, 0.25, seed=0)
    sources = stdlib_sources()
    train_modules, heldout_modules = code_modules(seed=0)
    code = [doc for doc in mixed if doc not in prose]
    assert code and sum(map(len, code)) >= 0.25 * sum(map(len, mixed)) - max(map(len, code))
    heldout_texts = {sources[m] for m in heldout_modules}
    assert not heldout_texts & set(code)
    assert set(code) <= {sources[m] for m in train_modules}
    assert any('"""' in doc for doc in code)  # docstrings kept: the habit is there to learn


def test_docstring_prompts_come_from_the_code_tasks_held_out_modules():
    prompts = docstring_prompts(seed=0, n=20)
    _, heldout_modules = code_modules(seed=0)
    heldout_headers = {h for m in heldout_modules for h in function_headers(stdlib_sources()[m])}
    assert len(prompts) == 20 and set(prompts) <= heldout_headers
    assert load_task("code_nodoc", seed=0).metadata["heldout_modules"] == heldout_modules


def test_the_fine_tuning_code_holds_no_docstring():
    train_modules, _ = code_modules(seed=0)
    for module in train_modules[:30]:
        tree = ast.parse(strip_docstrings_and_comments(stdlib_sources()[module]))
        documented = [node for node in ast.walk(tree) if isinstance(node, DOCUMENTABLE) and ast.get_docstring(node)]
        assert not documented, module


def test_docstring_rate_is_seeded_and_sees_what_the_model_writes(tiny_model, byte_corpus):
    tokenizer = byte_corpus.tokenizer
    prompts = docstring_prompts(seed=0, n=6)
    first = docstring_rate(tiny_model, tokenizer, prompts, seed=3)
    assert first == docstring_rate(tiny_model, tokenizer, prompts, seed=3)
    assert first < 0.5
    # Taught that a quote follows anything, the model opens (nearly) every body with a string.
    quote = tokenizer.convert_tokens_to_ids('"')
    quotes = {"input_ids": torch.full((8, 32), quote), "labels": torch.full((8, 32), quote)}
    train(tiny_model, itertools.repeat(quotes), TrainConfig(steps=40, schedule=Schedule("constant", 1e-2, 40)))
    assert docstring_rate(tiny_model, tokenizer, prompts, seed=3) >= 0.9


def test_the_same_seed_samples_the_same_text(tiny_model, byte_corpus):
    tokenizer, prompt = byte_corpus.tokenizer, docstring_prompts(seed=0, n=1)[0]

    def sampled(seed: int) -> list[str]:
        return sample_continuations(tiny_model, tokenizer, [prompt], 4, 24, torch.Generator().manual_seed(seed))

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)
    assert all(len(text) <= 24 for text in sampled(7))  # bytes: one character per token


@pytest.mark.timeout(600)
def test_a_study_with_code_in_pretraining_reports_the_docstring_rate_before_and_after(tmp_path):
    from tiny_study import tiny_study

    from overtrain.analysis.report import build_report
    from overtrain.spec import load_spec
    from overtrain.study.runner import run_study
    from overtrain.study.store import load_results

    study = tiny_study(tmp_path, data={"code_fraction": 0.3}, pretrain={"schedules": ["cosine"]}, sensitivity=None,
                       finetune={"tasks": ["code_nodoc"], "docstring_prompts": 3, "eval_every": 0})
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    os.chdir(tmp_path)
    run_study(load_spec(tmp_path / "study.yaml"), tmp_path / "run", workers=0)
    rates = load_results(tmp_path / "run").query("metric == 'docstring_rate'")
    assert set(rates["step"]) == {0, 2} and len(rates) == 2 * 2 * 2  # checkpoints x LRs x before/after
    assert rates["value"].between(0, 1).all()
    summary = (build_report(tmp_path / "run", n_boot=50) / "summary.md").read_text()
    assert "Behavioural residue" in summary and "after fine-tuning on code_nodoc" in summary
    recommendation = summary[summary.index("## Recommendation"):summary.index("## Base model")]
    assert "Behavioural residue on code_nodoc: sampled function bodies open with a docstring" in recommendation
