"""The statistics behind the report, on synthetic curves whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from overtrain.analysis import curves
from overtrain.analysis.significance import ONE_SIDED

BUDGETS = np.logspace(3, 6, 7)  # 1k to 1M tokens, half a decade apart
TRUE_MINIMUM = 10**4.6  # ~40k tokens: between the budgets 31.6k and 100k


def curve_points(shape, noise: float, seeds: int = 3, rng_seed: int = 0) -> pd.DataFrame:
    """One row per (budget, seed): shape(log10 tokens) plus Gaussian noise."""
    rng = np.random.default_rng(rng_seed)
    return pd.DataFrame([{"tokens": t, "seed": s, "value": shape(np.log10(t)) + rng.normal(0, noise)}
                         for t in BUDGETS for s in range(seeds)])


def runs_points(shape, run_wiggle: float, noise: float, pretrain_seeds: int = 3, seeds: int = 3,
                rng_seed: int = 0) -> pd.DataFrame:
    """Curves of several pre-training runs: each run wiggles around shape by its own luck
    (run_wiggle, the same for all its seeds), and each seed adds its own noise."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for run in range(pretrain_seeds):
        wiggle = rng.normal(0, run_wiggle, len(BUDGETS))
        rows += [{"tokens": t, "pretrain_seed": run, "seed": s, "value": shape(np.log10(t)) + w + rng.normal(0, noise)}
                 for s in range(seeds) for t, w in zip(BUDGETS, wiggle)]
    return pd.DataFrame(rows)


def u_shape(x):
    return 3 + 0.3 * (x - np.log10(TRUE_MINIMUM)) ** 2


def flat(x):
    return 0 * x


# -- inflection points ------------------------------------------------------------------

def test_noisy_u_curve_has_an_interior_inflection_whose_interval_covers_the_true_minimum():
    found = curves.find_inflection(curve_points(u_shape, noise=0.05))
    assert found.found and found.p_value <= ONE_SIDED
    assert found.ci_low <= TRUE_MINIMUM <= found.ci_high
    assert BUDGETS[0] < found.ci_low and found.ci_high < BUDGETS[-1]
    assert (found.bracket_low, found.bracket_high) == pytest.approx((1e4, 1e5))  # around the lowest, 31.6k
    assert found.bracket_low <= found.tokens <= found.bracket_high
    assert found.note.startswith("gets worse after ~") and "between 10k and 100k" in found.note


def test_the_interval_is_never_narrower_than_the_budgets_around_the_minimum():
    # With almost no noise every resample has the same lowest budget: a fit would give a
    # razor-thin interval, but the minimum can lie anywhere between that budget's neighbours.
    exact = curves.find_inflection(curve_points(u_shape, noise=1e-4))
    assert exact.found
    assert (exact.ci_low, exact.ci_high) == (exact.bracket_low, exact.bracket_high)
    spacing = np.log10(BUDGETS[2] / BUDGETS[0])  # two gaps between budgets
    for i in range(10):
        noisy = curves.find_inflection(curve_points(u_shape, 0.1, rng_seed=i), n_boot=200, seed=i)
        assert noisy.found and np.log10(noisy.ci_high / noisy.ci_low) >= spacing - 1e-9  # 1.5-2 decades measured


def test_intervals_cover_the_true_minimum_in_most_repetitions():
    covered = [(r := curves.find_inflection(curve_points(u_shape, 0.05, rng_seed=i), n_boot=300, seed=i)).found
               and r.ci_low <= TRUE_MINIMUM <= r.ci_high for i in range(20)]
    assert np.mean(covered) >= 0.9  # 20 of 20 measured


def test_inverted_u_of_a_higher_is_better_metric_is_an_inflection():
    found = curves.find_inflection(curve_points(lambda x: 1 - u_shape(x), noise=0.05), higher_is_better=True)
    assert found.found and found.ci_low <= TRUE_MINIMUM <= found.ci_high


def test_flattening_monotone_curve_gets_no_minimum_forced_onto_it():
    # A quadratic fit to this convex, still-falling curve bends upward at the end; the
    # data never do, so no inflection may be reported.
    found = curves.find_inflection(curve_points(lambda x: 3 + np.exp(-2 * (x - 3)), noise=0.002))
    assert not found.found and np.isnan(found.tokens) and np.isnan(found.ci_low)
    assert found.note == "no inflection within the budgets measured: still improving at 1M tokens"
    assert found.p_value > ONE_SIDED


def test_rising_curve_says_worse_throughout():
    found = curves.find_inflection(curve_points(lambda x: 3 + 0.2 * x, noise=0.02))
    assert not found.found and "worse than at 1k tokens throughout" in found.note


def test_pure_noise_is_rarely_called_an_inflection():
    false_alarms = [curves.find_inflection(curve_points(flat, 0.05, rng_seed=i), n_boot=50, seed=i).found
                    for i in range(100)]
    assert sum(false_alarms) <= 4  # at most 2.5% expected (0 of 100 measured; test_significance.py: 0.6%)


def test_the_replicate_is_the_pre_training_run():
    # Flat curves of three pre-training runs, each with its own wiggles across budgets, and
    # seeds that agree closely within a run. Counting the nine seeds as replicates finds
    # U's in the runs' luck; the pre-training runs as replicates do not.
    studies = [runs_points(flat, run_wiggle=0.02, noise=0.002, rng_seed=i) for i in range(40)]
    by_run = sum(curves.find_inflection(s, n_boot=20).found for s in studies)
    by_seed = sum(curves.find_inflection(s.assign(seed=s["seed"] + 3 * s["pretrain_seed"], pretrain_seed=0),
                                         n_boot=20).found for s in studies)
    assert by_run <= 2 and by_seed >= 4  # measured: 0 and 6 of 40


@pytest.mark.parametrize("points, reason", [
    (curve_points(u_shape, 0.01).query("tokens < 20000"), "not testable: 3 budgets (a test needs 4)"),
    (curve_points(u_shape, 0.01, seeds=1), "not testable: one seed: no spread to test against"),
    (curve_points(u_shape, 0.01).assign(diverged=lambda f: (f["seed"] == 1) & (f["tokens"] == 1e6)),
     "not testable: 1 run in it diverged"),
], ids=["3 budgets", "one seed", "a diverged run"])
def test_untestable_curves_say_why_instead_of_a_verdict(points, reason):
    found = curves.find_inflection(points)
    assert not found.found and found.note == reason
    assert np.isnan([found.tokens, found.ci_low, found.ci_high, found.p_value]).all()


def test_inflections_returns_one_row_per_curve():
    points = pd.concat([curve_points(u_shape, 0.05).assign(schedule="cosine"),
                        curve_points(lambda x: 3 - 0.2 * x, 0.05).assign(schedule="constant"),
                        curve_points(u_shape, 0.05, seeds=1).assign(schedule="wsd")])
    table = curves.inflections(points, ["schedule"], n_boot=100).set_index("schedule")
    assert list(table.columns) == list(curves.Inflection.__dataclass_fields__)
    assert len(table) == 3 and table.loc["cosine", "found"] and not table.loc["constant", "found"]
    assert "still improving" in table.loc["constant", "note"] and table.loc["wsd", "note"].startswith("not testable")


# -- rank trend -------------------------------------------------------------------------

def test_rank_trend_of_a_monotone_series_is_one_with_a_tight_interval():
    trend = curves.rank_trend(curve_points(lambda x: 0.1 * x, noise=0.01))
    assert trend.rho == pytest.approx(1.0) and trend.ci_low > 0.9 and trend.budgets == 7


def test_rank_trend_of_noise_has_an_interval_around_zero():
    trend = curves.rank_trend(curve_points(flat, noise=0.05))
    assert trend.ci_low < 0 < trend.ci_high


def test_rank_trend_with_one_seed_has_no_interval():
    trend = curves.rank_trend(curve_points(lambda x: -x, noise=0.01, seeds=1))
    assert trend.rho == pytest.approx(-1.0) and np.isnan(trend.ci_low)


def test_rank_trend_resamples_seeds_paired_across_budgets():
    # Each seed sits at its own level (sd 1, far above the trend's 0.03 per decade) but rises
    # with tokens like the others: redrawn per budget the levels would scramble the order.
    levels = np.random.default_rng(0).normal(0, 1, 5)
    points = curve_points(lambda x: 0.01 * x, noise=1e-4, seeds=5).assign(value=lambda f: f["value"] + levels[f["seed"]])
    trend = curves.rank_trend(points)
    assert trend.ci_low == pytest.approx(1.0) and trend.ci_high == pytest.approx(1.0)


def test_rank_trend_redraws_pre_training_runs():
    # One run rises, the other falls; the seeds within each agree. Redrawing the runs
    # gives either direction, so the interval spans both.
    rising = runs_points(lambda x: 0.1 * x, 0, 0.001, pretrain_seeds=1)
    falling = runs_points(lambda x: -0.1 * x, 0, 0.001, pretrain_seeds=1, rng_seed=1).assign(pretrain_seed=1)
    trend = curves.rank_trend(pd.concat([rising, falling]))
    assert trend.ci_low == pytest.approx(-1.0) and trend.ci_high == pytest.approx(1.0)


# -- tuned LR ---------------------------------------------------------------------------

LR_GRID = (1e-5, 1e-4, 1e-3, 1e-2)


def finetune_points(best_lr_at, pretrain_seeds: int = 1) -> pd.DataFrame:
    """ID bpb per checkpoint and LR that is lowest at best_lr_at(tokens)."""
    rows = []
    for run in range(pretrain_seeds):
        suffix = f"-seed{run}" if run else ""
        for tokens in BUDGETS:
            for lr in LR_GRID:
                for seed in range(2):
                    value = 2 + abs(np.log10(lr) - np.log10(best_lr_at(tokens))) + 0.01 * seed + 0.001 * run
                    rows.append({"schedule": "cosine", "decayed": 1, "tokens": tokens,
                                 "checkpoint": f"cosine-{tokens:.0f}{suffix}", "pretrain_seed": run, "task": "math",
                                 "lr": lr, "seed": seed, "value": value, "diverged": False})
    return pd.DataFrame(rows)


def test_tuned_lr_is_the_lr_with_the_best_mean_and_its_trend_is_classified():
    quickly = curves.tuned_lr(finetune_points(lambda t: 1e-2 if t < 2e4 else 1e-4 if t < 2e5 else 1e-5))
    assert list(quickly.sort_values("tokens")["lr"])[:2] == [1e-2, 1e-2]
    assert curves.lr_trend(quickly).trend == "quickly decreasing"
    constant = curves.tuned_lr(finetune_points(lambda t: 1e-3))
    assert set(constant["lr"]) == {1e-3} and curves.lr_trend(constant).trend == "constant"
    slowly = curves.tuned_lr(finetune_points(lambda t: 1e-2 if t < 3e4 else 1e-3))
    assert curves.lr_trend(slowly).trend == "slowly decreasing"


def test_tuned_lr_maximizes_a_higher_is_better_metric():
    points = finetune_points(lambda t: 1e-3).assign(value=lambda f: -f["value"])
    assert set(curves.tuned_lr(points, higher_is_better=True)["lr"]) == {1e-3}


def test_an_lr_with_a_diverged_seed_is_never_the_tuned_one():
    points = finetune_points(lambda t: 1e-3)
    lost = (points["tokens"] == BUDGETS[2]) & (points["lr"] == 1e-3) & (points["seed"] == 1)
    # A diverged run has no final value; its other seed alone would still look best.
    points.loc[lost, ["value", "diverged"]] = [np.nan, True]
    tuned = curves.tuned_lr(points).set_index("tokens")["lr"]
    assert tuned[BUDGETS[2]] in (1e-4, 1e-2) and (tuned.drop(BUDGETS[2]) == 1e-3).all()


def test_one_tuned_lr_per_budget_across_pre_training_runs_and_its_points():
    points = finetune_points(lambda t: 1e-3 if t < 1e5 else 1e-2, pretrain_seeds=2)
    tuned = curves.tuned_lr(points)
    assert len(tuned) == len(BUDGETS) and list(tuned.columns) == [*curves.TUNED_BY, "lr"]
    at = curves.tuned_points(points, tuned)
    assert len(at) == len(BUDGETS) * 2 * 2  # both runs' checkpoints, both seeds, one LR per budget
    assert (at.groupby("tokens")["lr"].nunique() == 1).all()
    edge = curves.at_grid_edge(tuned, list(LR_GRID))
    assert set(edge["tokens"]) == {t for t in BUDGETS if t >= 1e5} and set(edge["lr"]) == {1e-2}


# -- matched-loss forgetting ------------------------------------------------------------

def trajectory(checkpoint: str, tokens: float, lr: float, id_losses, ood_losses) -> pd.DataFrame:
    return pd.DataFrame({"schedule": "cosine", "decayed": 1, "tokens": tokens, "checkpoint": checkpoint,
                         "task": "math", "lr": lr, "seed": 0, "step": np.arange(len(id_losses)) * 5,
                         "id_loss_nats": id_losses, "ood_loss_nats": ood_losses})


def test_ood_at_id_loss_interpolates_between_evaluations():
    run = trajectory("a", 1e4, 1e-3, [4.0, 3.0, 2.0], [1.0, 1.2, 1.6])
    assert curves.ood_at_id_loss(run, 2.5) == pytest.approx(1.4)
    assert curves.ood_at_id_loss(run, 3.0) == pytest.approx(1.2)
    assert np.isnan(curves.ood_at_id_loss(run, 1.0))


def test_matched_loss_across_checkpoints_uses_the_worst_best_task_loss():
    paths = pd.concat([trajectory("small", 1e4, 1e-3, [4.0, 3.0, 2.5], [1.0, 1.1, 1.3]),
                       trajectory("large", 1e5, 1e-3, [3.5, 2.0, 1.5], [0.8, 1.0, 1.5])])
    table = curves.matched_loss_across_checkpoints(paths).set_index("checkpoint")
    assert table["tau_id_loss_nats"].unique() == [2.5]
    assert table.loc["small", "ood_loss_nats"] == 1.3  # only its last evaluation reaches 2.5
    assert table.loc["large", "ood_loss_nats"] == 1.0  # step 5 (ID 2.0) forgets less than step 10


def test_matched_loss_across_lrs_compares_at_a_loss_both_reach_and_skips_lrs_that_do_not_learn():
    paths = pd.concat([trajectory("c", 1e4, 1e-4, [4.0, 3.5, 3.0], [1.0, 1.05, 1.1]),
                       trajectory("c", 1e4, 1e-2, [4.0, 2.0, 1.0], [1.0, 1.5, 2.0]),
                       trajectory("c", 1e4, 1.0, [4.0, 9.0, 9.0], [1.0, 9.0, 9.0])])
    table = curves.matched_loss_across_lrs(paths).set_index("lr")
    assert list(table.index) == [1e-4, 1e-2]  # LR 1.0 never improves on step 0
    assert table.loc[1e-2, "ood_loss_nats"] == pytest.approx(1.25)  # ID 3.0 is halfway from 4.0 to 2.0
    assert table.loc[1e-2, "extra_vs_smallest_lr"] == pytest.approx(0.15)
