"""The statistics behind the report, on synthetic curves whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from overtrain.analysis import curves

BUDGETS = np.logspace(3, 6, 7)  # 1k to 1M tokens
TRUE_MINIMUM = 10**4.6  # ~40k tokens


def curve_points(shape, noise: float, seeds: int = 3, rng_seed: int = 0) -> pd.DataFrame:
    """One row per (budget, seed): shape(log10 tokens) plus Gaussian noise."""
    rng = np.random.default_rng(rng_seed)
    return pd.DataFrame([{"tokens": t, "seed": s, "value": shape(np.log10(t)) + rng.normal(0, noise)}
                         for t in BUDGETS for s in range(seeds)])


def u_shape(x):
    return 3 + 0.3 * (x - np.log10(TRUE_MINIMUM)) ** 2


@pytest.mark.parametrize("seeds", [3, 1])
def test_noisy_u_curve_has_an_interior_inflection_whose_interval_covers_the_true_minimum(seeds):
    found = curves.find_inflection(curve_points(u_shape, noise=0.05, seeds=seeds))
    assert found.found and found.support >= 0.95
    assert found.ci_low <= TRUE_MINIMUM <= found.ci_high
    assert BUDGETS[0] < found.ci_low and found.ci_high < BUDGETS[-1]


def test_intervals_cover_the_true_minimum_in_most_repetitions():
    covered = [(r := curves.find_inflection(curve_points(u_shape, 0.05, rng_seed=i), n_boot=300, seed=i)).found
               and r.ci_low <= TRUE_MINIMUM <= r.ci_high for i in range(20)]
    assert np.mean(covered) >= 0.75  # ~0.9 measured over 100 repetitions with three seeds


def test_inverted_u_of_a_higher_is_better_metric_is_an_inflection():
    found = curves.find_inflection(curve_points(lambda x: 1 - u_shape(x), noise=0.05), higher_is_better=True)
    assert found.found and found.ci_low <= TRUE_MINIMUM <= found.ci_high


def test_flattening_monotone_curve_gets_no_minimum_forced_onto_it():
    # A quadratic fit to this convex, still-falling curve bends upward at the end; the
    # data never do, so no inflection may be reported.
    found = curves.find_inflection(curve_points(lambda x: 3 + np.exp(-2 * (x - 3)), noise=0.002))
    assert not found.found
    assert "still improving" in found.note and np.isnan(found.tokens)


def test_rising_curve_says_worse_throughout():
    found = curves.find_inflection(curve_points(lambda x: 3 + 0.2 * x, noise=0.02))
    assert not found.found and "throughout" in found.note


def test_pure_noise_is_rarely_called_an_inflection():
    false_alarms = [curves.find_inflection(curve_points(lambda x: 0 * x, 0.05, rng_seed=i), n_boot=300, seed=i).found
                    for i in range(20)]
    assert sum(false_alarms) <= 3  # the test's level is 5%: ~1 in 20 expected, 4-6% measured over 100


def test_too_few_budgets_are_said_so():
    points = curve_points(u_shape, 0.01)
    found = curves.find_inflection(points[points["tokens"].isin(BUDGETS[:3])])
    assert not found.found and "at least 4 budgets" in found.note


def test_inflections_returns_one_row_per_curve():
    points = pd.concat([curve_points(u_shape, 0.05).assign(schedule="cosine"),
                        curve_points(lambda x: 3 - 0.2 * x, 0.05).assign(schedule="constant")])
    table = curves.inflections(points, ["schedule"]).set_index("schedule")
    assert table.loc["cosine", "found"] and not table.loc["constant", "found"]


def test_rank_trend_of_a_monotone_series_is_one_with_a_tight_interval():
    trend = curves.rank_trend(curve_points(lambda x: 0.1 * x, noise=0.01))
    assert trend.rho == pytest.approx(1.0) and trend.ci_low > 0.9


def test_rank_trend_of_noise_has_an_interval_around_zero():
    trend = curves.rank_trend(curve_points(lambda x: 0 * x, noise=0.05))
    assert trend.ci_low < 0 < trend.ci_high


def test_rank_trend_with_one_seed_has_no_interval():
    trend = curves.rank_trend(curve_points(lambda x: -x, noise=0.01, seeds=1))
    assert trend.rho == pytest.approx(-1.0) and np.isnan(trend.ci_low)


# -- tuned LR ---------------------------------------------------------------------------

def finetune_points(best_lr_at) -> pd.DataFrame:
    """ID bpb per checkpoint and LR that is lowest at best_lr_at(tokens)."""
    rows = []
    for tokens in BUDGETS:
        for lr in (1e-5, 1e-4, 1e-3, 1e-2):
            for seed in range(2):
                value = 2 + abs(np.log10(lr) - np.log10(best_lr_at(tokens))) + 0.01 * seed
                rows.append({"schedule": "cosine", "decayed": 1, "tokens": tokens, "checkpoint": f"c-{tokens:.0f}",
                             "task": "math", "lr": lr, "seed": seed, "value": value})
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
