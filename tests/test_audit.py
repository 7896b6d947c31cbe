"""The audit on real (tiny) HF folders, one or a series: every probe runs and the plain-words report reads right."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from overtrain.audit.result import AuditConfig, AuditResult
from overtrain.audit.words import verdict
from overtrain.cli import app
from overtrain.models.series import SeriesCheckpoint
from overtrain.probes.metrics import check_rows
from overtrain.train.loop import TrainConfig, train
from overtrain.train.schedules import Schedule


def test_audit_of_a_local_checkpoint(tiny_model, byte_corpus, tmp_path):
    config = TrainConfig(steps=30, schedule=Schedule("cosine", 3e-3, 30, 3))
    train(tiny_model, byte_corpus.train_batches(8, 64, seed=0), config)
    tiny_model.save_pretrained(tmp_path / "model")
    byte_corpus.tokenizer.save_pretrained(tmp_path / "model")

    result = CliRunner().invoke(app, ["audit", str(tmp_path / "model"), "--tokens", "7680", "--task", "math",
                                      "--lrs", "1e-4,1e-1", "--steps", "2", "--gammas", "0.5,4",
                                      "--benchmark-limit", "4", "--hessian-tokens", "16", "--out", str(tmp_path / "audit")])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "audit" / "audit.csv")
    assert list(frame.columns) == ["kind", "checkpoint", "weights", "tokens", "task", "lr", "gamma", "seed", "step",
                                   "metric", "value"]  # a study's columns
    check_rows(frame.to_dict("records"))  # and its metric names
    sensitivity = frame[frame["metric"] == "delta_bpb"].groupby("gamma")["value"].mean()
    assert sensitivity[4.0] > sensitivity[0.5] > 0
    sweep = frame[frame["kind"] == "finetune"]
    assert sorted(sweep["lr"].unique()) == [1e-4, 1e-1] and sorted(sweep["step"].unique()) == [0, 2]
    assert {"id_bpb", "ood_bpb", "bench_arc_easy_acc", "bench_piqa_acc_norm"} <= set(sweep["metric"])
    before = sweep[sweep["step"] == 0].pivot_table(index="metric", columns="lr", values="value")
    assert (before[1e-4] == before[1e-1]).all()  # both runs start from the same model, measured once
    assert (frame["metric"] == "hessian_top_eig").sum() == 1
    report = (tmp_path / "audit" / "audit.md").read_text()
    assert "## In plain words" in report and "raises it by" in report and "tokens seen in pre-training: 7680" in report
    costs = json.loads((tmp_path / "audit" / "audit.json").read_text())["costs"]
    assert costs["device"] == "cpu" and costs["eval_tokens_per_second"] > 0 and costs["train_tokens_per_second"] > 0
    assert set(costs["seconds"]) == set(costs["peak_resident_gib"]) >= {"load", "base", "sensitivity", "lr_sweep"}
    assert 0 < max(costs["peak_resident_gib"].values()) < 24 and costs["peak_gpu_gib"] is None
    assert "## Cost" in report and "tokens/s" in report and "peak resident memory" in report


@pytest.mark.slow
def test_audit_of_smollm2_from_its_pypi_wheel(tmp_path):
    """The real 135M model, loaded through the GGUF path: it predicts text well, noise hurts it
    more the larger it is, a large LR forgets more than a small one, and it all fits in memory."""
    pytest.importorskip("gguf", reason="the gguf package reads GGUF files: pip install -e '.[gguf]'")
    result = CliRunner().invoke(app, ["audit", "smollm2", "--task", "qa", "--lrs", "1e-5,1e-3", "--steps", "4",
                                      "--gammas", "0.25,1", "--benchmark-limit", "10", "--heldout-tokens", "1024",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "audit.csv")
    base_bpb = frame.query("kind == 'probe' and metric == 'bpb'")["value"].iloc[0]
    assert 0.7 < base_bpb < 1.6  # a trained 135M model on English prose; an untrained one is above 5
    sensitivity = frame[frame["metric"] == "delta_bpb"].groupby("gamma")["value"].mean()
    assert sensitivity[1.0] > sensitivity[0.25] > 0
    ood = frame.query("kind == 'finetune' and metric == 'ood_bpb'").pivot_table(index="lr", columns="step", values="value")
    forgetting = ood[4] - ood[0]
    assert forgetting[1e-3] > forgetting[1e-5] + 0.01
    costs = json.loads((tmp_path / "audit.json").read_text())["costs"]
    assert max(costs["peak_resident_gib"].values()) < 24 and costs["train_tokens_per_second"] > 0
    assert "Verdict" in result.output and "## Cost" in result.output


def test_audit_names_a_bad_lr_list(tmp_path):
    result = CliRunner().invoke(app, ["audit", "smollm2", "--lrs", "1e-4,fast"])
    assert result.exit_code == 2 and "--lrs '1e-4,fast': expected comma-separated numbers" in result.output


def test_probe_command_on_a_fine_tuned_pair(tiny_model, byte_corpus, tmp_path):
    tiny_model.save_pretrained(tmp_path / "base")
    byte_corpus.tokenizer.save_pretrained(tmp_path / "base")
    config = TrainConfig(steps=5, schedule=Schedule("constant", 1e-2, 5))
    train(tiny_model, byte_corpus.train_batches(4, 64, seed=3), config)
    tiny_model.save_pretrained(tmp_path / "tuned")
    byte_corpus.tokenizer.save_pretrained(tmp_path / "tuned")

    result = CliRunner().invoke(app, ["probe", str(tmp_path / "tuned"), "--base", str(tmp_path / "base"),
                                      "--tokens", "256", "--trace-hvps", "3", "--out", str(tmp_path / "probe.csv")])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "probe.csv")
    metrics = set(frame["metric"])
    assert {"hessian_top_eig", "hessian_trace", "kl_sharpness", "critical_sharpness", "curvature_along_u",
            "predicted_forgetting_nats", "observed_forgetting_nats", "param_drift_l2"} <= metrics
    assert frame.loc[frame["metric"] == "param_drift_l2", "value"].iloc[0] > 0

    same = CliRunner().invoke(app, ["probe", str(tmp_path / "base"), "--base", str(tmp_path / "base"), "--tokens", "256"])
    assert same.exit_code == 2
    errors = [line for line in same.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds the same weights as" in errors[0] and "Traceback" not in same.output


def test_audit_of_a_series_side_by_side_with_a_verdict_each(tiny_model, byte_corpus, tmp_path):
    """Two stages of one run and a re-upload of the second: two audits, the repeat flagged."""
    batches = byte_corpus.train_batches(8, 64, seed=0)
    for name in ("step15", "step30"):
        train(tiny_model, batches, TrainConfig(steps=15, schedule=Schedule("constant", 3e-3, 15)))
        tiny_model.save_pretrained(tmp_path / "ckpts" / name)
        byte_corpus.tokenizer.save_pretrained(tmp_path / "ckpts" / name)
    shutil.copytree(tmp_path / "ckpts" / "step30", tmp_path / "ckpts" / "step45")

    result = CliRunner().invoke(app, ["audit", str(tmp_path / "ckpts" / "step*"), "--task", "math", "--lrs", "1e-4,1e-1",
                                      "--steps", "2", "--gammas", "0.5", "--benchmark-limit", "4",
                                      "--tokens-per-step", str(8 * 64), "--out", str(tmp_path / "audit")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "audit" / "series.csv", index_col=0)
    assert list(table.columns) == ["step15", "step30"]  # the repeat is not a third column
    assert float(table.loc["held-out bpb", "step30"]) < float(table.loc["held-out bpb", "step15"])  # trained longer
    assert {"bpb rise, noise 0.5 x init std", "forgetting (bpb) after LR 0.1", "arc_easy accuracy before fine-tuning",
            "piqa accuracy after LR 0.0001", "safe up to LR"} <= set(table.index)
    page = (tmp_path / "audit" / "series.md").read_text()
    for name in ("step15", "step30"):
        small, large = (float(table.loc[f"forgetting (bpb) after LR {lr}", name]) > 0.05 for lr in ("0.0001", "0.1"))
        expected = "fragile at every LR tried" if small else "fragile above LR 0.0001" if large else "robust"
        line = next(line for line in page.splitlines() if line.startswith(f"- `{name}`"))
        assert f"**{expected}" in line, line
        assert (tmp_path / "audit" / name / "audit.md").exists()
    assert "- `step45` (23,040 tokens): **duplicate weights**, identical to `step30`" in page  # 45 steps of 8 x 64
    assert not (tmp_path / "audit" / "step45").exists()


def sweep_result(forgetting_by_lr: dict[float, float]) -> AuditResult:
    rows = []
    for lr, rise in forgetting_by_lr.items():
        rows += [{"kind": "finetune", "lr": lr, "step": 0, "metric": "ood_bpb", "value": 1.0},
                 {"kind": "finetune", "lr": lr, "step": 10, "metric": "ood_bpb", "value": 1.0 + rise}]
    return AuditResult(SeriesCheckpoint("m", None, Path("m")), AuditConfig(lrs=tuple(forgetting_by_lr), tolerance_bpb=0.05),
                       rows)


def test_verdict_names_the_first_lr_that_forgets_too_much():
    assert verdict(sweep_result({1e-5: 0.0, 1e-4: 0.01, 1e-3: 0.02})).startswith("**robust at these LRs**")
    assert "up to 0.001" in verdict(sweep_result({1e-5: 0.0, 1e-4: 0.01, 1e-3: 0.02}))
    partial = verdict(sweep_result({1e-5: 0.0, 1e-4: 0.2, 1e-3: 0.01}))  # safe again at 1e-3: not a safe range
    assert partial.startswith("**fragile above LR 1e-05**") and "at LR 0.0001 it forgets +0.200 bpb" in partial
    assert verdict(sweep_result({1e-5: 0.3, 1e-4: 0.4})).startswith("**fragile at every LR tried**")
