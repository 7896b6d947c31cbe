"""Kill a real study (SIGKILL to its whole process group) and resume it: the results are
those of an uninterrupted run, bit for bit, with no row lost or duplicated."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from tiny_study import KILL_POINTS, checkpoint_hashes, comparable, run_in_subprocess, tiny_study

from overtrain.spec import parse_spec
from overtrain.study.folder import RunFolder
from overtrain.study.runner import run_study
from overtrain.study.store import load_results, study_status

KILLED = -9
IDENTITY = ["cell", "metric", "step", "gamma", "seed"]


def reference_run(study: dict, folder, monkeypatch):
    """The same study uninterrupted, in this process, with the threads of a `--workers 1` worker."""
    monkeypatch.chdir(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count())
    try:
        run_study(parse_spec(study), folder / "reference", workers=0)
    finally:
        torch.set_num_threads(threads)
    return folder / "reference"


def assert_same_as(run_dir, reference):
    results = load_results(run_dir)
    assert not results.duplicated(IDENTITY).any()
    assert comparable(results).equals(comparable(load_results(reference)))
    assert checkpoint_hashes(run_dir) == checkpoint_hashes(reference)  # resumed pre-training is bit-identical
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written folder


def write(study: dict, folder):
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_killed_mid_pretraining_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    study = tiny_study(tmp_path, pretrain={"schedules": ["constant"]}, finetune={"lrs": [1e-3]})
    path = write(study, tmp_path)
    killed = run_in_subprocess(path, tmp_path / "run", fault="kill:checkpoint-saved#1")
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    cells = study_status(tmp_path / "run").set_index("label")["status"]
    assert cells["pretrain constant"] == "interrupted" and (cells.drop("pretrain constant") == "pending").all()

    reference = reference_run(study, tmp_path, monkeypatch)
    resumed = run_in_subprocess(path, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert set(study_status(tmp_path / "run")["status"]) == {"done"}
    assert_same_as(tmp_path / "run", reference)
    key = study_status(tmp_path / "run").set_index("label").loc["pretrain constant", "key"]
    assert RunFolder(tmp_path / "run").log(key).read_text().count("== pretrain constant") == 2  # killed, then resumed


def test_two_seeds_killed_between_their_checkpoints_resume_from_the_step_both_saved(tmp_path, monkeypatch):
    """Two pre-training seeds as one ensemble job (steps of 128 tokens: checkpoints at steps 8
    and 16), killed after seed 0 saved step 16 and before seed 1 did: both go back to step 8
    and end bit for bit as uninterrupted, seed 0's step-16 checkpoint written again."""
    study = tiny_study(tmp_path, pretrain={"schedules": ["constant"], "seeds": [0, 1]}, finetune={"lrs": [1e-3]})
    path = write(study, tmp_path)
    killed = run_in_subprocess(path, tmp_path / "run", fault="kill:checkpoint-saved#3")
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    assert sorted(checkpoint_hashes(tmp_path / "run")) == ["constant-1024", "constant-1024-seed1", "constant-2048"]

    reference = reference_run(study, tmp_path, monkeypatch)
    resumed = run_in_subprocess(path, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert set(study_status(tmp_path / "run")["status"]) == {"done"}
    assert_same_as(tmp_path / "run", reference)


@pytest.mark.slow
def test_a_study_killed_at_every_kind_of_point_ends_as_if_never_killed(tmp_path, monkeypatch):
    study = tiny_study(tmp_path)
    path = write(study, tmp_path)
    for point in KILL_POINTS:
        killed = run_in_subprocess(path, tmp_path / "run", fault=f"kill:{point}")
        assert killed.returncode == KILLED, (point, killed.stderr[-2000:])
    finished = run_in_subprocess(path, tmp_path / "run")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert set(study_status(tmp_path / "run")["status"]) == {"done"}
    assert_same_as(tmp_path / "run", reference_run(study, tmp_path, monkeypatch))
