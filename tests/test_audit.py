"""The audit on a real (tiny) HF folder: every probe runs and the plain-words report reads right."""

import pandas as pd
from typer.testing import CliRunner

from overtrain.cli import app
from overtrain.schedules import Schedule
from overtrain.train import TrainConfig, train


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
    sensitivity = frame[frame["probe"] == "sensitivity"].groupby("gamma")["value"].mean()
    assert sensitivity[4.0] > sensitivity[0.5] > 0
    sweep = frame[frame["probe"] == "finetune"]
    assert sorted(sweep["lr"].unique()) == [0.0, 1e-4, 1e-1]
    assert {"id_bpb", "ood_bpb", "bench_arc_easy_acc", "bench_piqa_acc"} <= set(sweep["metric"])
    assert (frame["metric"] == "hessian_top_eig").sum() == 1
    report = (tmp_path / "audit" / "audit.md").read_text()
    assert "## In plain words" in report and "raises it by" in report and "tokens seen in pre-training: 7680" in report


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
