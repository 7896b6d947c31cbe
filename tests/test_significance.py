"""The building blocks of every verdict, calibrated by simulation (STATISTICS §4).

Each simulated curve is a replicate-by-budget matrix like `Replicates.units()`: 3
replicates x 7 budgets (1k to 1M tokens), every replicate with a large level of its own
(the luck of a run, which a paired test must cancel) plus independent Gaussian noise.
A test passes at p <= ONE_SIDED (2.5%). A false-positive rate is estimated on 2000 null
curves with fixed seeds, so its Monte-Carlo standard error at 2.5% is
sqrt(0.025 * 0.975 / 2000) = 0.35 points; the tests allow three of them (MARGIN, so at
most 3.5%). Measured with these seeds: the U test calls 0.60% of flat curves and 0.80% of
flattening power laws a U (1.3% at 4000 curves of the latter); the trend test calls
2.45% of flat curves rising.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from overtrain.analysis import significance
from overtrain.analysis.replicates import resampled_means
from overtrain.analysis.significance import ONE_SIDED

TOKENS = np.logspace(3, 6, 7)
LOG_TOKENS = np.log10(TOKENS)
REPLICATES = 3
SIMULATIONS = 2000
MARGIN = 3 * np.sqrt(ONE_SIDED * (1 - ONE_SIDED) / SIMULATIONS)

# Null curves: no U. The power law falls steeply, then flattens into the noise: after the
# third budget it moves less than one noise sd, a hard monotone case for a U test.
FLAT = np.zeros_like(TOKENS)
FLATTENING_POWER_LAW = 3 + 2 * (TOKENS / TOKENS[0]) ** -1.0
CLEAR_U = 3 + 0.3 * (LOG_TOKENS - 4.6) ** 2  # lowest near 40k tokens, 0.6 above it at 1M


def simulated(shape: np.ndarray, noise: float, n: int, seed: int) -> list[np.ndarray]:
    """n (replicate x budget) matrices: shape + a level per replicate (sd 1) + noise per cell."""
    rng = np.random.default_rng(seed)
    return [shape + rng.normal(0, 1.0, (REPLICATES, 1)) + rng.normal(0, noise, (REPLICATES, len(shape)))
            for _ in range(n)]


def rate(passes: list[bool]) -> float:
    return float(np.mean(passes))


# -- calibration ------------------------------------------------------------------------

@pytest.mark.parametrize("shape, noise, seed", [(FLAT, 0.05, 0), (FLATTENING_POWER_LAW, 0.2, 1)],
                         ids=["flat", "flattening power law"])
def test_u_test_calls_a_curve_without_a_u_a_u_at_most_one_sided_of_the_time(shape, noise, seed):
    curves = simulated(shape, noise, SIMULATIONS, seed)
    false_positives = rate([significance.u_shape(y).p_value <= ONE_SIDED for y in curves])
    assert false_positives <= ONE_SIDED + MARGIN  # measured: 0.60% flat, 0.80% power law


def test_trend_test_on_flat_curves_rejects_at_its_nominal_level():
    curves = simulated(FLAT, 0.05, SIMULATIONS, seed=2)
    false_positives = rate([significance.trend(y, TOKENS).p_value <= ONE_SIDED for y in curves])
    # Exact under Gaussian noise: neither liberal nor wastefully conservative (measured 2.45%).
    assert ONE_SIDED - MARGIN <= false_positives <= ONE_SIDED + MARGIN


def test_u_test_finds_a_clear_u_almost_always():
    curves = simulated(CLEAR_U, 0.1, 500, seed=3)
    power = rate([significance.u_shape(y).p_value <= ONE_SIDED for y in curves])
    assert power >= 0.95  # measured: 100%


def test_u_test_reports_the_lowest_budget_and_the_rise_after_it():
    test = significance.u_shape(simulated(CLEAR_U, 0.01, 1, seed=4)[0])
    assert TOKENS[test.lowest] == pytest.approx(10**4.5)
    true_rise = CLEAR_U[-1] - CLEAR_U[test.lowest]
    assert test.rise.low < true_rise < test.rise.high and test.rise.p_value < 1e-6


def test_a_rising_curve_is_lowest_at_its_first_budget_and_no_u():
    test = significance.u_shape(simulated(0.1 * LOG_TOKENS, 0.01, 1, seed=5)[0])
    assert test.lowest == 0 and test.p_value > ONE_SIDED


# -- the pieces -------------------------------------------------------------------------

def test_residual_sd_removes_each_replicates_level():
    levels = np.array([[0.0], [5.0], [-40.0]])
    sd, df = significance.residual_sd(levels + np.zeros((3, 7)))
    assert sd == pytest.approx(0.0, abs=1e-12) and df == 12
    assert significance.residual_sd(levels + CLEAR_U)[0] == pytest.approx(0.0, abs=1e-12)


def test_a_within_curve_difference_is_the_paired_t_test():
    units = simulated(FLAT, 0.1, 1, seed=6)[0][:, :2]
    found = significance.within_curve(units, np.array([-1.0, 1.0]))
    paired = stats.ttest_rel(units[:, 1], units[:, 0], alternative="greater")
    assert found.p_value == pytest.approx(paired.pvalue) and found.df == REPLICATES - 1


def test_holm_matches_a_hand_worked_example_and_leaves_untested_curves_out():
    # Four tested curves: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, max(0.06, 0.04).
    adjusted = significance.holm(np.array([0.01, np.nan, 0.04, 0.03, 0.005]))
    np.testing.assert_allclose(adjusted, [0.03, np.nan, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(significance.holm(np.array([0.5, 0.6])), [1.0, 1.0])  # capped at 1
    assert np.isnan(significance.holm(np.array([np.nan]))).all()


@pytest.mark.parametrize("units, diverged, reason", [
    (np.zeros((3, 3)) + np.arange(3), 0, "3 budgets (a test needs 4)"),
    (np.arange(7.0)[None, :], 0, "one seed: no spread to test against"),
    (np.ones((3, 7)), 0, "cannot tell the runs apart"),
    # Seeds agree at every budget, budgets differ: the residual sd is 2e-16 of rounding, not 0.
    (np.tile([0.1, 0.7, 0.3, 0.2, 0.9], (3, 1)), 0, "cannot tell the runs apart"),
    (np.arange(21.0).reshape(3, 7) ** 2, 1, "1 run in it diverged"),
])
def test_untestable_curves_say_why(units, diverged, reason):
    assert reason in significance.untestable(units, diverged=diverged)


def test_a_testable_curve_has_no_reason():
    assert significance.untestable(simulated(FLAT, 0.1, 1, seed=7)[0]) == ""


# -- the hierarchical, paired bootstrap ---------------------------------------------------

def test_resampling_draws_one_seed_for_every_budget():
    # Seed s measures s at every budget: a draw shared by all budgets gives flat curves,
    # one draw per budget would not.
    values = np.broadcast_to(np.arange(5.0)[None, :, None], (1, 5, 7))
    means = resampled_means(values, 500, np.random.default_rng(0))
    assert means.shape == (500, 7)
    assert np.ptp(means, axis=1).max() == pytest.approx(0.0, abs=1e-12)
    assert np.ptp(means[:, 0]) > 1  # the seeds were redrawn


def test_resampling_shares_the_draw_across_curves():
    # Two candidates measured on the same seeds, one 1 above the other: every resample keeps the gap.
    curve = np.random.default_rng(1).normal(0, 1, (2, 3, 7))
    means = resampled_means(np.stack([curve, curve + 1]), 300, np.random.default_rng(0))
    assert means.shape == (300, 2, 7)
    np.testing.assert_allclose(means[:, 1] - means[:, 0], 1.0)


def test_resampling_redraws_pre_training_seeds_first():
    # Two pre-training runs, 10 apart, three near-identical seeds each. Redrawing the runs
    # gives a mean of 0 or 10 (a quarter of the time each) or 5; treating the six seeds as
    # one level would average them away (sd 10 / 2 / sqrt(6) = 2.0 instead of 3.5).
    rng = np.random.default_rng(2)
    values = np.array([0.0, 10.0])[:, None, None] + rng.normal(0, 0.01, (2, 3, 4))
    means = resampled_means(values, 4000, np.random.default_rng(0))[:, 0]
    assert np.mean(means < 1) == pytest.approx(0.25, abs=0.03)
    assert np.mean(means > 9) == pytest.approx(0.25, abs=0.03)
    assert np.std(means) == pytest.approx(np.sqrt(12.5), rel=0.05)
    flat = resampled_means(values.reshape(1, 6, 4), 4000, np.random.default_rng(0))[:, 0]
    assert np.std(flat) < 0.65 * np.std(means)


def test_a_missing_run_is_left_out_of_the_resampled_mean():
    values = np.array([[[1.0, 2.0], [np.nan, 4.0]]])  # seed 1 lost its first budget
    means = resampled_means(values, 200, np.random.default_rng(0))
    assert set(np.unique(means[:, 0][np.isfinite(means[:, 0])])) == {1.0}
