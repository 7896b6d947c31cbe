"""Curves over pre-training tokens: where fine-tuning starts to hurt, and why.

Inflection points (T_pre, T_ft)
    A curve is a metric against tokens with a few seeds per budget. We fit a
    quadratic in log10(tokens) to the per-budget means and call its minimum (the
    bottom of the U) the inflection point: the budget after which more pre-training
    makes this metric worse. A U is *reported* only when, in at least 95% of
    bootstrap resamples, (1) the fitted quadratic falls at the smallest budget and
    rises at the largest (the Lind-Mehlum test for a U, done by bootstrap), and
    (2) the measured means themselves are lowest strictly inside the budget range
    (so a flattening monotone curve, which a quadratic would bend upward, is never
    given a minimum). Otherwise the answer is "no inflection within the budgets
    measured", with the reason. The 95% interval of the inflection is the 2.5-97.5
    percentile range of the minimizer of the fitted quadratic over the measured
    range, across resamples.

Bootstrap
    With at least two seeds at every budget, resamples draw seeds with replacement
    within each budget. With one seed, the seeds cannot show the noise: resamples
    add the quadratic fit's residuals (drawn with replacement, inflated for the
    three fitted parameters) to the fitted curve instead.

Everything here takes *points* tables (one row per seed, see `tables.py`) and
returns plain DataFrames or dataclasses, so the report and the tests read the same
numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95
N_BOOT = 1000
MIN_BUDGETS_FOR_U = 4  # a quadratic has three parameters: four budgets leave one to test it


# -- resampling ---------------------------------------------------------------------

def budget_means(points: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Sorted budgets and the mean value at each (non-finite values dropped)."""
    finite = points[np.isfinite(points["value"].astype(float))]
    means = finite.groupby("tokens")["value"].mean().sort_index()
    return means.index.to_numpy(dtype=float), means.to_numpy(dtype=float)


def resample_seed_means(points: pd.DataFrame, n_boot: int, rng: np.random.Generator) -> np.ndarray | None:
    """(n_boot, budgets) means with seeds redrawn within each budget; None if a budget has one seed."""
    finite = points[np.isfinite(points["value"].astype(float))]
    columns = []
    for _, group in finite.groupby("tokens", sort=True):
        values = group["value"].to_numpy(dtype=float)
        if len(values) < 2:
            return None
        draws = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
        # Redrawn means vary (n-1)/n as much as the mean does: widen them back around it.
        columns.append(values.mean() + (draws - values.mean()) * np.sqrt(len(values) / (len(values) - 1)))
    return np.column_stack(columns)


def _resample_residuals(x: np.ndarray, means: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, budgets) curves: the quadratic fit plus its residuals drawn with replacement."""
    coefficients = np.polyfit(x, means, 2)
    fitted = np.polyval(coefficients, x)
    residuals = (means - fitted) * np.sqrt(len(x) / (len(x) - 3))
    return fitted + residuals[rng.integers(0, len(x), size=(n_boot, len(x)))]


# -- inflection points ----------------------------------------------------------------

@dataclass(frozen=True)
class Inflection:
    """The bottom of a U-shaped curve in tokens, or why there is none."""

    found: bool
    tokens: float  # the fitted minimum (NaN when not found)
    ci_low: float
    ci_high: float
    support: float  # fraction of resamples that show a U (see module docstring)
    note: str  # one plain sentence for the report


def _quadratic_minimizer(coefficients: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Where each fitted quadratic c x^2 + b x + a is lowest on [lo, hi]; coefficients (3, n)."""
    c, b, a = coefficients

    def value(x):
        return (c * x + b) * x + a

    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = np.clip(-b / (2 * c), lo, hi)
    lower_end = np.where(value(lo) <= value(hi), lo, hi)
    return np.where(c > 0, vertex, lower_end)  # a concave or straight fit is lowest at an end


def find_inflection(points: pd.DataFrame, higher_is_better: bool = False, n_boot: int = N_BOOT,
                    seed: int = 0, level: float = LEVEL) -> Inflection:
    """The budget after which the metric in `points` (tokens, value[, seed]) gets worse."""
    tokens, means = budget_means(points)
    if len(tokens) < MIN_BUDGETS_FOR_U:
        return Inflection(False, np.nan, np.nan, np.nan, np.nan,
                          f"needs at least {MIN_BUDGETS_FOR_U} budgets to test for a U (has {len(tokens)})")
    sign = -1.0 if higher_is_better else 1.0  # look for a minimum of "badness"
    x, y = np.log10(tokens), sign * means
    rng = np.random.default_rng(seed)
    resampled = resample_seed_means(points, n_boot, rng)
    curves = sign * resampled if resampled is not None else _resample_residuals(x, y, n_boot, rng)

    coefficients = np.polyfit(x, curves.T, 2)  # (3, n_boot)
    c, b, _ = coefficients
    falls_first = b + 2 * c * x[0] < 0
    rises_last = b + 2 * c * x[-1] > 0
    interior_minimum = (curves.argmin(axis=1) > 0) & (curves.argmin(axis=1) < len(x) - 1)
    support = float(np.mean(falls_first & rises_last & interior_minimum))
    minimizers = 10 ** _quadratic_minimizer(coefficients, x[0], x[-1])
    low, high = np.percentile(minimizers, [100 * (1 - level) / 2, 100 * (1 + level) / 2])

    if support >= level:
        best = 10 ** _quadratic_minimizer(np.polyfit(x, y, 2)[:, None], x[0], x[-1])[0]
        return Inflection(True, float(best), float(low), float(high), support,
                          f"gets worse after ~{best:,.0f} tokens (95% interval {low:,.0f}-{high:,.0f})")
    return Inflection(False, np.nan, np.nan, np.nan, support, _why_no_inflection(y, tokens, support, level))


def _why_no_inflection(y: np.ndarray, tokens: np.ndarray, support: float, level: float) -> str:
    lowest = int(np.argmin(y))
    if lowest == len(y) - 1:
        return f"no inflection within the budgets measured: still improving at {tokens[-1]:,.0f} tokens"
    if lowest == 0:
        return f"no inflection within the budgets measured: worse than at {tokens[0]:,.0f} tokens throughout"
    return (f"no inflection within the budgets measured: a U is seen in only {support:.0%} of resamples "
            f"(needs {level:.0%})")


def inflections(points: pd.DataFrame, by: list[str], higher_is_better: bool = False,
                n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """`find_inflection` for every curve in `points`, one row per group of `by`."""
    rows = []
    for key, curve in points.groupby(by, sort=True, dropna=False):
        found = find_inflection(curve, higher_is_better, n_boot, seed)
        rows.append({**dict(zip(by, key)), **asdict(found)})
    return pd.DataFrame(rows, columns=[*by, *Inflection.__dataclass_fields__])


# -- progressive sensitivity ----------------------------------------------------------

@dataclass(frozen=True)
class RankTrend:
    """Spearman rank correlation of a metric's per-budget mean with tokens."""

    rho: float
    ci_low: float  # NaN when one seed per budget leaves nothing to resample
    ci_high: float
    budgets: int


def _spearman_rows(tokens: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """Spearman rho of tokens against each row of `curves` (tokens already sorted, distinct)."""
    x = stats.rankdata(tokens) - (len(tokens) + 1) / 2
    y = stats.rankdata(curves, axis=1)
    y = y - y.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (y @ x) / np.sqrt((y**2).sum(axis=1) * (x**2).sum())


def rank_trend(points: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> RankTrend:
    """How monotonically a metric grows with tokens: rho in [-1, 1] with a bootstrap interval."""
    tokens, means = budget_means(points)
    if len(tokens) < 3:
        return RankTrend(np.nan, np.nan, np.nan, len(tokens))
    rho = float(_spearman_rows(tokens, means[None, :])[0])
    resampled = resample_seed_means(points, n_boot, np.random.default_rng(seed))
    if resampled is None:
        return RankTrend(rho, np.nan, np.nan, len(tokens))
    low, high = np.nanpercentile(_spearman_rows(tokens, resampled), [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return RankTrend(rho, float(low), float(high), len(tokens))


def rank_trends(points: pd.DataFrame, by: list[str], n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    rows = [{**dict(zip(by, key)), **asdict(rank_trend(curve, n_boot, seed))}
            for key, curve in points.groupby(by, sort=True, dropna=False)]
    return pd.DataFrame(rows, columns=[*by, *RankTrend.__dataclass_fields__])


# -- tuned learning rate --------------------------------------------------------------

def tuned_lr(id_points: pd.DataFrame, higher_is_better: bool = False) -> pd.DataFrame:
    """Per checkpoint and task, the LR whose mean final ID metric is best: one row each.

    The LR is picked on the mean over seeds; `tuned_points` then gives the seeds at it.
    """
    by_checkpoint = ["schedule", "decayed", "tokens", "checkpoint", "task"]
    means = id_points.groupby([*by_checkpoint, "lr"], dropna=False)["value"].mean().reset_index()
    means = means[np.isfinite(means["value"])]
    pick = means.groupby(by_checkpoint, dropna=False)["value"].idxmax() if higher_is_better \
        else means.groupby(by_checkpoint, dropna=False)["value"].idxmin()
    return means.loc[pick.to_numpy(), [*by_checkpoint, "lr"]].reset_index(drop=True)


def tuned_points(points: pd.DataFrame, tuned: pd.DataFrame) -> pd.DataFrame:
    """The rows of `points` (any final metric) at each checkpoint's tuned LR."""
    return points.merge(tuned[["checkpoint", "task", "lr"]], on=["checkpoint", "task", "lr"])


@dataclass(frozen=True)
class LRTrend:
    slope: float  # d log(lr*) / d log(tokens)
    trend: str  # constant | slowly decreasing | quickly decreasing | increasing | undetermined


def lr_trend(tuned: pd.DataFrame, constant_below: float = 0.1, quickly_above: float = 0.5) -> LRTrend:
    """Classify how the tuned LR moves with tokens by the OLS slope of log(lr*) on log(tokens).

    |slope| < constant_below: constant; a negative slope steeper than quickly_above:
    quickly decreasing; in between: slowly decreasing; positive beyond constant_below:
    increasing. The LR grid is discrete, so the slope is coarse: read it with the grid.
    """
    if tuned["tokens"].nunique() < 2:
        return LRTrend(np.nan, "undetermined")
    slope = float(np.polyfit(np.log(tuned["tokens"].astype(float)), np.log(tuned["lr"].astype(float)), 1)[0])
    if abs(slope) < constant_below:
        return LRTrend(slope, "constant")
    if slope > 0:
        return LRTrend(slope, "increasing")
    return LRTrend(slope, "quickly decreasing" if -slope >= quickly_above else "slowly decreasing")


# -- forgetting at matched fine-tuning loss ------------------------------------------

def mean_trajectories(trajectories: pd.DataFrame) -> pd.DataFrame:
    """Fine-tuning trajectories averaged over seeds: one row per checkpoint, task, LR and step."""
    keys = ["schedule", "decayed", "tokens", "checkpoint", "task", "lr", "step"]
    return trajectories.groupby(keys, dropna=False)[["id_loss_nats", "ood_loss_nats"]].mean().reset_index()


def matched_loss_across_checkpoints(trajectories: pd.DataFrame) -> pd.DataFrame:
    """Each checkpoint's least forgetting among evaluations that reach a common task loss.

    tau (per task) is the largest of the per-checkpoint best ID losses, so every
    checkpoint reaches it with some LR at some step. For each checkpoint we report
    the lowest pre-training-text loss (ood_loss_nats) among its seed-averaged
    evaluations with id_loss_nats <= tau, and the LR and step where it was seen.
    """
    mean = mean_trajectories(trajectories)
    rows = []
    for task, runs in mean.groupby("task"):
        tau = runs.groupby("checkpoint")["id_loss_nats"].min().max()
        reached = runs[runs["id_loss_nats"] <= tau]
        best = reached.loc[reached.groupby("checkpoint")["ood_loss_nats"].idxmin()]
        rows.append(best.assign(tau_id_loss_nats=tau))
    columns = ["schedule", "decayed", "tokens", "checkpoint", "task", "tau_id_loss_nats", "ood_loss_nats", "lr", "step"]
    return pd.concat(rows)[columns].reset_index(drop=True) if rows else pd.DataFrame(columns=columns)


def ood_at_id_loss(run: pd.DataFrame, tau: float) -> float:
    """OOD loss where a seed-averaged trajectory first reaches ID loss tau, interpolated linearly.

    Between the last evaluation above tau and the first at or below it, OOD is
    taken as linear in ID loss. NaN if the run never reaches tau.
    """
    run = run.sort_values("step")
    id_loss, ood_loss = run["id_loss_nats"].to_numpy(), run["ood_loss_nats"].to_numpy()
    below = np.flatnonzero(id_loss <= tau)
    if len(below) == 0:
        return np.nan
    first = below[0]
    if first == 0:
        return float(ood_loss[0])
    weight = (id_loss[first - 1] - tau) / (id_loss[first - 1] - id_loss[first])
    return float(ood_loss[first - 1] + weight * (ood_loss[first] - ood_loss[first - 1]))


def matched_loss_across_lrs(trajectories: pd.DataFrame) -> pd.DataFrame:
    """Per checkpoint and task, every learning LR's OOD loss at one shared ID loss.

    The shared ID loss (tau) is the largest of the best ID losses of the LRs that
    learn (improve on the step-0 ID loss); LRs that do not learn are left out. A
    checkpoint needs two learning LRs to compare. Rows: checkpoint, task, lr, tau,
    ood_loss_nats at tau, and `extra_vs_smallest_lr` (its OOD minus that of the
    smallest learning LR).
    """
    mean = mean_trajectories(trajectories)
    rows = []
    for _, runs in mean.groupby(["checkpoint", "task"]):
        learning = [run for _, run in runs.groupby("lr")
                    if run["id_loss_nats"].min() < run.loc[run["step"] == 0, "id_loss_nats"].min()]
        if len(learning) < 2:
            continue
        tau = max(run["id_loss_nats"].min() for run in learning)
        matched = [{**run.iloc[0][["schedule", "decayed", "tokens", "checkpoint", "task", "lr"]].to_dict(),
                    "tau_id_loss_nats": tau, "ood_loss_nats": ood_at_id_loss(run, tau)} for run in learning]
        smallest = matched[0]["ood_loss_nats"]  # groupby sorts the LRs ascending
        rows += [{**row, "extra_vs_smallest_lr": row["ood_loss_nats"] - smallest} for row in matched]
    columns = ["schedule", "decayed", "tokens", "checkpoint", "task", "lr", "tau_id_loss_nats", "ood_loss_nats",
               "extra_vs_smallest_lr"]
    return pd.DataFrame(rows, columns=columns)
