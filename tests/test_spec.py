"""Bad study files fail before any work: one line naming key or file, exit code 2."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from overtrain.cli import app

GOOD = "pretrain:\n  budgets: [4096, 8192]\n  peak_lr: 3e-3\n"

BAD = {
    "malformed": ("pretrain: [4096, 8192\n", "malformed YAML"),
    "unknown key": (GOOD + "finetuning:\n  lrs: [1e-4]\n", "finetuning: unknown key"),
    "nested unknown key": ("pretrain:\n  budgets: [4096]\n  peak_lrs: 1e-3\n", "pretrain.peak_lrs: unknown key"),
    "wrong type": ("pretrain:\n  budgets: [4096, 8192]\n  batch_size: 'sixteen'\n", "pretrain.batch_size"),
    "non-increasing budgets": ("pretrain:\n  budgets: [8192, 4096]\n", "pretrain.budgets: must be strictly increasing"),
    "non-positive lr": (GOOD + "finetune:\n  lrs: [1e-4, 0.0]\n", "finetune.lrs.1: Input should be greater than 0"),
    "negative peak lr": ("pretrain:\n  budgets: [4096]\n  peak_lr: -1e-3\n", "pretrain.peak_lr"),
    "missing corpus": (GOOD + "data:\n  corpus: /nonexistent/corpus.jsonl\n", "data.corpus: file not found: /nonexistent/corpus.jsonl"),
    "missing task file": (GOOD + "finetune:\n  tasks: [/nonexistent/task.jsonl]\n", "finetune.tasks: file not found"),
    "not a mapping": ("- 1\n- 2\n", "expected a mapping"),
    "wsd branch inside warmup": ("pretrain:\n  budgets: [40960, 81920]\n  schedules: [constant, wsd]\n  warmup_tokens: 40000\n",
                                 "pretrain.warmup_tokens: 40000 tokens is past where the wsd branch"),
    "heads do not divide width": (GOOD + "model:\n  d_model: 30\n", "model.d_model=30 is not divisible"),
    "neither pretrain nor checkpoints": ("finetune:\n  lrs: [1e-4]\n", "pretrain: missing (or `checkpoints`"),
    "pretrain and checkpoints": (GOOD + "checkpoints:\n  folders: ckpts/*\n", "drop `pretrain` or `checkpoints`"),
    "checkpoints without a source": ("checkpoints:\n  seq_len: 64\n", "checkpoints: give `folders`, `hub`"),
    "hub without revisions": ("checkpoints:\n  hub: EleutherAI/pythia-70m\n", "checkpoints.revisions: `hub` and"),
    "tokenizer beside checkpoints": ("checkpoints:\n  folders: ckpts/*\ntokenizer:\n  vocab_size: 512\n",
                                     "tokenizer: the checkpoints bring their own"),
    "no schedule": ("pretrain:\n  budgets: [4096]\n  schedules: []\n", "pretrain.schedules: is empty"),
}
# List keys whose empty list would run the section and measure nothing: each is refused by name.
EMPTY_MEASURES_NOTHING = {
    "sensitivity.gammas": "`sensitivity: null` skips the probe",
    "sensitivity.seeds": "`sensitivity: null` skips the probe",
    "sharpness.kl_seeds": "the KL proxy needs at least one noise seed",
    "finetune.tasks": "`finetune: null` skips fine-tuning",
    "finetune.lrs": "`finetune: null` skips fine-tuning",
    "finetune.seeds": "`finetune: null` skips fine-tuning",
}
for key, advice in EMPTY_MEASURES_NOTHING.items():
    section, field = key.split(".")
    BAD[f"empty {key}"] = (GOOD + f"{section}:\n  {field}: []\n", f"{key}: is empty, so nothing would be measured; {advice}")


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_study_file_fails_with_one_named_line_and_exit_2(case, tmp_path):
    text, expected = BAD[case]
    study = tmp_path / "study.yaml"
    study.write_text(text)
    result = CliRunner().invoke(app, ["run", str(study), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.count("\n") == 0 and expected in message and str(study) in message
    assert not (tmp_path / "run").exists()  # nothing written


def test_missing_study_file(tmp_path):
    result = CliRunner().invoke(app, ["run", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "no such study file" in result.output


def test_yaml_exponent_floats_are_numbers(tmp_path):
    from overtrain.spec import load_spec

    (tmp_path / "s.yaml").write_text(GOOD + "finetune:\n  lrs: [1e-4, 2.5E-3]\n")
    spec = load_spec(tmp_path / "s.yaml")
    assert spec.pretrain.peak_lr == 3e-3 and spec.finetune.lrs == [1e-4, 2.5e-3]


def test_study_reference_doc_is_up_to_date():
    from pathlib import Path

    from overtrain.api import keys

    doc = Path(__file__).parents[1] / "docs" / "STUDY.md"
    assert doc.read_text() == keys() + "\n", "regenerate with: overtrain keys > docs/STUDY.md"
    assert "`sensitivity.gammas`" in doc.read_text()


def test_empty_lists_that_mean_none_are_accepted():
    from overtrain.spec import parse_spec

    spec = parse_spec({"pretrain": {"budgets": [4096]}, "finetune": {"benchmarks": []}, "mitigations": {"l2": [], "lora": [4]}})
    assert spec.finetune.benchmarks == [] and spec.mitigations.l2 == []


def test_spec_imports_no_torch():
    # The CLI checks a study (theory section included) before anything heavy is loaded.
    code = ("import sys\nimport overtrain.spec as s\n"
            "s.parse_spec({'pretrain': {'budgets': [4096]}, 'theory': {}})\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('overtrain'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
