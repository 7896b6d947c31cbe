"""What `status` and the progress bar say about a run folder, on real tiny studies:
cells behind a diverged or failed pre-training run are blocked, not pending; a resumed
run's bar starts at the cells already done."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from tiny_study import tiny_study
from typer.testing import CliRunner

from overtrain.cli import app
from overtrain.runtime import faults
from overtrain.spec import parse_spec
from overtrain.study.runner import run_study
from overtrain.study.store import study_status

# Two cosine runs, a probe of each checkpoint and one fine-tune of each: six cells.
COSINE = {"pretrain": {"schedules": ["cosine"]}, "sensitivity": None, "finetune": {"lrs": [1e-3]}}


@pytest.fixture()
def inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def status_lines(run_dir) -> list[str]:
    result = CliRunner().invoke(app, ["status", str(run_dir)])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_cells_behind_a_diverged_pretraining_run_are_blocked_by_it(inputs):
    # The constant run diverges before its first checkpoint: its wsd branches never start,
    # and nothing is left to probe or fine-tune.
    study = tiny_study(inputs, pretrain={"schedules": ["constant", "wsd"], "peak_lr": 1e4}, sensitivity=None)
    run_study(parse_spec(study), inputs / "run", workers=0)

    cells = study_status(inputs / "run").set_index("label")
    assert cells.loc["pretrain constant", "status"] == "diverged"
    assert cells.loc["pretrain constant", "note"] == ""  # a note only where there is something to say
    behind = cells.drop("pretrain constant")
    assert len(behind) == 14 and set(behind["status"]) == {"blocked"}
    assert set(behind["note"]) == {"blocked by the diverged cell pretrain constant"}  # the branches' readers too
    lines = status_lines(inputs / "run")
    assert "15 cells: 14 blocked, 1 diverged; 14 remain" in lines
    assert "blocked: probe wsd-2048 (blocked by the diverged cell pretrain constant)" in lines


def test_cells_behind_a_failed_pretraining_run_are_blocked_by_it(inputs, monkeypatch):
    monkeypatch.setattr(faults, "_visits", Counter())  # visits counted by earlier tests in this process
    monkeypatch.setenv("OVERTRAIN_FAULT", "raise:cell-pretrain#1")  # the longest run starts first, and fails
    run_study(parse_spec(tiny_study(inputs, **COSINE)), inputs / "run", workers=0)

    cells = study_status(inputs / "run").set_index("label")["status"].to_dict()
    assert cells == {"pretrain cosine 1,024 tokens": "done", "pretrain cosine 2,048 tokens": "failed",
                     "probe cosine-1024": "done", "probe cosine-2048": "blocked",
                     "finetune cosine-1024 task.jsonl lr=0.001 seed=0": "done",
                     "finetune cosine-2048 task.jsonl lr=0.001 seed=0": "blocked"}
    lines = status_lines(inputs / "run")
    assert "blocked: probe cosine-2048 (blocked by the failed cell pretrain cosine 2,048 tokens)" in lines

    monkeypatch.delenv("OVERTRAIN_FAULT")
    run_study(parse_spec(tiny_study(inputs, **COSINE)), inputs / "run", workers=0, retry_failed=True)
    assert set(study_status(inputs / "run")["status"]) == {"done"}  # blocked cells run once their input is made


def bar_counts(stderr: str, total: int) -> list[int]:
    """Every count the study's progress bar showed, in order (`study tiny: ... 3/8 [...`)."""
    return [int(n) for n in re.findall(rf"study tiny:[^\r\n]*?(\d+)/{total} \[", stderr)]


def test_a_resumed_run_starts_its_progress_bar_at_the_cells_already_done(inputs, capsys):
    run_study(parse_spec(tiny_study(inputs, **COSINE)), inputs / "run", workers=0)
    first = bar_counts(capsys.readouterr().err, 6)
    assert first[0] == 0 and first[-1] == 6

    run_study(parse_spec(tiny_study(inputs, **COSINE)), inputs / "run", workers=0)
    assert set(bar_counts(capsys.readouterr().err, 6)) == {6}  # nothing to do: full from the start

    # A second LR: two new fine-tunes; the six finished cells (four of them behind checkpoints) are counted up front.
    edited = tiny_study(inputs, **{**COSINE, "finetune": {"lrs": [1e-3, 1e-2]}})
    run_study(parse_spec(edited), inputs / "run", workers=0)
    resumed = bar_counts(capsys.readouterr().err, 8)
    assert resumed[0] == 6 and resumed[-1] == 8 and resumed == sorted(resumed)
