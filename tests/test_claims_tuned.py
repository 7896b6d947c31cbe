"""The claims about the fine-tuning LR, on results whose answer is known: T_ft and T_pre at the tuned
(LR, step) chosen on validation and reported on test, the optimal-LR trend, and large vs small LR at
equal task loss."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from overtrain.analysis import tables, tuned_claims

BUDGETS = [2**20 * 2**k for k in range(8)]  # 1M to 134M tokens
LRS = (3e-4, 1e-3, 3e-3)


def runs(task, ood, lrs=LRS, seeds=3, steps=(0, 50, 100), budgets=BUDGETS, noise=0.003, rng_seed=0) -> pd.DataFrame:
    """Fine-tuning rows as a real run writes them, for schedules constant and wsd and the task "prose":
    task(lr, log2 tokens, step) is the task bpb (validation and test parts, each with its own noise),
    ood(lr, log2 tokens, step) the pre-training-text bpb; step 0 is the checkpoint itself."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for schedule in ("constant", "wsd"):
        for tokens in budgets:
            checkpoint = {"checkpoint": f"{schedule}-{tokens}", "schedule": schedule, "decayed": int(schedule == "wsd"),
                          "tokens": tokens}
            for lr in lrs:
                for seed in range(seeds):
                    cell = {"cell": f"{schedule}-{tokens}-{lr}-{seed}", "kind": "finetune", "task": "prose", "lr": lr,
                            "seed": seed, "mitigation": None, **checkpoint}
                    for step in steps:
                        luck = noise if step else 0.0
                        x = np.log2(tokens)
                        rows += [{**cell, "step": step, "metric": metric, "value": value + rng.normal(0, luck)}
                                 for metric, value in (("id_bpb", task(lr, x, step)), ("id_test_bpb", task(lr, x, step)),
                                                       ("ood_bpb", ood(lr, x, step)))]
    return pd.DataFrame(rows)


def learned(lr, best_lr=1e-3):
    """What fine-tuning at `lr` takes off the task bpb: a bowl in log LR, deepest at best_lr."""
    return 0.5 - 0.2 * np.log10(lr / best_lr) ** 2


def u_in_tokens(x, depth=0.02, bottom=23.5):
    return depth * (x - bottom) ** 2


def check(frame: pd.DataFrame):
    return tuned_claims.tuned_lr_claims(frame, 100, 0, tables.finetune_final(frame))


@pytest.mark.parametrize("task_u, ood_u", [(True, True), (True, False), (False, True), (False, False)])
def test_t_ft_and_t_pre_at_the_tuned_lr_are_separate_verdicts(task_u, ood_u):
    def task(lr, x, step):
        return 3.0 + (u_in_tokens(x) if task_u else -0.05 * x) - learned(lr) * (step > 0)

    def ood(lr, x, step):
        return 2.3 + (u_in_tokens(x) if ood_u else -0.05 * x) + 0.3 * (step > 0)

    t_ft, t_pre, _ = check(runs(task, ood))
    assert t_ft.verdict == ("holds" if task_u else "does not hold"), t_ft.finding
    assert t_pre.verdict == ("holds" if ood_u else "does not hold"), t_pre.finding
    assert "inside the grid at 16 of 16 (task, schedule, budget) points" in t_ft.finding
    if task_u:  # the bottom of the U (2^23.5 tokens) lies between its bracketing budgets
        table = dict(t_ft.tables)["t_ft_tuned"]
        assert (table["lowest_ci_low"] <= 2**23).all() and (table["lowest_ci_high"] >= 2**24).all()


def test_the_step_is_chosen_on_validation_and_reported_on_test():
    """Runs overfit: every run is best at step 50 on validation. There the task bpb has a U in tokens;
    at the last step it has none, so only a choice of step on validation finds T_ft."""
    def task(lr, x, step):
        at_50 = 3.0 + u_in_tokens(x) - learned(lr)
        return {0: 4.0, 50: at_50, 100: 3.8 - learned(lr) - 0.05 * (x - 20)}[step]

    frame = runs(task, lambda lr, x, step: 2.3 - 0.05 * x)
    stopped = tables.early_stopped(frame, "id_bpb", higher_is_better=False)
    assert set(stopped["step"]) == {50}
    test_at_50 = frame[(frame["step"] == 50) & (frame["metric"] == "id_test_bpb")].set_index("cell")["value"]
    reported = stopped[stopped["metric"] == "id_test_bpb"].set_index("cell")["value"]
    assert reported.sort_index().equals(test_at_50.sort_index())
    t_ft, t_pre, _ = check(frame)
    assert t_ft.verdict == "holds" and t_pre.verdict == "does not hold", t_ft.finding


@pytest.mark.parametrize("edge_budgets, testable", [(2, True), (5, False)])
def test_budgets_whose_tuned_lr_is_at_the_grid_edge_are_left_out(edge_budgets, testable):
    """The best LR is above the grid at the first `edge_budgets` budgets: those are not testable."""
    def task(lr, x, step):
        best = 1e-2 if x < 20 + edge_budgets else 1e-3
        return 3.0 - learned(lr, best) * (step > 0)

    def ood(lr, x, step):
        return 2.3 + u_in_tokens(x, bottom=25.5) + 0.3 * (step > 0)

    _, t_pre, trend = check(runs(task, ood))
    inside = 2 * (len(BUDGETS) - edge_budgets)
    assert f"inside the grid at {inside} of 16" in t_pre.finding
    assert (t_pre.verdict == "holds") == testable, t_pre.reason
    if not testable:
        assert t_pre.verdict == trend.verdict == "not testable"
        assert (f"tuned LR at an end of the grid at {edge_budgets} of 8 budgets" in t_pre.reason
                and "3 left (a test needs 4)" in t_pre.reason)
    table = dict(t_pre.tables)["t_pre_tuned"]
    assert (table["edge_budgets"] == edge_budgets).all()


GRID = tuple(10.0 ** np.arange(-4, -1.9, 0.5))  # 1e-4 to 1e-2, half a decade apart


@pytest.mark.parametrize("slope_per_octave, verdict", [(-0.1, "holds"), (0.0, "does not hold")])
def test_a_tuned_lr_that_falls_with_tokens_holds_lr_trend(slope_per_octave, verdict):
    def task(lr, x, step):  # the best LR moves from 10^-2.8 (1M tokens) by slope_per_octave decades per doubling
        return 3.0 - learned(lr, 10 ** (-2.8 + slope_per_octave * (x - 20))) * (step > 0)

    _, _, trend = check(runs(task, lambda lr, x, step: 2.3, lrs=GRID))
    assert trend.verdict == verdict, trend.finding
    expected = slope_per_octave * np.log2(10)  # decades of LR per decade of tokens
    assert trend.effect_low < expected < trend.effect_high
    if verdict == "holds":
        assert "slowly decreasing" in trend.reason


def matched_runs(forgets_per_task_bpb, seeds=3):
    """Task bpb falls as sqrt(step) by learned(lr); pre-training text loses forgets(lr) bpb per bpb
    of task learned, so at equal task loss the LRs differ by how much they forget per bpb."""
    def task(lr, x, step):
        return 3.5 - learned(lr) * np.sqrt(step / 100)

    def ood(lr, x, step):
        return 2.3 + forgets_per_task_bpb(lr) * learned(lr) * np.sqrt(step / 100)

    return runs(task, ood, seeds=seeds, steps=(0, 25, 50, 75, 100), budgets=BUDGETS[:2])


def test_a_larger_lr_that_forgets_more_at_equal_task_loss_holds_matched_loss():
    found = tuned_claims.matched_loss(matched_runs(lambda lr: 0.5 if lr > 2e-3 else 0.3))
    assert found.verdict == "holds", found.reason
    # at equal task loss both LRs learned the same; the largest forgets 0.2 bpb more per bpb learned
    assert found.effect_low < 0.2 * learned(3e-3) < found.effect_high
    alike = tuned_claims.matched_loss(matched_runs(lambda lr: 0.3))
    assert alike.verdict == "does not hold" and alike.effect_low < 0 < alike.effect_high


def test_matched_loss_is_not_testable_without_seeds_or_a_second_learning_lr():
    one_seed = tuned_claims.matched_loss(matched_runs(lambda lr: 0.3, seeds=1))
    assert one_seed.verdict == "not testable" and "one seed" in one_seed.reason
    frame = matched_runs(lambda lr: 0.3)
    only_one_learns = frame[~((frame["lr"] != 1e-3) & (frame["step"] > 0) & frame["metric"].str.startswith("id"))]
    only_one_learns = pd.concat([only_one_learns, frame[(frame["lr"] != 1e-3) & (frame["step"] > 0)
                                                        & frame["metric"].str.startswith("id")].assign(value=4.0)])
    found = tuned_claims.matched_loss(only_one_learns)
    assert found.verdict == "not testable" and "two LRs or more that learn" in found.reason


def test_a_diverged_run_is_not_stopped_early_at_an_evaluation_before_it_diverged():
    from test_claims import finetune_rows, u_after

    diverged = {f"constant-{2**20}-0.001-0"}
    frame = pd.DataFrame(finetune_rows(u_after, diverged=diverged))
    stopped = tables.early_stopped(frame, "id_bpb", higher_is_better=False)
    broken = stopped[stopped["cell"].isin(diverged)]
    assert len(broken) and broken["diverged"].all() and broken["value"].isna().all()
    assert not stopped.loc[~stopped["cell"].isin(diverged), "diverged"].any()
