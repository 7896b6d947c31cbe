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
