"""Mitigations inside a real tiny study: every variant runs, is labelled, and is reported apart."""

import pytest
from tiny_study import tiny_study

import overtrain
from overtrain.spec import parse_spec


@pytest.fixture(scope="module")
def mitigated_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mitigated")
    study = tiny_study(folder, mitigations={"l2": [0.1], "wise": [0.5], "replay": [0.5], "lora": [2]})
    study["pretrain"]["schedules"] = ["cosine"]
    study["pretrain"]["budgets"] = [512, 1024, 2048, 4096]
    study["finetune"] = {**study["finetune"], "tasks": [str(folder / "task.jsonl")], "lrs": [1e-2], "steps": 3}
    run_dir = overtrain.run(parse_spec(study), folder / "run", workers=0)
    return run_dir, overtrain.load_results(run_dir)


def final_ood(frame):
    tunes = frame[(frame["kind"] == "finetune") & (frame["metric"] == "ood_bpb") & (frame["step"] == 3)]
    return tunes.groupby(["mitigation", "checkpoint"])["value"].mean()


def test_every_variant_is_measured_at_every_checkpoint(mitigated_run):
    _, frame = mitigated_run
    ood = final_ood(frame)
    assert set(ood.index.get_level_values(0)) == {"none", "l2=0.1", "wise=0.5", "replay=0.5", "lora=2"}
    assert ood.groupby(level=0).size().eq(4).all()


def test_wise_interpolation_forgets_less_than_the_plain_fine_tune(mitigated_run):
    """Halfway back to the pre-trained weights, the held-out pre-training loss is closer to its start."""
    _, frame = mitigated_run
    ood = final_ood(frame)
    start = frame[(frame["kind"] == "finetune") & (frame["metric"] == "ood_bpb") & (frame["step"] == 0)
                  & (frame["mitigation"] == "none")].groupby("checkpoint")["value"].mean()
    plain_rise = ood["none"] - start
    wise_rise = ood["wise=0.5"] - start
    assert (wise_rise.abs() < plain_rise.abs()).all()


def test_main_sections_use_plain_runs_and_mitigations_get_their_own(mitigated_run):
    run_dir, _ = mitigated_run
    page = (run_dir / "report" / "index.html").read_text()
    assert "<h2>Mitigations" in page
    assert (run_dir / "report" / "mitigations_task.png").exists()
    fixed = (run_dir / "report" / "tables" / "fixed_lr_ood_task.csv").read_text()
    assert "wise" not in fixed and "lora" not in fixed
