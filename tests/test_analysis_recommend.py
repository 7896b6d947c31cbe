"""The recommendation: chosen on absolute outcomes, never dominated, on validation, reported on test."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from overtrain.analysis.recommend import Constraint, recommend
from overtrain.analysis.report import write_report
from overtrain.errors import SpecError
from overtrain.study.folder import ReportFolder

STEPS = (0, 10, 20)


def run_rows(checkpoint: str, lr: float, seed: int, base_ood: float, forgets: dict[int, float],
             validation: dict[int, float], test: dict[int, float] | None = None, pretrain_seed: int = 0,
             diverged_at: int | None = None, noise: float = 0.0, rng: np.random.Generator | None = None) -> list[dict]:
    """Tidy rows of one fine-tuning run as a real run writes them: one row per evaluation step and
    metric (step 0 included), with `noise` on every evaluation after step 0. A diverged run keeps its evaluations before `diverged_at`, then has a
    `diverged_at_step` row (step NaN) and its training loss at the step it stopped, nothing more."""
    schedule, tokens = checkpoint.split("-")[:2]
    cell = f"ft-{checkpoint}-{lr}-{seed}"
    context = {"cell": cell, "kind": "finetune", "checkpoint": checkpoint, "schedule": schedule,
               "decayed": int(schedule != "constant"), "tokens": int(tokens), "pretrain_seed": pretrain_seed,
               "task": "math", "lr": lr, "gamma": np.nan, "seed": seed, "mitigation": "none"}
    test = test or validation
    rows = []
    for step in STEPS:
        if diverged_at is not None and step >= diverged_at:
            break
        jitter = rng.normal(0, noise) if step and noise else 0.0
        rows += [{**context, "step": step, "metric": "id_bpb", "value": validation[step] + jitter},
                 {**context, "step": step, "metric": "id_test_bpb", "value": test[step] + jitter},
                 {**context, "step": step, "metric": "ood_bpb", "value": base_ood + forgets[step] + jitter / 10}]
    if diverged_at is not None:
        rows += [{**context, "step": np.nan, "metric": "diverged_at_step", "value": diverged_at},
                 {**context, "step": diverged_at, "metric": "train_loss_nats", "value": np.nan}]
    return rows


def probe_row(checkpoint: str, bpb: float, pretrain_seed: int = 0) -> dict:
    schedule, tokens = checkpoint.split("-")[:2]
    return {"cell": f"probe-{checkpoint}", "kind": "probe", "checkpoint": checkpoint, "schedule": schedule,
            "decayed": int(schedule != "constant"), "tokens": int(tokens), "pretrain_seed": pretrain_seed,
            "gamma": np.nan, "step": np.nan, "metric": "bpb", "value": bpb}


def study(candidates: dict[tuple[str, float], tuple[float, float, float]], seeds: int = 3, noise: float = 0.01,
          diverged: dict[tuple[str, float], int] | None = None) -> pd.DataFrame:
    """(checkpoint, lr) -> (base ood_bpb, ood_bpb rise at the last step, task bpb at the last step); task bpb
    starts at 4.0 and moves halfway at step 10, forgetting likewise. `diverged`: (checkpoint, lr) -> the step
    at which its seed 0 diverged."""
    rows, rng = [], np.random.default_rng(0)
    for (checkpoint, lr), (base, rise, task) in candidates.items():
        rows.append(probe_row(checkpoint, base))
        for seed in range(seeds):
            halfway = {0: 4.0, 10: (4.0 + task) / 2, 20: task}
            rows += run_rows(checkpoint, lr, seed, base, {0: 0.0, 10: rise / 2, 20: rise}, halfway, noise=noise, rng=rng,
                             diverged_at=(diverged or {}).get((checkpoint, lr)) if seed == 0 else None)
    return pd.DataFrame(rows).drop_duplicates(["cell", "step", "metric"])


def dominates(a: pd.Series, b: pd.Series) -> bool:
    """a is at least as good as b on both absolute axes and better on one (task bpb: lower is better)."""
    no_worse = a["validation_value"] <= b["validation_value"] and a["ood_bpb"] <= b["ood_bpb"]
    return no_worse and (a["validation_value"] < b["validation_value"] or a["ood_bpb"] < b["ood_bpb"])


def assert_not_dominated(found) -> None:
    usable = found.candidates[found.candidates["eligible"]]
    assert not any(dominates(other, found.best) for _, other in usable.iterrows())
    assert found.best["frontier"]


# The issue's case (the demo): forgetting relative to its own start favours the small checkpoint,
# which is worse on both absolute axes than the large one.
ISSUE = {("constant-524288", 3e-4): (2.559, 0.041, 3.206),   # forgets least, relative to its own start
         ("constant-2097152", 3e-4): (2.093, 0.050, 2.713),  # better on both absolute axes
         ("wsd-2097152", 1e-3): (2.044, 0.178, 2.417)}       # best task result, forgets most


def test_a_checkpoint_better_on_both_absolute_axes_wins_over_one_that_forgets_less_relative_to_its_start():
    found = recommend(study(ISSUE), "math", Constraint(max_bpb=2.2))
    assert (found.best["checkpoint"], found.best["lr"], found.best["step"]) == ("constant-2097152", 3e-4, 20)
    small = found.candidates.query("checkpoint == 'constant-524288' and step == 20").iloc[0]
    assert small["forgetting_bpb"] < found.best["forgetting_bpb"]  # the old criterion's favourite...
    assert dominates(found.best, small) and found.constraint_met  # ...is beaten on both axes
    assert_not_dominated(found)


def test_a_looser_constraint_admits_the_forgetful_choice_and_the_default_is_relative_to_the_best_base():
    loose = recommend(study(ISSUE), "math", Constraint(max_bpb=2.3))
    assert (loose.best["checkpoint"], loose.best["lr"]) == ("wsd-2097152", 1e-3)
    default = recommend(study(ISSUE), "math")  # within 0.1 of wsd-2097152's 2.044
    assert default.limit_bpb == pytest.approx(2.144, abs=0.002) and "wsd-2097152" in default.constraint
    assert default.best["checkpoint"] == "constant-2097152"


@pytest.mark.parametrize("seed", range(5))
def test_the_recommendation_is_never_dominated(seed):
    """Random studies: whatever the constraint, no evaluated candidate beats the pick on both axes."""
    rng = np.random.default_rng(seed)
    candidates = {(f"{schedule}-{tokens}", lr): (rng.uniform(2.0, 3.0), rng.uniform(0.0, 0.4), rng.uniform(2.3, 3.5))
                  for schedule in ("cosine", "constant") for tokens in (1000, 2000, 4000) for lr in (1e-4, 1e-3)}
    for limit in (2.1, 2.4, 2.8, 5.0):
        found = recommend(study(candidates, seeds=2, noise=0.05), "math", Constraint(max_bpb=limit), n_boot=50)
        assert_not_dominated(found)
        assert found.constraint_met == (found.best["ood_bpb"] <= limit)


def test_the_step_is_chosen_on_validation_and_reported_on_test():
    rows = []
    for seed in range(2):  # validation is best at step 10, test at step 20: the test half must not choose
        rows += run_rows("cosine-1000", 1e-3, seed, 3.0, {0: 0.0, 10: 0.02, 20: 0.03},
                         validation={0: 4.0, 10: 2.5, 20: 2.6}, test={0: 4.0, 10: 2.7, 20: 2.4})
    found = recommend(pd.DataFrame(rows), "math", Constraint(max_bpb=3.5), n_boot=50)
    assert found.best["step"] == 10 and found.reported_metric == "id_test_bpb"
    assert found.best["validation_value"] == pytest.approx(2.5) and found.best["value"] == pytest.approx(2.7)
    assert found.to_json()["value"] == pytest.approx(2.7) and found.to_json()["metric"] == "id_test_bpb"


def test_a_pair_with_a_diverged_seed_is_never_recommended_and_stays_in_the_table():
    best_but_diverged = {**ISSUE, ("wsd-2097152", 3e-4): (2.044, 0.01, 2.3)}  # best on both axes, seed 0 diverged
    all_diverged = {("cosine-2097152", 1e-3): 0}  # every seed diverges before its first evaluation
    frame = study({**best_but_diverged, ("cosine-2097152", 1e-3): (2.15, 0.1, 2.5)}, seeds=1,
                  diverged={("wsd-2097152", 3e-4): 15, **all_diverged})
    found = recommend(frame, "math", Constraint(max_bpb=2.3))
    assert (found.best["checkpoint"], found.best["lr"]) == ("wsd-2097152", 1e-3)
    table = found.candidates.set_index(["checkpoint", "lr"])
    assert table.loc[("wsd-2097152", 3e-4), "diverged"].all()
    assert list(table.loc[[("wsd-2097152", 3e-4)], "step"]) == [10]  # the evaluation before it diverged stays
    silent = table.loc[[("cosine-2097152", 1e-3)]]
    assert silent["diverged"].all() and silent["step"].isna().all()  # no evaluation after step 0: still listed
    assert not found.candidates.loc[found.candidates["diverged"], "eligible"].any()


def test_when_nothing_meets_the_constraint_the_least_forgetting_frontier_point_is_recommended():
    found = recommend(study(ISSUE), "math", Constraint(max_bpb=1.5))
    usable = found.candidates[found.candidates["eligible"]]
    assert not found.constraint_met and not found.to_json()["constraint_met"]
    assert found.best["ood_bpb"] == usable["ood_bpb"].min()
    assert found.best["checkpoint"] == "constant-2097152" and found.best["step"] == 10
    assert_not_dominated(found)


def test_p_best_is_high_for_a_clear_winner_sums_to_at_most_one_and_is_nan_with_one_seed():
    clear = recommend(study(ISSUE), "math", Constraint(max_bpb=2.2), n_boot=200)
    assert clear.best["p_best"] > 0.95 and clear.candidates["p_best"].sum() <= 1 + 1e-9
    tie = recommend(study({("cosine-1000", 1e-3): (2.5, 0.01, 3.0), ("cosine-2000", 1e-3): (2.5, 0.01, 3.0)},
                          noise=0.05), "math", Constraint(max_bpb=3.0), n_boot=400)
    winners = tie.candidates.query("step == 20")["p_best"]
    assert (winners > 0.15).all() and tie.candidates["p_best"].sum() <= 1 + 1e-9
    one_seed = recommend(study(ISSUE, seeds=1), "math", Constraint(max_bpb=2.2))
    assert one_seed.candidates["p_best"].isna().all() and one_seed.to_json()["p_best"] is None
    assert "one seed" in one_seed.resampling


def test_p_best_redraws_pretraining_seeds_too():
    """Fine-tuning seeds agree closely, pre-training runs disagree: only redrawing the latter shows it."""
    rows, rng = [], np.random.default_rng(0)
    # pre-training seed 0: A better by 0.12; seed 1: B better by 0.08. A wins on the mean.
    for pretrain_seed, (task_a, task_b) in enumerate([(2.40, 2.52), (2.58, 2.50)]):
        for checkpoint, task in (("cosine-1000", task_a), ("cosine-2000", task_b)):
            name = checkpoint if pretrain_seed == 0 else f"{checkpoint}-seed{pretrain_seed}"
            for seed in range(3):
                rows += [{**row, "checkpoint": name, "cell": row["cell"] + f"-p{pretrain_seed}"} for row in run_rows(
                    checkpoint, 1e-3, seed, 2.5, {0: 0.0, 10: 0.05, 20: 0.1}, {0: 4.0, 10: 3.0, 20: task},
                    pretrain_seed=pretrain_seed, noise=0.002, rng=rng)]
    found = recommend(pd.DataFrame(rows), "math", Constraint(max_bpb=3.0), n_boot=400)
    assert found.best["checkpoint"] == "cosine-1000" and found.best["pretrain_seeds"] == [0, 1]
    runner_up = found.candidates.query("checkpoint == 'cosine-2000' and step == 20").iloc[0]
    assert 0.6 < found.best["p_best"] < 0.9 and runner_up["p_best"] > 0.1  # draws of seed 1 twice: B wins
    assert "2 pre-training seeds" in found.resampling


def test_accuracy_is_maximized_at_the_last_step_and_reported_on_its_test_half():
    frame = study(ISSUE)
    measured = frame[(frame["metric"] == "id_bpb") & frame["step"].isin([0, 20])]
    accuracy = measured.assign(metric="id_acc", value=lambda f: 1 / f["value"])
    test_accuracy = accuracy.assign(metric="id_test_acc", value=lambda f: f["value"] - 0.01)
    found = recommend(pd.concat([frame, accuracy, test_accuracy]), "math", Constraint(max_bpb=2.3))
    assert found.id_metric == "id_acc" and found.reported_metric == "id_test_acc" and found.higher_is_better
    assert set(found.candidates["step"]) == {20}
    assert found.best["lr"] == 1e-3 and found.best["value"] == pytest.approx(found.best["validation_value"] - 0.01)
    assert_not_dominated_by_accuracy(found)


def assert_not_dominated_by_accuracy(found) -> None:
    best, usable = found.best, found.candidates[found.candidates["eligible"]]
    assert not any((o["validation_value"] >= best["validation_value"]) and (o["ood_bpb"] <= best["ood_bpb"])
                   and ((o["validation_value"] > best["validation_value"]) or (o["ood_bpb"] < best["ood_bpb"]))
                   for _, o in usable.iterrows())


def test_a_store_without_a_test_half_reports_the_validation_value():
    frame = study(ISSUE)
    found = recommend(frame[frame["metric"] != "id_test_bpb"], "math", Constraint(max_bpb=2.2))
    assert found.reported_metric == "id_bpb" and found.best["value"] == found.best["validation_value"]


def test_one_constraint_at_a_time():
    with pytest.raises(SpecError, match="give one of them"):
        Constraint.of(max_bpb=2.0, within_bpb=0.1)
    with pytest.raises(SpecError, match="--within-bpb"):
        Constraint.of(within_bpb=-0.1)
    assert Constraint.of(within_bpb=0.2) == Constraint(None, 0.2)


SETTINGS = {"name": "synthetic", "data": {"corpus": "default"}, "tokenizer": {"vocab_size": 1024},
            "model": {"preset": "nano"},
            "pretrain": {"budgets": [524288, 2097152], "schedules": ["constant", "wsd"], "peak_lr": 3e-3}}


def test_the_report_writes_recommendation_json_and_the_frontier_figure(tmp_path):
    frame = study(ISSUE, diverged={("wsd-2097152", 1e-3): 15})
    out = write_report(frame, SETTINGS, tmp_path / "report", max_bpb=2.3, n_boot=50)
    answers = json.loads(ReportFolder(out).recommendation.read_text())
    assert len(answers) == 1
    answer = answers[0]
    assert {"task", "checkpoint", "schedule", "tokens", "pretrain_seeds", "lr", "step", "metric", "value",
            "validation_value", "ood_bpb", "forgetting_bpb", "p_best", "constraint", "constraint_met",
            "runners_up"} <= set(answer)
    assert (answer["task"], answer["checkpoint"], answer["lr"], answer["step"]) == ("math", "constant-2097152", 3e-4, 20)
    assert answer["metric"] == "id_test_bpb" and answer["constraint_met"] and answer["tokens"] == 2097152
    assert answer["runners_up"] and {"checkpoint", "lr", "step", "value", "ood_bpb", "p_best"} == set(answer["runners_up"][0])
    assert (out / "recommendation_frontier_math.png").exists()
    summary = (out / "summary.md").read_text()
    assert "math: fine-tune the constant checkpoint" in summary and "a seed diverged: wsd-2097152 at LR 0.001" in summary
    table = pd.read_csv(ReportFolder(out).table("recommendation_math"))
    assert table.loc[table["checkpoint"] == "wsd-2097152", "diverged"].all()


def test_a_task_the_run_does_not_have_is_bad_input(tmp_path):
    with pytest.raises(SpecError, match="--task code: this run has no fine-tuning results for it"):
        write_report(study(ISSUE), SETTINGS, tmp_path / "report", task="code", n_boot=10)
