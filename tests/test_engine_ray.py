"""Cells as Ray tasks on a real local Ray instance (skipped when Ray is not installed)."""

from __future__ import annotations

import pytest
from tiny_study import tiny_study

from overtrain.spec import parse_spec
from overtrain.study.folder import RunFolder
from overtrain.study.runner import run_study
from overtrain.study.store import load_results, study_status

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'overtrain[ray]'")


def test_a_study_runs_as_ray_tasks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = tiny_study(tmp_path, pretrain={"schedules": ["cosine"]}, sensitivity=None, finetune={"lrs": [1e-3]})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_study(parse_spec(study), tmp_path / "run", workers=2, executor="ray")
    finally:
        ray.shutdown()
    cells = study_status(tmp_path / "run")
    assert len(cells) == 6 and set(cells["status"]) == {"done"}
    assert set(load_results(tmp_path / "run")["cell"]) == set(cells["key"])
    for key in cells["key"]:
        assert RunFolder(tmp_path / "run").log(key).read_text().startswith("== ")
    assert (tmp_path / "run" / "corpus").is_dir()  # workers on other nodes read the corpus from the run folder
