"""Bad input that the study file alone does not show (test_spec.py covers the file itself):
each fails with one line naming the problem and exit code 2, and writes nothing."""

from __future__ import annotations

import errno
import fcntl
import json
from collections import Counter

import pytest
import torch
import yaml
from tiny_study import tiny_study
from typer.testing import CliRunner

from overtrain.cli import app
from overtrain.models.build import build_model
from overtrain.models.checkpoints import save_checkpoint
from overtrain.runtime import faults
from overtrain.spec import ModelSize, parse_spec
from overtrain.study.folder import RunFolder
from overtrain.study.store import study_status


def run(study: dict, folder, *flags: str):
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return CliRunner().invoke(app, ["run", str(path), "--out", str(folder / "run"), "--workers", "0", *flags])


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*")) if folder.exists() else None


def assert_refused(result, *expected: str):
    message = result.output.strip()
    assert result.exit_code == 2, result.output
    assert message.count("\n") == 0 and message.startswith("error: "), message
    for part in expected:
        assert part in message, message


@pytest.fixture()
def inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_empty_corpus(inputs):
    (inputs / "empty.txt").write_text("\n\n  \n")
    result = run(tiny_study(inputs, data={"corpus": str(inputs / "empty.txt")}), inputs)
    assert_refused(result, "empty.txt", "empty corpus")
    assert not (inputs / "run").exists()


def test_corpus_that_is_not_utf8(inputs):
    corpus = inputs / "latin1.txt"
    corpus.write_bytes(b"A first document.\n\nA second one,\n\x8cquoted in Windows-1252\x9d.\n")
    result = run(tiny_study(inputs, data={"corpus": str(corpus)}), inputs)
    assert_refused(result, f"{corpus}: line 4 is not UTF-8 (byte 0x8c at column 1)")
    assert not (inputs / "run").exists()


def test_task_file_that_is_not_utf8(inputs):
    study = tiny_study(inputs)
    lines = (inputs / "task.jsonl").read_bytes().splitlines()
    lines[2] = b'{"prompt": "caf\xe9", "completion": " latin-1"}'
    (inputs / "task.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert_refused(run(study, inputs), "task.jsonl: line 3 is not UTF-8 (byte 0xe9 at column 16)")
    assert not (inputs / "run").exists()


def test_corpus_too_small_for_the_largest_budget(inputs):
    result = run(tiny_study(inputs, pretrain={"budgets": [1024, 4_096_000]}), inputs)
    assert_refused(result, "pretrain.budgets", "epochs", "more than the 4 allowed")
    assert not (inputs / "run").exists()


def test_task_file_with_a_malformed_line(inputs):
    study = tiny_study(inputs)
    lines = (inputs / "task.jsonl").read_text().splitlines()
    lines[2] = '{"prompt": "unterminated'
    (inputs / "task.jsonl").write_text("\n".join(lines) + "\n")
    assert_refused(run(study, inputs), "task.jsonl", "line 3")
    assert not (inputs / "run").exists()


def test_run_folder_of_an_incompatible_study(inputs):
    (inputs / "run").mkdir()
    other = parse_spec(tiny_study(inputs, model={"d_model": 64}))
    (inputs / "run" / "study.json").write_text(json.dumps(other.model_dump(mode="json")))
    before = snapshot(inputs / "run")
    assert_refused(run(tiny_study(inputs), inputs), "different `model` section")
    assert snapshot(inputs / "run") == before


def test_unwritable_output_folder(inputs):
    (inputs / "file").write_text("")
    study = inputs / "study.yaml"
    study.write_text(yaml.safe_dump(tiny_study(inputs)))
    result = CliRunner().invoke(app, ["run", str(study), "--out", str(inputs / "file" / "run"), "--workers", "0"])
    assert_refused(result, "not writable")


def test_run_folder_in_use_by_another_run(inputs):
    (inputs / "run").mkdir()
    with open(RunFolder(inputs / "run").lock, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert_refused(run(tiny_study(inputs), inputs), "another `overtrain run` is using this folder")


@pytest.mark.parametrize("flags, expected", [(["--executor", "slurm"], "unknown executor"),
                                             (["--address", "ray://head:10001"], "only with --executor ray")])
def test_bad_executor_options(inputs, flags, expected):
    assert_refused(run(tiny_study(inputs), inputs, *flags), expected)
    assert not (inputs / "run").exists()


# -- checkpoints in the run folder that were changed by hand --------------------------------

@pytest.fixture()
def run_with_a_checkpoint(inputs, byte_corpus):
    """A run folder of the tiny study holding its first checkpoint, as a run would leave it."""
    study = tiny_study(inputs, pretrain={"schedules": ["cosine"]})
    spec = parse_spec(study)
    (inputs / "run").mkdir()
    (inputs / "run" / "study.json").write_text(json.dumps(spec.model_dump(mode="json")))
    size = ModelSize(**spec.model.size().__dict__)
    model = build_model(size, len(byte_corpus.tokenizer), seed=0)
    folder = inputs / "run" / "checkpoints" / "cosine-1024"
    save_checkpoint(model, byte_corpus.tokenizer, folder, {"cell": "k", "step": 8, "tokens": 1024})
    return study, folder


@pytest.mark.parametrize("missing, expected", [("model.safetensors", "no weights"), ("config.json", "no config.json")])
def test_checkpoint_without_weights_or_config(run_with_a_checkpoint, inputs, missing, expected):
    study, folder = run_with_a_checkpoint
    (folder / missing).unlink()
    before = snapshot(inputs / "run")
    assert_refused(run(study, inputs), "cosine-1024", expected)
    assert snapshot(inputs / "run") == before


def test_checkpoint_with_another_tokenizer(run_with_a_checkpoint, inputs, python_docs):
    from overtrain.data.corpus import prepare_corpus

    study, folder = run_with_a_checkpoint
    other = prepare_corpus(python_docs[8:40], python_docs[:8], 300).tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    other.save_pretrained(folder)
    before = snapshot(inputs / "run")
    assert_refused(run(study, inputs), "cosine-1024", "tokenizer", "does not match")
    assert snapshot(inputs / "run") == before


# -- disk full: the cell fails, the study stops, nothing half-written stays -----------------

def test_disk_full_while_writing_a_checkpoint_stops_the_study(inputs, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    study = tiny_study(inputs, pretrain={"schedules": ["cosine"]}, finetune={"lrs": [1e-3]})
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full_disk)  # the optimizer state, written into every pre-training checkpoint
        result = run(study, inputs)
    assert result.exit_code == 2, result.output  # after the progress line and the failed cell's note:
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "disk full while running `pretrain cosine" in errors[0] and "free space" in errors[0]
    cells = study_status(inputs / "run")
    assert (cells["status"] == "failed").sum() == 1 and "No space left on device" in cells.loc[cells["status"] == "failed", "error"].iloc[0]
    # The study stopped at once: the other run never started, the failed run's readers are blocked by it.
    assert cells["status"].value_counts().to_dict() == {"pending": 3, "blocked": 2, "failed": 1}
    checkpoints = inputs / "run" / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.iterdir())  # no partial checkpoint


def test_a_run_with_a_failed_cell_exits_non_zero_after_writing_what_it_has(inputs, monkeypatch):
    monkeypatch.setattr(faults, "_visits", Counter())  # visits counted by earlier tests in this process
    monkeypatch.setenv("OVERTRAIN_FAULT", "raise:cell-pretrain#1")
    result = run(tiny_study(inputs, pretrain={"schedules": ["cosine"]}, sensitivity=None, finetune={"lrs": [1e-3]}),
                 inputs)
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert error == [f"error: 1 cell failed: `overtrain status {inputs / 'run'}` shows why; `overtrain run "
                     f"{inputs / 'study.yaml'} --out {inputs / 'run'} --retry-failed` runs them again"]
    assert (inputs / "run" / "results.csv").exists()
    monkeypatch.delenv("OVERTRAIN_FAULT")
    assert run(tiny_study(inputs, pretrain={"schedules": ["cosine"]}, sensitivity=None, finetune={"lrs": [1e-3]}),
               inputs, "--retry-failed").exit_code == 0
