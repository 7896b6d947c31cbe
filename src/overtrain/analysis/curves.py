"""Curves over pre-training tokens: where fine-tuning starts to hurt, and why.

Inflection points (T_pre, T_ft)
    A curve is a metric against tokens, measured in replicates (`replicates.py`). Its
    inflection is the bottom of a U: the budget after which more pre-training makes
    the metric worse. A U is *found* when the test of `significance.u_shape` passes
    (the curve is lower at an interior budget than at both ends, beyond the seeds'
    noise); otherwise the answer is "no inflection within the budgets measured", with
    the reason. The location is the lowest budget, refined by the parabola through it
    and its two neighbours (in log tokens). Its 95% interval comes from the hierarchical
    paired bootstrap of the seeds and always spans the budgets around the lowest one
    in each resample: a minimum between two measured budgets can be anywhere between
    them, so no interval is narrower than the spacing of the budgets (STATISTICS §5).

Everything here takes *points* tables (one row per seed, see `tables.py`) and
returns plain DataFrames or dataclasses, so the report and the tests read the same
numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

from overtrain.analysis import significance
from overtrain.analysis.page import short_tokens
from overtrain.analysis.replicates import Replicates, replicates, resampled_means, unit_values

LEVEL = 0.95
N_BOOT = 1000


# -- inflection points ----------------------------------------------------------------

@dataclass(frozen=True)
class Inflection:
    """The bottom of a U-shaped curve in tokens, or why there is none."""

    found: bool
    tokens: float        # the refined lowest point (NaN when not found)
    ci_low: float        # 95% interval, never narrower than the budgets around the lowest
    ci_high: float
    bracket_low: float   # the measured budgets on either side of the lowest one
    bracket_high: float
    p_value: float       # of the U test (one curve; claims correct for several)
    note: str            # one plain sentence for the report


def find_inflection(points: pd.DataFrame, higher_is_better: bool = False, n_boot: int = N_BOOT,
                    seed: int = 0) -> Inflection:
    """The budget after which the metric in `points` (tokens, value[, seed, pretrain_seed]) gets worse."""
    curve = badness(replicates(points), higher_is_better)
    units = curve.units()
    why = significance.untestable(units, diverged=curve.diverged)
    if why:
        return Inflection(False, *[np.nan] * 6, f"not testable: {why}")
    test = significance.u_shape(units)
    if test.p_value > significance.ONE_SIDED:
        return Inflection(False, *[np.nan] * 5, test.p_value, _why_no_inflection(curve, test))
    low, high = lowest_interval(curve, n_boot, seed)
    best = refined_lowest(curve.tokens, curve.means())
    before, after = _bracket(curve.tokens, test.lowest)
    return Inflection(True, best, low, high, before, after, test.p_value,
                      f"gets worse after ~{short_tokens(best)} tokens (lowest measured budget {short_tokens(curve.tokens[test.lowest])}, "
                      f"between {short_tokens(before)} and {short_tokens(after)}; 95% interval {short_tokens(low)}-{short_tokens(high)}; "
                      f"U test p = {test.p_value:.2g})")


def badness(curve: Replicates, higher_is_better: bool) -> Replicates:
    """The curve with lower always better, so that a U is always a minimum."""
    return Replicates(curve.tokens, -curve.values if higher_is_better else curve.values, curve.diverged)


def _why_no_inflection(curve: Replicates, test: significance.UShape) -> str:
    tokens = curve.tokens
    if test.lowest == len(tokens) - 1:
        return f"no inflection within the budgets measured: still improving at {short_tokens(tokens[-1])} tokens"
    if test.lowest == 0:
        return f"no inflection within the budgets measured: worse than at {short_tokens(tokens[0])} tokens throughout"
    return (f"no inflection within the budgets measured: lowest at {short_tokens(tokens[test.lowest])} tokens, but "
            f"not beyond the seeds' noise (U test p = {test.p_value:.2g})")


def refined_lowest(tokens: np.ndarray, means: np.ndarray) -> float:
    """The lowest budget moved to the vertex of the parabola through it and its neighbours (log tokens)."""
    return float(10 ** lowest_vertex(np.log10(tokens), np.asarray(means, dtype=float)))


def lowest_vertex(x: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Where each row of `values` (..., N), over increasing positions `x` (N,), is lowest: its lowest
    point moved to the vertex of the parabola through it and its two neighbours, kept between them.
    The lowest point itself at an end, next to a missing value, or where the three do not bend up;
    NaN where a row has no value."""
    filled = np.where(np.isfinite(values), values, np.inf)
    k = np.argmin(filled, axis=-1)
    lowest = np.where(np.isfinite(filled).any(axis=-1), x[k], np.nan)
    if len(x) < 3:
        return lowest
    middle = np.clip(k, 1, len(x) - 2)
    x0, x1, x2 = x[middle - 1], x[middle], x[middle + 1]
    y0, y1, y2 = (np.take_along_axis(values, (middle + shift)[..., None], axis=-1)[..., 0] for shift in (-1, 0, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rise_before, rise_after = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
        curvature = (rise_after - rise_before) / (x2 - x0)
        vertex = (x0 + x1) / 2 - rise_before / (2 * curvature)
    bends_up = (k == middle) & (curvature > 0) & np.isfinite(vertex)
    return np.where(bends_up, np.clip(vertex, x0, x2), lowest)


def lowest_interval(curve: Replicates, n_boot: int, seed: int) -> tuple[float, float]:
    """95% interval of the lowest point: in each seed resample, the span between the budgets
    around the lowest one; the interval runs from the 2.5th percentile of the spans' lower
    ends to the 97.5th of their upper ends."""
    means = resampled_means(curve.values, n_boot, np.random.default_rng(seed))
    return lowest_interval_of(curve.tokens, means)


def lowest_interval_of(tokens: np.ndarray, resampled: np.ndarray) -> tuple[float, float]:
    """The same from (n_boot, B) resampled curve means."""
    lowest = np.nanargmin(np.where(np.isfinite(resampled), resampled, np.inf), axis=1)
    before = tokens[np.maximum(lowest - 1, 0)]
    after = tokens[np.minimum(lowest + 1, len(tokens) - 1)]
    tail = 100 * (1 - LEVEL) / 2
    return float(np.percentile(before, tail)), float(np.percentile(after, 100 - tail))


def _bracket(tokens: np.ndarray, k: int) -> tuple[float, float]:
    return float(tokens[max(k - 1, 0)]), float(tokens[min(k + 1, len(tokens) - 1)])


def inflections(points: pd.DataFrame, by: list[str], higher_is_better: bool = False,
                n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """`find_inflection` for every curve in `points`, one row per group of `by`."""
    rows = []
    for key, curve in points.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        found = find_inflection(curve, higher_is_better, n_boot, seed)
        rows.append({**dict(zip(by, key)), **asdict(found)})
    return pd.DataFrame(rows, columns=[*by, *Inflection.__dataclass_fields__])


# -- progressive sensitivity ----------------------------------------------------------

@dataclass(frozen=True)
class RankTrend:
    """Spearman rank correlation of a metric's per-budget mean with tokens (descriptive)."""

    rho: float
    ci_low: float  # NaN when one seed leaves nothing to resample
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
    """How monotonically a metric grows with tokens: rho in [-1, 1] with a hierarchical bootstrap interval."""
    curve = replicates(points)
    means = curve.means()
    if len(curve.tokens) < 3 or not np.isfinite(means).all():
        return RankTrend(np.nan, np.nan, np.nan, len(curve.tokens))
    rho = float(_spearman_rows(curve.tokens, means[None, :])[0])
    if curve.pretrain_seeds * curve.seeds < 2:
        return RankTrend(rho, np.nan, np.nan, len(curve.tokens))
    resampled = resampled_means(curve.values, n_boot, np.random.default_rng(seed))
    low, high = np.nanpercentile(_spearman_rows(curve.tokens, resampled), [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return RankTrend(rho, float(low), float(high), len(curve.tokens))


def rank_trends(points: pd.DataFrame, by: list[str], n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    rows = [{**dict(zip(by, key if isinstance(key, tuple) else (key,))), **asdict(rank_trend(curve, n_boot, seed))}
            for key, curve in points.groupby(by, sort=True, dropna=False)]
    return pd.DataFrame(rows, columns=[*by, *RankTrend.__dataclass_fields__])


# -- tuned learning rate --------------------------------------------------------------

TUNED_BY = ["schedule", "decayed", "tokens", "task"]  # one tuned LR per budget of a schedule, over all seeds


def tuned_lr(id_points: pd.DataFrame, higher_is_better: bool = False) -> pd.DataFrame:
    """Per budget of each schedule and task, the LR whose mean ID metric (over every seed) is best.

    Pass the *validation* metric: the choice is then reported on the test part and on
    pre-training text (STATISTICS §6). An LR with a diverged seed is never the tuned one.
    """
    diverged = id_points["diverged"].fillna(False).astype(bool) if "diverged" in id_points else False
    grouped = id_points.assign(_diverged=diverged).groupby([*TUNED_BY, "lr"], dropna=False)
    means = grouped.agg(value=("value", "mean"), diverged=("_diverged", "any")).reset_index()
    means = means[np.isfinite(means["value"]) & ~means["diverged"]]
    pick = means.groupby(TUNED_BY, dropna=False)["value"].idxmax() if higher_is_better \
        else means.groupby(TUNED_BY, dropna=False)["value"].idxmin()
    return means.loc[pick.to_numpy(), [*TUNED_BY, "lr"]].reset_index(drop=True)


def tuned_points(points: pd.DataFrame, tuned: pd.DataFrame) -> pd.DataFrame:
    """The rows of `points` (any final metric) at each budget's tuned LR."""
    return points.merge(tuned[[*TUNED_BY, "lr"]], on=[*TUNED_BY, "lr"])


def at_grid_edge(tuned: pd.DataFrame, grid: list[float]) -> pd.DataFrame:
    """The tuned rows whose LR is the smallest or largest of the grid: the best LR may lie outside it."""
    if len(grid) < 2:
        return tuned
    return tuned[tuned["lr"].isin([min(grid), max(grid)])]


def tuned_lowest_interval(choose: pd.DataFrame, target: pd.DataFrame, choose_higher_is_better: bool,
                          target_higher_is_better: bool, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """95% interval of the lowest point of `target` at the tuned LR, the LR chosen again on `choose`
    (the validation metric) inside every resample, so the winner's luck is in the interval (STATISTICS §6).

    Both tables hold one schedule and task, every LR; one draw of seeds serves every LR and both metrics."""
    lrs = sorted(choose["lr"].unique())
    both = pd.concat([choose, target])
    values = np.stack([np.stack([replicates(frame[frame["lr"] == lr], like=both).values for lr in lrs])
                       for frame in (choose, target)])                      # (2, L, P, S, B)
    means = resampled_means(values, n_boot, np.random.default_rng(seed))     # (n_boot, 2, L, B)
    chooser = means[:, 0] * (-1 if choose_higher_is_better else 1)
    best = np.nanargmin(np.where(np.isfinite(chooser), chooser, np.inf), axis=1)   # (n_boot, B)
    at_best = np.take_along_axis(means[:, 1], best[:, None, :], axis=1)[:, 0]      # (n_boot, B)
    tokens = np.sort(both["tokens"].astype(float).unique())
    return lowest_interval_of(tokens, at_best * (-1 if target_higher_is_better else 1))


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
    return LRTrend(slope, trend_name(slope, constant_below, quickly_above))


def trend_name(slope: float, constant_below: float = 0.1, quickly_above: float = 0.5) -> str:
    """The papers' words for a slope of log(lr*) on log(tokens) (see `lr_trend`)."""
    if not np.isfinite(slope):
        return "undetermined"
    if abs(slope) < constant_below:
        return "constant"
    if slope > 0:
        return "increasing"
    return "quickly decreasing" if -slope >= quickly_above else "slowly decreasing"


def tuned_log_lr_units(choose: pd.DataFrame, higher_is_better: bool) -> np.ndarray:
    """Each replicate's own tuned LR at each budget, as log10(LR): (U, B), NaN where it has no value.

    `choose` holds one schedule and task, every LR (the validation metric). Between grid
    points the LR is placed at the vertex of the parabola in log LR through the best LR and
    its neighbours (STATISTICS §6: interpolate only where the optimum is bracketed); at an
    end of the grid it is that end."""
    lrs = np.sort(choose["lr"].astype(float).unique())
    values = np.stack([replicates(choose[choose["lr"] == lr], like=choose).values for lr in lrs])  # (L, P, S, B)
    per_unit = unit_values(values) * (-1 if higher_is_better else 1)                                # (L, U, B)
    return lowest_vertex(np.log10(lrs), np.moveaxis(per_unit, 0, -1))


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


CHECKPOINT_KEY = ["schedule", "decayed", "tokens", "checkpoint"]


def matched_loss_by_seed(trajectories: pd.DataFrame) -> pd.DataFrame:
    """Large vs small LR at the same task loss, per checkpoint, task and seed (so it can be tested).

    Per checkpoint and task, the smallest and the largest LR that learn (their seed-mean task
    bpb improves on step 0) are compared. tau is the largest of the best task bpbs (`id_bpb`)
    of their runs, so every run reaches it; each run's pre-training-text bpb (`ood_bpb`) where
    it first does, interpolated linearly between the evaluations around it (`ood_at_id_loss`).
    Diverged runs are left out. Rows: the checkpoint, task, pretrain_seed, seed, small_lr,
    large_lr, tau_id_bpb, ood_small, ood_large and difference (large minus small, bpb)."""
    columns = [*CHECKPOINT_KEY, "pretrain_seed", "task", "seed", "small_lr", "large_lr", "tau_id_bpb", "ood_small",
               "ood_large", "difference"]
    runs = trajectories[~trajectories["diverged"].astype(bool)].dropna(subset=["id_bpb", "ood_bpb"])
    pair = ["checkpoint", "task"]
    mean = runs.groupby([*pair, "lr", "step"])["id_bpb"].mean().reset_index()
    start = mean[mean["step"] == 0].set_index([*pair, "lr"])["id_bpb"]
    best = mean[mean["step"] > 0].groupby([*pair, "lr"])["id_bpb"].min()
    learning = (best < start.reindex(best.index)).loc[lambda learns: learns].reset_index()[[*pair, "lr"]]
    ends = learning.groupby(pair)["lr"].agg(small_lr="min", large_lr="max", count="count").reset_index()
    ends = ends[ends["count"] >= 2]
    if ends.empty:
        return pd.DataFrame(columns=columns)
    run_keys = [*CHECKPOINT_KEY, "pretrain_seed", "task", "lr", "seed"]
    compared = runs.merge(ends[[*pair, "small_lr", "large_lr"]], on=pair)
    compared = compared[(compared["lr"] == compared["small_lr"]) | (compared["lr"] == compared["large_lr"])]
    id_wide = compared.pivot_table(index=run_keys, columns="step", values="id_bpb")
    ood_wide = compared.pivot_table(index=run_keys, columns="step", values="ood_bpb").reindex_like(id_wide)
    keys = id_wide.index.to_frame(index=False)
    best_after_start = id_wide.loc[:, id_wide.columns > 0].min(axis=1).to_numpy()
    keys["tau_id_bpb"] = keys.assign(best=best_after_start).groupby(pair)["best"].transform("max")
    keys["ood"] = _first_crossing(id_wide.to_numpy(), ood_wide.to_numpy(), keys["tau_id_bpb"].to_numpy())
    keys = keys.merge(ends[[*pair, "small_lr", "large_lr"]], on=pair)
    side = np.where(keys["lr"] == keys["small_lr"], "ood_small", "ood_large")
    wide = keys.assign(side=side).pivot_table(index=[*CHECKPOINT_KEY, "pretrain_seed", "task", "seed", "small_lr",
                                                     "large_lr", "tau_id_bpb"], columns="side", values="ood")
    wide = wide.reindex(columns=["ood_small", "ood_large"]).reset_index()
    wide.columns.name = None
    return wide.assign(difference=wide["ood_large"] - wide["ood_small"])[columns]


def _first_crossing(id_values: np.ndarray, ood_values: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """`ood_at_id_loss` for every row at once: rows are runs, columns evaluations by step."""
    below = id_values <= tau[:, None]
    first = np.argmax(below, axis=1)
    rows = np.arange(len(tau))
    before = np.maximum(first - 1, 0)
    id_before, id_at = id_values[rows, before], id_values[rows, first]
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(first > 0, (id_before - tau) / (id_before - id_at), 0.0)
    ood = ood_values[rows, before] + weight * (ood_values[rows, first] - ood_values[rows, before])
    return np.where(below.any(axis=1), ood, np.nan)
