"""Tests on curves over budgets: trends, U-shapes, paired differences, and their correction.

Every test reads a curve's replicate-by-budget matrix `Y[u, b]` (`Replicates.units()`:
pre-training seeds when a study has several, else the seeds of its one run) and uses
Student's t, which holds at the few replicates a study has (a bootstrap of 3 seeds
would be far too narrow). Two kinds of contrast of the budget means:

- *within-curve* contrasts (weights summing to zero: a slope, a rise from one budget
  to another) are paired: each replicate's own level cancels, and the noise is the
  replicate-by-budget residual of a two-way fit, with (U-1)(B-1) degrees of freedom;
- *level* contrasts (a mean over budgets, e.g. of decayed-minus-constant differences)
  are computed per replicate and tested across replicates, with U-1 degrees of freedom.

A U is tested as Lind and Mehlum do, on the budgets themselves: at some interior budget
b the curve is lower than at the first budget AND lower than at the last (both one-sided
tests at level alpha, an intersection-union test), with a Bonferroni factor for the B-2
interior budgets that could have been that b. A monotone curve is then called a U at
most ONE_SIDED of the time, however noisy (tests/test_significance.py, and
`overtrain power` for whole studies).

Every p-value is one-sided and a test passes at p <= ONE_SIDED (2.5%): the effect's 95%
interval then lies on the claimed side of zero. A claim tested on several curves holds
when at least one curve passes after Holm's step-down correction over them (`holm`), so
no claim gets more chances than another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
# Each test is one-sided (an effect in the claimed direction) at ALPHA / 2: an effect holds
# exactly when its 95% interval lies on the claimed side of zero.
ONE_SIDED = ALPHA / 2
MIN_BUDGETS = 4  # a U needs an interior budget on each side of the lowest; a trend two more to be judged


@dataclass(frozen=True)
class Estimate:
    """An effect with its 95% interval and the one-sided p-value that it is > 0."""

    value: float
    low: float
    high: float
    p_value: float
    df: int


NOT_AN_ESTIMATE = Estimate(np.nan, np.nan, np.nan, np.nan, 0)


def untestable(units: np.ndarray, min_budgets: int = MIN_BUDGETS, diverged: int = 0) -> str:
    """Why a curve's (U, B) matrix cannot be tested, or "" when it can."""
    if diverged:
        return f"{diverged} run{'s' if diverged > 1 else ''} in it diverged"
    if units.shape[1] < min_budgets:
        return f"{units.shape[1]} budgets (a test needs {min_budgets})"
    if units.shape[0] < 2:
        return "one seed: no spread to test against"
    # Compared exactly, not through residual_sd: its means leave ~1e-16 of rounding, which would
    # make a tiny noise estimate and any difference between budgets "significant".
    if np.ptp(units, axis=0).max() == 0:
        return "the metric cannot tell the runs apart (every seed gives the same value)"
    return ""


def residual_sd(units: np.ndarray) -> tuple[float, int]:
    """Standard deviation of replicate-by-budget noise after removing replicate and budget means."""
    u, b = units.shape
    residuals = units - units.mean(axis=0) - units.mean(axis=1, keepdims=True) + units.mean()
    df = (u - 1) * (b - 1)
    return (float(np.sqrt((residuals**2).sum() / df)) if df > 0 else np.nan), df


def within_curve(units: np.ndarray, weights: np.ndarray) -> Estimate:
    """weights . (budget means), weights summing to zero, tested > 0 with the paired residual noise."""
    sd, df = residual_sd(units)
    value = float(weights @ units.mean(axis=0))
    se = sd * np.linalg.norm(weights) / np.sqrt(units.shape[0])
    return _estimate(value, se, df)


def across_replicates(per_replicate: np.ndarray) -> Estimate:
    """The mean of per-replicate values, tested > 0 across replicates."""
    n = len(per_replicate)
    if n < 2:
        return NOT_AN_ESTIMATE
    return _estimate(float(per_replicate.mean()), float(per_replicate.std(ddof=1) / np.sqrt(n)), n - 1)


def _estimate(value: float, se: float, df: int) -> Estimate:
    if not df or not np.isfinite(se):
        return NOT_AN_ESTIMATE
    half = stats.t.ppf(1 - ALPHA / 2, df) * se
    p_value = float(stats.t.sf(value / se, df)) if se > 0 else float(value <= 0)
    return Estimate(value, value - half, value + half, p_value, df)


def slope_weights(tokens: np.ndarray) -> np.ndarray:
    """Weights whose contrast is the least-squares slope per decade of tokens."""
    x = np.log10(tokens) - np.log10(tokens).mean()
    return x / (x**2).sum()


def trend(units: np.ndarray, tokens: np.ndarray) -> Estimate:
    """Slope of the metric per 10x tokens, tested > 0 (the metric grows with tokens)."""
    return within_curve(units, slope_weights(tokens))


@dataclass(frozen=True)
class UShape:
    """The U test of one curve (lower is better): its p-value and the rise after the lowest budget."""

    p_value: float   # Bonferroni over interior budgets, intersection-union at each
    lowest: int      # index of the budget with the lowest mean (0: at or before the first budget)
    rise: Estimate   # last budget's mean minus the lowest's, with its interval


def u_shape(units: np.ndarray) -> UShape:
    """Is the curve (lower is better) lowest strictly between its first and last budget?"""
    means = units.mean(axis=0)
    n_budgets = len(means)
    lowest = int(np.argmin(means))
    sd, df = residual_sd(units)
    # Every difference of two budget means has the same standard error.
    se = sd * np.sqrt(2 / units.shape[0])
    interior = means[1:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        falls = stats.t.sf((means[0] - interior) / se, df)    # first minus b > 0
        rises = stats.t.sf((means[-1] - interior) / se, df)   # last minus b > 0
    p_value = min(1.0, (n_budgets - 2) * float(np.maximum(falls, rises).min())) if len(interior) else np.nan
    return UShape(p_value, lowest, within_curve(units, _difference(n_budgets, -1, lowest)))


def _difference(n: int, minuend: int, subtrahend: int) -> np.ndarray:
    weights = np.zeros(n)
    weights[minuend] += 1.0
    weights[subtrahend] -= 1.0
    return weights


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN: an untested curve)."""
    p_values = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p_values, np.nan)
    tested = np.flatnonzero(np.isfinite(p_values))
    order = tested[np.argsort(p_values[tested])]
    m = len(order)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted
