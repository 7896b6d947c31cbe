"""`overtrain audit` over a series draws it as a study's report, with a progress line while it runs."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
from typer.testing import CliRunner

from overtrain.cli import app
from overtrain.models.checkpoints import MANIFEST
from overtrain.train.loop import TrainConfig, train
from overtrain.train.schedules import Schedule

STAGE_STEPS, BATCH, SEQ_LEN = 15, 8, 64


def test_series_audit_writes_a_report_page_against_tokens(tiny_model, byte_corpus, tmp_path):
    """Three stages of one run (tokens in each folder's overtrain.json) and a re-upload of the last."""
    batches = byte_corpus.train_batches(BATCH, SEQ_LEN, seed=0)
    tokens = [stage * STAGE_STEPS * BATCH * SEQ_LEN for stage in (1, 2, 3)]
    for count in tokens:
        train(tiny_model, batches, TrainConfig(steps=STAGE_STEPS, schedule=Schedule("constant", 3e-3, STAGE_STEPS)))
        folder = tmp_path / "ckpts" / f"run-{count}"
        tiny_model.save_pretrained(folder)
        byte_corpus.tokenizer.save_pretrained(folder)
        (folder / MANIFEST).write_text(json.dumps({"tokens": count}))
    shutil.copytree(tmp_path / "ckpts" / f"run-{tokens[-1]}", tmp_path / "ckpts" / "run-copy")

    result = CliRunner().invoke(app, ["audit", str(tmp_path / "ckpts" / "run-*"), "--task", "math", "--lrs", "1e-4,1e-1",
                                      "--steps", "2", "--gammas", "0.5,4", "--benchmark-limit", "4",
                                      "--heldout-tokens", "1024", "--out", str(tmp_path / "audit")])
    assert result.exit_code == 0, result.output
    # the progress line: 4 checkpoints x 5 phases, the copy's skipped after its load
    assert re.search(r"audit: 100%.*20/20", result.stderr), result.stderr
    assert "run-copy: the weights of run-23040; not audited again" in result.stderr

    report = tmp_path / "audit" / "report"
    page = (report / "index.html").read_text()
    assert "overtrain report: audit of a series of 4 checkpoints" in page and 'src="data:image/png;base64,' in page
    assert "Duplicate weights: run-copy" in page  # named up front, measured once
    tables = report / "tables"
    assert pd.read_csv(tables / "base_model.csv")["tokens"].tolist() == tokens
    sensitivity = pd.read_csv(tables / "sensitivity_delta_bpb.csv")
    assert sorted(sensitivity["tokens"].unique()) == tokens and sorted(sensitivity["gamma"].unique()) == [0.5, 4.0]
    forgetting = pd.read_csv(tables / "fixed_lr_ood_math.csv")  # pre-training-text bpb after fine-tuning, per LR
    assert sorted(forgetting["lr"].unique()) == [1e-4, 0.1] and sorted(forgetting["tokens"].unique()) == tokens
    after = forgetting.pivot_table(index="tokens", columns="lr", values="mean")
    assert (after[0.1] > after[1e-4]).all()  # the large LR forgets more at every checkpoint
    candidates = pd.read_csv(tables / "recommendation_math.csv")
    assert set(candidates["checkpoint"]) == {f"run-{count}" for count in tokens} and candidates["frontier"].any()
    checkpoints = pd.read_csv(tables / "checkpoints.csv")
    assert checkpoints.set_index("checkpoint").loc["run-copy", "duplicate_of"] == "run-23040"
    for figure in ("base_bpb", "sensitivity_delta_bpb", "fixed_lr_ood_math", "recommendation_frontier_math"):
        assert (report / f"{figure}.png").exists(), figure
    assert "report/index.html" in (tmp_path / "audit" / "series.md").read_text()
