"""The study engine on a real tiny study: resume, edits, failures, logs, status."""

from __future__ import annotations

import shutil

import pytest
from tiny_study import comparable, tiny_study

from overtrain.spec import parse_spec
from overtrain.study.folder import RunFolder
from overtrain.study.runner import run_study
from overtrain.study.store import Store, load_results, study_status


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    tiny_study(folder)  # writes corpus.txt and task.jsonl
    return folder


@pytest.fixture(scope="module")
def finished_run(inputs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("engine") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(inputs)
        run_study(parse_spec(tiny_study(inputs)), run_dir, workers=0)
    return run_dir


@pytest.fixture()
def copy_of_run(finished_run, inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(inputs)
    return shutil.copytree(finished_run, tmp_path / "run")


def started_times(run_dir) -> dict[str, float]:
    store = Store(RunFolder(run_dir).store)
    try:
        return dict(zip(*store.cells()[["key", "started"]].T.values))
    finally:
        store.close()


def test_every_planned_cell_runs_once_and_logs_its_output(finished_run):
    cells = study_status(finished_run)
    assert len(cells) == 23 and set(cells["status"]) == {"done"}
    assert cells.groupby("kind").size().to_dict() == {"finetune": 12, "pretrain": 5, "probe": 6}
    results = load_results(finished_run)
    identity = ["cell", "metric", "step", "gamma", "seed"]
    assert not results.duplicated(identity).any()
    for _, cell in cells.iterrows():
        log = RunFolder(finished_run).log(cell["key"]).read_text()
        assert log.startswith(f"== {cell['label']} | key {cell['key']}")
    constant = cells.set_index("label").loc["pretrain constant", "key"]
    assert "pretrain constant" in RunFolder(finished_run).log(constant).read_text().split("\n", 1)[1]  # the training bar


def test_a_rerun_skips_every_finished_cell(copy_of_run, inputs):
    before = started_times(copy_of_run)
    results = comparable(load_results(copy_of_run))
    run_study(parse_spec(tiny_study(inputs)), copy_of_run, workers=0)
    assert started_times(copy_of_run) == before
    assert comparable(load_results(copy_of_run)).equals(results)


def test_an_edited_study_runs_only_its_new_cells(copy_of_run, inputs):
    before = started_times(copy_of_run)
    edited = tiny_study(inputs, finetune={"lrs": [1e-3, 1e-2, 3e-2]})
    run_study(parse_spec(edited), copy_of_run, workers=0)
    after = started_times(copy_of_run)
    new = set(after) - set(before)
    assert {k: after[k] for k in before} == before  # nothing finished was redone
    labels = study_status(copy_of_run).set_index("key").loc[sorted(new), "label"]
    assert len(new) == 6 and all("lr=0.03" in label for label in labels)
    assert len(study_status(copy_of_run)) == 29


def test_a_failing_cell_is_recorded_the_study_goes_on_and_retry_reruns_it(copy_of_run, inputs, monkeypatch):
    spec = parse_spec(tiny_study(inputs, sensitivity={"gammas": [2.0]}))  # six new probe cells
    monkeypatch.setenv("OVERTRAIN_FAULT", "raise:cell-probe#2")
    run_study(spec, copy_of_run, workers=0)
    cells = study_status(copy_of_run)
    failed = cells[cells["status"] == "failed"]
    assert len(failed) == 1 and "InjectedFault: injected fault at cell-probe" in failed["error"].iloc[0]
    assert (cells["status"] == "done").sum() == 22  # the other probes and every fine-tune ran

    monkeypatch.delenv("OVERTRAIN_FAULT")
    run_study(spec, copy_of_run, workers=0)
    assert (study_status(copy_of_run)["status"] == "failed").sum() == 1  # failures stay failed...
    run_study(spec, copy_of_run, workers=0, retry_failed=True)
    assert set(study_status(copy_of_run)["status"]) == {"done"}  # ...until asked
    log = RunFolder(copy_of_run).log(failed["key"].iloc[0]).read_text()
    assert log.count("\n== ") + log.startswith("== ") == 2  # both attempts are in the log


def test_thin_data_gives_not_testable_verdicts_and_a_report_not_a_crash(finished_run, tmp_path):
    """Two budgets and one fine-tuning seed: every claim says why it cannot be tested."""
    from overtrain.analysis.claims import check_claims
    from overtrain.analysis.reproduction import write_reproduction
    from overtrain.study.store import load_results

    verdicts = {c.id: (c.verdict, c.reason) for c in check_claims(load_results(finished_run), n_boot=50)}
    assert {verdict for verdict, _ in verdicts.values()} == {"not testable"}, verdicts
    assert "2 budgets" in verdicts["finetune_u"][1] and "decayed" not in verdicts["finetune_u"][1]
    page = write_reproduction(finished_run, tmp_path / "REPRODUCTION.md", n_boot=50).read_text()
    assert page.count("**Not testable.**") == len(verdicts)


def test_a_note_is_printed_when_the_progress_bar_is_disabled(monkeypatch, capsys):
    """TQDM_DISABLE turns the bar off, not the notes (e.g. a failed cell's line)."""
    from overtrain.study.progress import StudyProgress

    monkeypatch.setenv("TQDM_DISABLE", "1")
    progress = StudyProgress("quiet", [], slots=1, recorded=[])
    progress.note("failed: finetune x: boom")
    progress.close()
    assert "failed: finetune x: boom" in capsys.readouterr().err
