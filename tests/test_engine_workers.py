"""Cells in worker processes (`--workers 2`) give the results of an inline run."""

from __future__ import annotations

import os

import numpy as np
import pytest
from tiny_study import comparable, tiny_study

from overtrain.spec import parse_spec
from overtrain.study.folder import RunFolder
from overtrain.study.runner import run_study
from overtrain.study.store import load_results, study_status

# The constant run, its wsd branches, probes of all four checkpoints, eight fine-tunes.
SMALL = {"pretrain": {"schedules": ["constant", "wsd"]}, "sensitivity": None}


@pytest.fixture(scope="module")
def inline_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inline")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        run_study(parse_spec(tiny_study(folder, **SMALL)), folder / "run", workers=0)
    return comparable(load_results(folder / "run"))


def assert_same_results(run_dir, expected):
    cells = study_status(run_dir)
    assert set(cells["status"]) == {"done"} and len(cells) == 15
    got = comparable(load_results(run_dir))
    assert got.drop(columns=["value", "weights"]).equals(expected.drop(columns=["value", "weights"]))
    # Thread counts may differ from the inline run, so sums may round differently.
    assert np.allclose(got["value"], expected["value"], rtol=1e-4, atol=1e-6, equal_nan=True)
    for key in cells["key"]:
        assert RunFolder(run_dir).log(key).read_text().startswith("== ")


def test_two_worker_processes(inline_results, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_study(parse_spec(tiny_study(tmp_path, **SMALL)), tmp_path / "run", workers=2)
    assert_same_results(tmp_path / "run", inline_results)
    threads = {line.split("|")[3].strip() for line in
               (log.read_text().splitlines()[0] for log in (tmp_path / "run" / "logs").iterdir())}
    assert threads == {f"{max(1, os.cpu_count() // 2)} threads"}
