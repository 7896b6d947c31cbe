"""The papers' findings about the fine-tuning LR, checked on one run: T_ft and T_pre at the tuned
LR, how the tuned LR moves with the budget, and large vs small LR at equal task loss.

The tuned setting is chosen on validation and reported elsewhere (STATISTICS §6):

- the step: each fine-tuning run stops at its evaluation (every `eval_every` steps and the
  last) with the best validation task metric (`tables.early_stopped`);
- the LR: per budget of each schedule and task, the LR whose stopped runs have the best mean
  validation metric (`curves.tuned_lr`), chosen again inside every bootstrap resample
  (`curves.tuned_lowest_interval`);
- reported on the test part of the task (`id_test_*`, T_ft) and on pre-training text
  (`ood_bpb` at the same stopped step, T_pre).

A tuned LR at an end of the grid is a bound, not an optimum: that budget is not testable and
is left out of the curve; a curve left with fewer than 4 budgets is not testable.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from overtrain.analysis import curves, significance, tables
from overtrain.analysis.page import sig
from overtrain.analysis.recommend import id_metric_for, reporting_metric
from overtrain.analysis.significance import ONE_SIDED
from overtrain.analysis.verdicts import (DOES_NOT_HOLD, HOLDS, Claim, family, not_testable, passing, reasons,
                                         u_row, u_verdict)

T_FT_TITLE = "T_ft at the tuned LR: even at each checkpoint's best LR, task performance after fine-tuning degrades past some budget"
T_PRE_TITLE = ("T_pre at the tuned LR: even at each checkpoint's best LR, pre-training-text performance after "
               "fine-tuning degrades past some budget")
LR_TREND_TITLE = "Optimal-LR trend: the task's best fine-tuning LR falls as pre-training grows"
MATCHED_TITLE = "Matched loss: at the same task loss, a larger fine-tuning LR has forgotten more"


def tuned_lr_claims(results: pd.DataFrame, n_boot: int, seed: int, final: pd.DataFrame) -> list[Claim]:
    """t_ft_tuned, t_pre_tuned and lr_trend, read from one choice of the tuned (LR, step) per budget."""
    if final.empty:
        why = "no fine-tuning in this run"
        return [not_testable("t_ft_tuned", T_FT_TITLE, "rise (task metric)", why),
                not_testable("t_pre_tuned", T_PRE_TITLE, "rise (bpb)", why),
                not_testable("lr_trend", LR_TREND_TITLE, "slope", why)]
    rows = {"T_ft": [], "T_pre": []}
    trend_rows, paths, chosen = [], [], []
    for task in sorted(final["task"].dropna().unique()):
        task_final = final[final["task"] == task]
        id_metric, higher_is_better = id_metric_for(task_final)
        stopped = tables.early_stopped(results[results["task"] == task], id_metric, higher_is_better, task_final)
        report_metric = reporting_metric(id_metric, set(task_final["metric"]))  # the test part, where measured
        choose = tables.final_points(results, id_metric, stopped)
        shown = {"T_ft": (tables.final_points(results, report_metric, stopped), report_metric, higher_is_better),
                 "T_pre": (tables.final_points(results, "ood_bpb", stopped), "ood_bpb", False)}
        grid = sorted(task_final["lr"].dropna().unique())
        for schedule, lrs in curves.tuned_lr(choose, higher_is_better).groupby("schedule"):
            edge = set(curves.at_grid_edge(lrs, grid)["tokens"])
            chosen.append(lrs.assign(at_grid_edge=lrs["tokens"].isin(edge))[["task", "schedule", "tokens", "lr",
                                                                              "at_grid_edge"]])
            paths.append(f"{task} ({schedule}): LR* " + " -> ".join(f"{lr:g}" for lr in lrs.sort_values("tokens")["lr"]))
            inside = choose[(choose["schedule"] == schedule) & ~choose["tokens"].isin(edge)]
            key = {"task": task, "schedule": schedule, "edge_budgets": len(edge)}
            for name, (points, metric, better) in shown.items():
                curve = points[(points["schedule"] == schedule) & ~points["tokens"].isin(edge)]
                row = {**key, "metric": metric, **u_row(curves.tuned_points(curve, lrs), better)}
                if n_boot and not row["untestable"]:  # the lowest point's interval, the LR chosen again per resample
                    row["lowest_ci_low"], row["lowest_ci_high"] = curves.tuned_lowest_interval(
                        inside, curve, higher_is_better, better, n_boot, seed)
                rows[name].append(_edge_reason(row, edge, len(lrs)))
            trend_rows.append({**key, **_lr_trend_row(inside, higher_is_better, edge, len(lrs), len(grid))})
    tuned = pd.concat(chosen, ignore_index=True)
    describe = (f" The tuned LR is inside the grid at {int((~tuned['at_grid_edge']).sum())} of {len(tuned)} (task, "
                f"schedule, budget) points; LR grid {', '.join(f'{lr:g}' for lr in sorted(final['lr'].dropna().unique()))};"
                " tuned on the validation part (the step too): " + "; ".join(paths) + ".")
    found = [u_verdict("t_ft_tuned", T_FT_TITLE, family(rows["T_ft"]), _key, "t_ft_tuned", "rise from the lowest "
                       "budget to the last (task metric, worse is positive)"),
             u_verdict("t_pre_tuned", T_PRE_TITLE, family(rows["T_pre"]), _key, "t_pre_tuned"),
             lr_trend(family(trend_rows))]
    for claim in found:
        claim.finding += describe
    found[-1].tables.append(("tuned_lr", tuned))  # shown once, with the claim about it
    return found


def _key(row) -> str:
    """A curve's name in the text, from a table row (a Series or a named tuple)."""
    return f"{row.task} ({row.schedule})"


def _edge_reason(row: dict, edge: set, budgets: int) -> dict:
    """A curve that lost budgets to the grid's edge says so when it is left too short to test."""
    if edge and row["untestable"].endswith(f"(a test needs {significance.MIN_BUDGETS})"):
        row["untestable"] = (f"tuned LR at an end of the grid at {len(edge)} of {budgets} budgets (the best LR may lie "
                             f"outside it), {budgets - len(edge)} left (a test needs {significance.MIN_BUDGETS})")
    return row


# -- the optimal-LR trend -----------------------------------------------------------------

def _lr_trend_row(choose: pd.DataFrame, higher_is_better: bool, edge: set, budgets: int, grid: int) -> dict:
    """The slope of log10(LR*) per 10x tokens, tested < 0 on the replicates' own tuned LRs."""
    if grid < 3:
        return {"untestable": f"{grid} LRs (a tuned LR inside the grid needs 3)", "p_value": np.nan}
    units = curves.tuned_log_lr_units(choose, higher_is_better) if len(choose) else np.empty((0, 0))
    tokens = np.sort(choose["tokens"].astype(float).unique())
    units = units[np.isfinite(units).all(axis=1)]
    why = significance.untestable(units)
    if why:
        row = _edge_reason({"untestable": why}, edge, budgets)
        return {"budgets": len(tokens), "replicates": len(units), **row, "p_value": np.nan}
    falls = significance.trend(-units, tokens)  # > 0 when the LR falls with tokens
    slope = -falls.value
    return {"budgets": len(tokens), "replicates": len(units), "untestable": "", "slope": slope, "slope_low": -falls.high,
            "slope_high": -falls.low, "trend": curves.trend_name(slope), "p_value": falls.p_value}


def lr_trend(table: pd.DataFrame) -> Claim:
    label = "slope of log10(tuned LR) per 10x tokens"
    tested = table[table["untestable"] == ""]
    if tested.empty:
        return not_testable("lr_trend", LR_TREND_TITLE, label, reasons(table), table, "lr_trend")
    best = tested.loc[tested["p_value"].idxmin()]
    verdict = HOLDS if table["passes"].any() else DOES_NOT_HOLD
    untested = reasons(table)
    reason = f"{passing(table, 'fall')}; strongest: {_key(best)}, {best['trend']} (slope {sig(best['slope'], plus=True)})"
    finding = ("Slope of each replicate's tuned log10 LR (between grid points where bracketed) per 10x tokens, over "
               "the budgets whose tuned LR is inside the grid (Springer et al.: constant, slowly decreasing (down to "
               "-0.5) or quickly decreasing): " + "; ".join(
                   f"{_key(r)}: {sig(r.slope, plus=True)} [{sig(r.slope_low)}, {sig(r.slope_high)}], {r.trend}, "
                   f"p = {sig(r.p_value, 2)}" for r in tested.itertuples()) + "."
               + (f" Not testable: {untested}." if untested else ""))
    return Claim("lr_trend", LR_TREND_TITLE, verdict, reason, label, best["slope"], best["slope_low"],
                 best["slope_high"], finding, [("lr_trend", table)])


# -- matched loss ---------------------------------------------------------------------------

def matched_loss(results: pd.DataFrame) -> Claim:
    """Large minus small LR pre-training-text bpb at equal task bpb: mean over checkpoints and tasks,
    per replicate, tested > 0. The LR paper says only that the two end in different models; the
    direction is named in advance from Springer et al. (a larger LR degrades more), one-sided as
    every other claim."""
    label = "largest minus smallest learning LR, pre-training-text bpb at equal task bpb, mean over checkpoints and tasks"
    found = curves.matched_loss_by_seed(tables.trajectories(results))
    usable = found.dropna(subset=["difference"])
    if usable.empty:
        why = ("needs fine-tuning evaluations along the runs at two LRs or more that learn the task"
               if found.empty else "no run pair reaches the shared task loss")
        return not_testable("matched_loss", MATCHED_TITLE, label, why)
    unit = "pretrain_seed" if usable["pretrain_seed"].nunique() >= 2 else "seed"
    per_replicate = usable.groupby(unit)["difference"].mean()
    if len(per_replicate) < 2:
        return not_testable("matched_loss", MATCHED_TITLE, label, "one seed: no spread to test against", found,
                            "matched_loss")
    estimate = significance.across_replicates(per_replicate.to_numpy())
    reason = (f"at equal task loss the largest learning LR has forgotten {sig(estimate.value, plus=True)} bpb vs the "
              f"smallest, 95% [{sig(estimate.low)}, {sig(estimate.high)}], p = {sig(estimate.p_value, 2)}")
    by_task = usable.groupby(["task", "schedule"])["difference"].mean()
    finding = (f"At the task bpb every compared run reaches (per checkpoint and task), {reason} "
               f"({len(per_replicate)} {'pre-training seeds' if unit == 'pretrain_seed' else 'seeds'} as replicates, "
               f"{len(usable)} pairs of runs). By task and schedule: " + "; ".join(
                   f"{task} ({schedule}): {sig(d, plus=True)}" for (task, schedule), d in by_task.items()) + "."
               + (f" {len(found) - len(usable)} pairs left out: a run did not reach the shared task loss."
                  if len(found) > len(usable) else ""))
    return Claim("matched_loss", MATCHED_TITLE, HOLDS if estimate.p_value <= ONE_SIDED else DOES_NOT_HOLD, reason,
                 label, estimate.value, estimate.low, estimate.high, finding, [("matched_loss", found)])
