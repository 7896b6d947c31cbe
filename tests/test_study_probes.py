"""A tiny real study with every probe on: sharpness, forgetting prediction, theory, accuracy."""

import math

import pytest
from tiny_study import tiny_study

import overtrain
from overtrain.probes.metrics import check_rows
from overtrain.spec import parse_spec


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probed")
    study = tiny_study(folder, sharpness={"tokens": 256, "trace_hvps": 4, "kl_seeds": [0, 1]},
                       theory={"pretrain_steps": 2000, "n_checkpoints": 12})
    study["pretrain"]["schedules"] = ["cosine", "constant"]
    study["finetune"] = {**study["finetune"], "tasks": ["qa"], "lrs": [1e-3], "accuracy_examples": 4,
                         "benchmarks": ["arc_easy"], "benchmark_limit": 4}
    run_dir = overtrain.run(parse_spec(study), folder / "run", workers=0)
    return run_dir, overtrain.load_results(run_dir)


def values(frame, metric):
    return frame.loc[frame["metric"] == metric, "value"].tolist()


def test_every_stored_metric_is_declared(probed_run):
    _, frame = probed_run
    check_rows(frame.to_dict("records"))
    assert {"hessian_eig_hvps", "perturbed_bpb", "bench_arc_easy_acc_norm", "param_drift_l2"} <= set(frame["metric"])


def test_every_checkpoint_gets_its_sharpness(probed_run):
    _, frame = probed_run
    probes = frame[frame["kind"] == "probe"]
    assert probes["checkpoint"].nunique() == 4
    for metric in ("hessian_top_eig", "hessian_trace", "kl_sharpness", "critical_sharpness"):
        measured = values(probes, metric)
        assert len(measured) == 4 and all(math.isfinite(v) for v in measured), metric
    assert all(v > 0 for v in values(probes, "hessian_top_eig") + values(probes, "kl_sharpness"))
    assert all(r < 1e-2 for r in values(probes, "hessian_eig_residual"))


def test_fine_tunes_carry_predicted_and_observed_forgetting_accuracy_and_benchmarks(probed_run):
    _, frame = probed_run
    tunes = frame[frame["kind"] == "finetune"]
    assert len(values(tunes, "predicted_forgetting_nats")) == len(values(tunes, "observed_forgetting_nats")) == 4
    assert all(v > 0 for v in values(tunes, "param_drift_l2"))
    accuracy = tunes[tunes["metric"] == "id_acc"]
    assert sorted(accuracy["step"].unique().tolist()) == [0.0, 2.0]
    assert all(0 <= v <= 1 for v in accuracy["value"]) and len(values(tunes, "bench_arc_easy_acc")) == 8


def test_report_shows_sharpness_forgetting_and_theory(probed_run):
    run_dir, _ = probed_run
    page = (run_dir / "report" / "index.html").read_text()
    for heading in ("Sharpness", "Theory"):
        assert f"<h2>{heading}" in page, heading
    for figure in ("forgetting_predicted.png", "sharpness_vs_forgetting_hessian_top_eig.png"):
        assert (run_dir / "report" / figure).exists(), figure
    assert (run_dir / "theory" / "inflection_points.csv").exists()
