"""The papers' controlled findings, checked on one run's results.

Each check reads the tidy results (never typed-in numbers) and returns a `Claim`:
whether it holds in this run, one plain paragraph with the numbers behind the
verdict, and the table it was read from. A claim that does not hold says so with
its numbers; one the run has no data for says what is missing. `reproduction.py`
writes docs/REPRODUCTION.md from these.

The thresholds are the ones the reproduction asks for:
1. progressive sensitivity: Spearman rho of sensitivity with tokens >= 0.9 for every
   gamma (and schedule);
2. U under perturbation: the perturbed bpb has a bootstrap-supported interior minimum
   (`curves.find_inflection`) for >= 2 gammas, and it moves to fewer tokens as gamma
   grows;
3. U after fine-tuning at a fixed LR: pre-training-text bpb after fine-tuning has an
   interior minimum, and the last budget is worse than it by > 2 standard errors (over
   seeds), for at least one task and LR. The lowest of several noisy means is biased
   low, so a flat curve passes that test by chance quite often; a curve must also be
   a U in the bootstrap test of `curves.find_inflection` (>= 95% of seed resamples);
4. schedules: at equal tokens, decayed checkpoints forget more than constant-LR ones
   in >= 80% of (tokens, task, LR) comparisons;
5. tuned LR: per task, T_ft and T_pre at the ID-optimal LR, each with its interval or
   "none within the budgets", and the trend of the optimal LR.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from overtrain.analysis import curves, tables
from overtrain.analysis.recommend import id_metric_for
from overtrain.probes import metrics

RHO_NEEDED = 0.9
GAMMAS_WITH_U_NEEDED = 2
RISE_IN_STANDARD_ERRORS = 2.0
DECAYED_SHARE_NEEDED = 0.8
SHARPNESS_SIDE_BY_SIDE = ("hessian_top_eig", "kl_sharpness")


@dataclass
class Claim:
    number: int
    title: str
    holds: bool | None  # None: this run has no data to test it
    finding: str
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return {True: "reproduced", False: "not reproduced", None: "not tested"}[self.holds]


def check_claims(results: pd.DataFrame, n_boot: int = curves.N_BOOT, seed: int = 0) -> list[Claim]:
    results = tables.plain(results)
    return [progressive_sensitivity(results, n_boot, seed), perturbation_u(results, n_boot, seed),
            finetuning_u(results, n_boot, seed), decay_forgets_more(results, n_boot, seed), tuned_lr_inflections(results, n_boot, seed)]


# -- 1 ------------------------------------------------------------------------------------

def progressive_sensitivity(results: pd.DataFrame, n_boot: int, seed: int) -> Claim:
    title = "Progressive sensitivity: the same noise hurts more the longer a model was pre-trained"
    delta = tables.probe_points(results, "delta_bpb")
    if delta.empty:
        return Claim(1, title, None, "No perturbation probe in this run.")
    trends = curves.rank_trends(delta, ["schedule", "gamma"], n_boot, seed)
    weakest = trends.loc[trends["rho"].idxmin()]
    holds = bool((trends["rho"] >= RHO_NEEDED).all())
    per_schedule = "; ".join(f"{schedule}: {'every' if (rows['rho'] >= RHO_NEEDED).all() else 'not every'} gamma "
                             f"reaches {RHO_NEEDED}" for schedule, rows in trends.groupby("schedule"))
    finding = (f"Spearman rho of the bpb increase under noise with tokens, per schedule and gamma: "
               f"{_list_trends(trends)}. Lowest: {weakest['rho']:.2f} ({weakest['schedule']}, gamma {weakest['gamma']:g}); "
               f"the claim needs >= {RHO_NEEDED} everywhere. By schedule, {per_schedule}.")
    return Claim(1, title, holds, finding, [("sensitivity_rank_trend", trends)])


def _list_trends(trends: pd.DataFrame) -> str:
    return "; ".join(f"{r.schedule} gamma {r.gamma:g}: {r.rho:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]"
                     for r in trends.itertuples())


# -- 2 ------------------------------------------------------------------------------------

def perturbation_u(results: pd.DataFrame, n_boot: int, seed: int) -> Claim:
    title = "U-shape under perturbation: the perturbed model is best at an interior budget, earlier for larger noise"
    perturbed = tables.probe_points(results, "perturbed_bpb")
    if perturbed.empty:
        return Claim(2, title, None, "No perturbation probe in this run.")
    found = curves.inflections(perturbed, ["schedule", "gamma"], n_boot=n_boot, seed=seed)
    verdicts = []
    for schedule, rows in found.groupby("schedule"):
        minima = rows[rows["found"]].sort_values("gamma")
        moves_earlier = len(minima) >= GAMMAS_WITH_U_NEEDED and bool(
            (np.diff(minima["tokens"]) <= 0).all() and minima["tokens"].iloc[-1] < minima["tokens"].iloc[0])
        verdicts.append((schedule, moves_earlier, _describe_minima(rows)))
    holds = any(ok for _, ok, _ in verdicts)
    finding = " ".join(f"{schedule}: {text} ({'holds' if ok else 'does not hold'})." for schedule, ok, text in verdicts)
    return Claim(2, title, holds, finding + f" The claim needs, in one schedule, >= {GAMMAS_WITH_U_NEEDED} gammas "
                 "with a minimum that moves to fewer tokens as gamma grows.", [("inflection_perturbed_bpb", found)])


def _describe_minima(rows: pd.DataFrame) -> str:
    parts = []
    for row in rows.sort_values("gamma").itertuples():
        if row.found:
            parts.append(f"gamma {row.gamma:g}: minimum at {row.tokens / 1e6:.1f}M tokens "
                         f"[{row.ci_low / 1e6:.1f}M, {row.ci_high / 1e6:.1f}M]")
        else:
            parts.append(f"gamma {row.gamma:g}: none ({row.note.split(': ', 1)[-1]})")
    return "; ".join(parts)


# -- 3 ------------------------------------------------------------------------------------

def finetuning_u(results: pd.DataFrame, n_boot: int = curves.N_BOOT, seed: int = 0) -> Claim:
    title = "U-shape after fine-tuning at a fixed LR: past some budget, pre-training longer leaves a worse model after fine-tuning"
    ood = tables.final_points(results, "ood_bpb")
    if ood.empty:
        return Claim(3, title, None, "No fine-tuning in this run.")
    rows = []
    for (schedule, task, lr), curve in ood.groupby(["schedule", "task", "lr"]):
        support = curves.find_inflection(curve, n_boot=n_boot, seed=seed).support
        rows.append({"schedule": schedule, "task": task, "lr": lr, **_rise_after_minimum(curve), "u_support": support})
    table = pd.DataFrame(rows)
    table["significant"] = (table["interior_minimum"] & table["rise_in_se"].gt(RISE_IN_STANDARD_ERRORS)
                            & table["u_support"].ge(curves.LEVEL))
    significant = table[table["significant"]]
    if significant.empty:
        interior = table[table["interior_minimum"]]
        finding = (f"No (schedule, task, LR) curve of {len(table)} has an interior minimum that the last budget exceeds "
                   f"by more than {RISE_IN_STANDARD_ERRORS:g} standard errors with a bootstrap-supported U. "
                   + (f"{len(interior)} have an interior minimum; the largest rise after it is "
                      f"{interior['rise_bpb'].max():+.3f} bpb ({interior['rise_in_se'].max():.1f} standard errors; "
                      f"U in at most {interior['u_support'].max():.0%} of resamples)."
                      if len(interior) else "Every curve is lowest at its first or last budget."))
        return Claim(3, title, False, finding, [("finetuning_u", table)])
    best = significant.loc[significant["rise_in_se"].idxmax()]
    finding = (f"{len(significant)} of {len(table)} (schedule, task, LR) curves have an interior minimum that the last "
               f"budget exceeds by more than {RISE_IN_STANDARD_ERRORS:g} standard errors, with a U in >= "
               f"{curves.LEVEL:.0%} of bootstrap resamples: "
               + "; ".join(f"{r.task} at LR {r.lr:g} ({r.schedule}): lowest {r.minimum_bpb:.3f} bpb at "
                           f"{r.minimum_tokens / 1e6:.1f}M tokens, {r.rise_bpb:+.3f} bpb by {r.last_tokens / 1e6:.1f}M "
                           f"({r.rise_in_se:.1f} SE)" for r in significant.itertuples())
               + f". Clearest: {best['task']} at LR {best['lr']:g} ({best['schedule']}).")
    return Claim(3, title, True, finding, [("finetuning_u", table)])


def _rise_after_minimum(curve: pd.DataFrame) -> dict:
    """The lowest per-budget mean, and how far the last budget's mean rises above it, in standard errors."""
    finite = curve[np.isfinite(curve["value"].astype(float))]
    stats = finite.groupby("tokens")["value"].agg(["mean", "std", "count"]).sort_index()
    standard_error = (stats["std"] / np.sqrt(stats["count"])).fillna(0.0).to_numpy()
    means, tokens = stats["mean"].to_numpy(), stats.index.to_numpy()
    lowest = int(np.argmin(means))
    rise = means[-1] - means[lowest]
    return {"minimum_tokens": tokens[lowest], "minimum_bpb": means[lowest], "interior_minimum": 0 < lowest < len(means) - 1,
            "last_tokens": tokens[-1], "rise_bpb": rise,
            "rise_in_se": rise / max(np.hypot(standard_error[-1], standard_error[lowest]), 1e-12)}


# -- 4 ------------------------------------------------------------------------------------

def decay_forgets_more(results: pd.DataFrame, n_boot: int, seed: int) -> Claim:
    title = "Schedules: at equal tokens, checkpoints that ended in a learning-rate decay forget more when fine-tuned"
    forgetting = tables.forgetting_points(results)
    if forgetting.empty or forgetting["decayed"].nunique() < 2:
        return Claim(4, title, None, "Needs decayed and constant-LR checkpoints at the same budgets, fine-tuned.")
    pairs = _decayed_vs_constant(forgetting)
    if pairs.empty:
        return Claim(4, title, None, "No budget has both a decayed and a constant-LR checkpoint fine-tuned.")
    share = float((pairs["decayed_mean"] > pairs["constant_mean"]).mean())
    low, high = _bootstrap_share(pairs, n_boot, seed)
    sharpness = _sharpness_side_by_side(results)
    finding = (f"The decayed checkpoint forgets more in {share:.0%} of {len(pairs)} (tokens, task, LR) comparisons "
               f"(95% bootstrap interval over fine-tuning seeds {low:.0%}-{high:.0%}; the claim needs >= "
               f"{DECAYED_SHARE_NEEDED:.0%}). Median extra forgetting of the decayed checkpoint: "
               f"{(pairs['decayed_mean'] - pairs['constant_mean']).median():+.3f} bpb." + _describe_sharpness(sharpness))
    claim_tables = [("decayed_vs_constant_forgetting", pairs.drop(columns=["decayed_seeds", "constant_seeds"]))]
    if not sharpness.empty:
        claim_tables.append(("decayed_vs_constant_sharpness", sharpness))
    return Claim(4, title, share >= DECAYED_SHARE_NEEDED, finding, claim_tables)


def _decayed_vs_constant(forgetting: pd.DataFrame) -> pd.DataFrame:
    """One row per (tokens, task, LR) with both kinds: each side's seeds and mean forgetting."""
    rows = []
    for (tokens, task, lr), group in forgetting.groupby(["tokens", "task", "lr"]):
        decayed = group.loc[group["decayed"].astype(bool), "forgetting_bpb"].dropna().to_numpy()
        constant = group.loc[~group["decayed"].astype(bool), "forgetting_bpb"].dropna().to_numpy()
        if len(decayed) and len(constant):
            rows.append({"tokens": tokens, "task": task, "lr": lr, "decayed_mean": decayed.mean(),
                         "constant_mean": constant.mean(), "decayed_seeds": decayed, "constant_seeds": constant})
    return pd.DataFrame(rows)


def _bootstrap_share(pairs: pd.DataFrame, n_boot: int, seed: int) -> tuple[float, float]:
    """95% interval of the share of comparisons the decayed side loses, seeds redrawn on both sides."""
    rng = np.random.default_rng(seed)

    def redrawn_means(seeds: np.ndarray) -> np.ndarray:
        return seeds[rng.integers(0, len(seeds), size=(n_boot, len(seeds)))].mean(axis=1)

    wins = np.column_stack([redrawn_means(p.decayed_seeds) > redrawn_means(p.constant_seeds) for p in pairs.itertuples()])
    low, high = np.percentile(wins.mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def _sharpness_side_by_side(results: pd.DataFrame) -> pd.DataFrame:
    """Per budget, each sharpness metric's mean for the decayed and the constant-LR checkpoint."""
    columns = {}
    for metric in tables.probe_metrics_present(results, list(SHARPNESS_SIDE_BY_SIDE)):
        means = tables.probe_points(results, metric).groupby(["tokens", "decayed"])["value"].mean().unstack("decayed")
        if {0, 1} <= set(means.columns.astype(int)):
            means.columns = means.columns.astype(int)
            columns[f"{metric} constant"], columns[f"{metric} decayed"] = means[0], means[1]
    return pd.DataFrame(columns).reset_index() if columns else pd.DataFrame()


def _describe_sharpness(table: pd.DataFrame) -> str:
    if table.empty:
        return " Sharpness was not measured."
    parts = []
    for metric in SHARPNESS_SIDE_BY_SIDE:
        if f"{metric} decayed" in table:
            sharper = int((table[f"{metric} decayed"] > table[f"{metric} constant"]).sum())
            parts.append(f"{metrics.label(metric)} is higher for the decayed checkpoint at {sharper} of {len(table)} budgets")
    return " Sharpness side by side: " + "; ".join(parts) + "."


# -- 5 ------------------------------------------------------------------------------------

def tuned_lr_inflections(results: pd.DataFrame, n_boot: int, seed: int) -> Claim:
    title = "Tuned LR: even at each checkpoint's best LR, task (T_ft) or pre-training (T_pre) performance degrades past some budget"
    final = tables.finetune_final(results)
    if final.empty:
        return Claim(5, title, None, "No fine-tuning in this run.")
    rows, sentences, tuned_lrs = [], [], []
    for task in sorted(final["task"].dropna().unique()):
        id_metric, higher_is_better = id_metric_for(final[final["task"] == task])
        task_metric = tables.final_points(results, id_metric).query("task == @task")
        ood = tables.final_points(results, "ood_bpb").query("task == @task")
        tuned = curves.tuned_lr(task_metric, higher_is_better)
        tuned_lrs += tuned["lr"].tolist()
        t_ft = curves.inflections(curves.tuned_points(task_metric, tuned), ["schedule"], higher_is_better, n_boot, seed)
        t_pre = curves.inflections(curves.tuned_points(ood, tuned), ["schedule"], n_boot=n_boot, seed=seed)
        for schedule, lrs in tuned.groupby("schedule"):
            trend = curves.lr_trend(lrs)
            ft, pre = _row(t_ft, schedule), _row(t_pre, schedule)
            rows.append({"task": task, "schedule": schedule, "id_metric": id_metric, "T_ft": ft["tokens"],
                         "T_ft_ci_low": ft["ci_low"], "T_ft_ci_high": ft["ci_high"], "T_pre": pre["tokens"],
                         "T_pre_ci_low": pre["ci_low"], "T_pre_ci_high": pre["ci_high"],
                         "lr_trend": trend.trend, "lr_slope": trend.slope})
            sentences.append(f"{task} ({schedule}, ID = {id_metric}): T_ft {ft['note']}; T_pre {pre['note']}; "
                             f"optimal LR {trend.trend} (slope {trend.slope:+.2f}, LR* {_lr_path(lrs)})")
    table = pd.DataFrame(rows)
    holds = bool(table[["T_ft", "T_pre"]].notna().any(axis=None))
    grid_note = _grid_edge_warning(tuned_lrs, sorted(final["lr"].dropna().unique()))
    return Claim(5, title, holds, ". ".join(sentences) + ". The claim holds if any task shows T_ft or T_pre "
                 "within the budgets." + grid_note, [("tuned_lr_inflections", table)])


def _grid_edge_warning(tuned_lrs: list[float], grid: list[float]) -> str:
    """A tuned LR pinned to the end of the grid is a bound, not an optimum: say so."""
    if len(grid) < 2 or not tuned_lrs or not set(tuned_lrs) <= {grid[0], grid[-1]}:
        return ""
    return (f" Every tuned LR sits at an end of the grid ({grid[0]:g}-{grid[-1]:g}): the best LR may lie outside it, "
            "so the LR trend is bounded by the grid rather than measured.")


def _row(found: pd.DataFrame, schedule: str) -> pd.Series:
    return found.set_index("schedule").loc[schedule]


def _lr_path(lrs: pd.DataFrame) -> str:
    return " -> ".join(f"{lr:g}" for lr in lrs.sort_values("tokens")["lr"])
