"""Tables from tidy rows: diverged runs stay (flagged, never merged away), pre-training seeds are
the replicates where a study has several, and sharpness meets forgetting once per checkpoint."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from overtrain.analysis import tables

BASE_OOD = 3.0
LAST_STEP = 10


def finetune_run(seed: int, ood_end: float | None, diverged_at: int | None = None, checkpoint: str = "cosine-1000",
                 tokens: int = 1000, lr: float = 1e-3, pretrain_seed: int | None = 0) -> list[dict]:
    """The rows a real fine-tuning cell writes: evaluations at step 0, 5 and the last step; a diverged
    run has its `diverged_at_step` row (step NaN) and no evaluation from the step it diverged at on."""
    context = {"kind": "finetune", "cell": f"ft-{checkpoint}-{lr:g}-{seed}", "checkpoint": checkpoint,
               "schedule": checkpoint.split("-")[0], "decayed": 1, "tokens": tokens, "task": "math", "lr": lr,
               "seed": seed, "gamma": np.nan, "mitigation": "none", "pretrain_seed": pretrain_seed}
    last = LAST_STEP if diverged_at is None else diverged_at
    steps = [step for step in (0, 5, LAST_STEP) if step == 0 or diverged_at is None or step < diverged_at]
    rows = []
    for step in steps:
        ood = BASE_OOD + (0.0 if step == 0 else (ood_end - BASE_OOD) * step / LAST_STEP if ood_end else 0.01)
        rows += [{**context, "step": step, "metric": "ood_bpb", "value": ood},
                 {**context, "step": step, "metric": "id_bpb", "value": 5.0 - 0.1 * step}]
    if diverged_at is not None:
        rows.append({**context, "step": np.nan, "metric": "diverged_at_step", "value": diverged_at})
    rows.append({**context, "step": last, "metric": "train_loss_nats", "value": np.nan if diverged_at is not None else 1.0})
    return rows


def frame(*runs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([row for run in runs for row in run])


def test_a_diverged_run_has_no_final_value_and_is_flagged():
    results = frame(finetune_run(0, 3.1), finetune_run(1, 3.2), finetune_run(2, None, diverged_at=7))
    final = tables.final_points(results, "ood_bpb")
    assert list(final.columns) == ["schedule", "decayed", "tokens", "checkpoint", "pretrain_seed", "task", "lr",
                                   "seed", "value", "diverged"]
    diverged = final.set_index("seed").loc[2]
    assert diverged["diverged"] and np.isnan(diverged["value"])  # not its step-5 evaluation
    assert final.set_index("seed").loc[0, "value"] == pytest.approx(3.1) and not final["diverged"].iloc[0]


def test_a_run_that_diverges_at_step_0_does_not_count_as_no_forgetting():
    results = frame(finetune_run(0, 3.1), finetune_run(1, None, diverged_at=0))
    forgetting = tables.forgetting_points(results).set_index("seed")
    assert forgetting.loc[0, "forgetting_bpb"] == pytest.approx(0.1)
    assert forgetting.loc[1, "diverged"] and np.isnan(forgetting.loc[1, "forgetting_bpb"])
    start = tables.finetune_start(results)
    assert not start.duplicated(["cell", "metric"]).any()


def test_summaries_average_the_finite_seeds_and_count_the_diverged_ones():
    results = frame(finetune_run(0, 3.1), finetune_run(1, 3.3), finetune_run(2, None, diverged_at=7))
    summary = tables.mean_with_ci(tables.final_points(results, "ood_bpb"), ["schedule", "lr", "tokens"])
    row = summary.iloc[0]
    assert row["mean"] == pytest.approx(3.2) and row["n"] == 2 and row["diverged"] == 1
    assert row["ci_low"] < 3.2 < row["ci_high"]


def test_trajectories_keep_a_diverged_run_up_to_its_divergence():
    results = frame(finetune_run(0, 3.1), finetune_run(1, None, diverged_at=7), finetune_run(2, None, diverged_at=0))
    paths = tables.trajectories(results)
    steps = paths.groupby("seed")["step"].apply(list).to_dict()
    assert steps == {0: [0, 5, 10], 1: [0, 5], 2: [0]}
    assert paths.groupby("seed")["diverged"].first().to_dict() == {0: False, 1: True, 2: True}


def test_the_diverged_list_names_every_run_with_its_step():
    results = frame(finetune_run(0, 3.1), finetune_run(1, None, diverged_at=7))
    listed = tables.diverged_runs(results)
    assert len(listed) == 1 and listed.iloc[0]["seed"] == 1 and listed.iloc[0]["diverged_at_step"] == 7


def test_a_store_without_pretraining_seeds_reads_as_seed_0():
    results = frame(finetune_run(0, 3.1)).drop(columns="pretrain_seed")
    assert tables.final_points(results, "ood_bpb")["pretrain_seed"].tolist() == [0]
    assert tables.pretrain_seeds(results) == [0]


def test_with_several_pretraining_seeds_they_are_the_replicates():
    """Two pre-training seeds with three fine-tuning seeds each: n = 2, the mean of the two seed means."""
    runs = [finetune_run(seed, 3.1 + 0.01 * seed, checkpoint="cosine-1000") for seed in range(3)]
    runs += [finetune_run(seed, 3.5 + 0.01 * seed, checkpoint="cosine-1000-seed1", pretrain_seed=1) for seed in range(3)]
    summary = tables.mean_with_ci(tables.final_points(frame(*runs), "ood_bpb"), ["schedule", "tokens"])
    row = summary.iloc[0]
    assert row["n"] == 2 and row["mean"] == pytest.approx(3.31)
    assert row["ci_high"] - row["ci_low"] > 2  # two replicates 0.4 apart: t(1) makes the interval wide
    assert tables.pretrain_seeds(frame(*runs)) == [0, 1]


def sharpness_rows(checkpoint: str, tokens: int, value: float) -> list[dict]:
    return [{"kind": "probe", "cell": f"probe-{checkpoint}", "checkpoint": checkpoint, "schedule": "cosine",
             "decayed": 1, "tokens": tokens, "gamma": np.nan, "seed": np.nan, "step": np.nan, "pretrain_seed": 0,
             "metric": "hessian_top_eig", "value": value}]


def test_sharpness_meets_forgetting_once_per_checkpoint_within_each_lr():
    """4 checkpoints x 2 LRs x 3 seeds = 24 fine-tunes: 8 points, 4 per LR, each with its own rho."""
    runs, budgets = [], [1000, 2000, 4000, 8000]
    for rank, tokens in enumerate(budgets):
        checkpoint = f"cosine-{tokens}"
        runs.append(sharpness_rows(checkpoint, tokens, 10.0 + rank))
        for lr, sign in ((1e-3, 1), (1e-2, -1)):  # forgetting grows with sharpness at one LR, falls at the other
            for seed in range(3):
                runs.append(finetune_run(seed, BASE_OOD + 0.1 + sign * 0.02 * rank + 0.001 * seed, checkpoint=checkpoint,
                                         tokens=tokens, lr=lr))
    runs.append(finetune_run(3, None, diverged_at=7, checkpoint="cosine-1000", tokens=1000, lr=1e-3))
    points = tables.sharpness_vs_forgetting(frame(*runs), "hessian_top_eig")
    assert len(points) == 8
    first = points[(points["checkpoint"] == "cosine-1000") & (points["lr"] == 1e-3)].iloc[0]
    assert first["seeds"] == 3 and first["diverged"] == 1
    found = tables.rank_correlations(points, "hessian_top_eig", "forgetting_bpb", ["task", "lr"]).set_index("lr")
    assert found["n"].tolist() == [4, 4]
    assert found.loc[1e-3, "rho"] == pytest.approx(1.0) and found.loc[1e-2, "rho"] == pytest.approx(-1.0)
