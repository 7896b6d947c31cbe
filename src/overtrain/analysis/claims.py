"""The papers' controlled findings, checked on one run's results.

Each check reads the tidy results (never typed-in numbers) and returns a `Claim` with
a verdict of three values (STATISTICS §2): **holds**, **does not hold**, or **not
testable** with the reason; the effect size with its 95% interval; one plain paragraph
with the numbers; and the tables it was read from. `reproduction.py` writes
docs/REPRODUCTION.md from these, `power.py` measures how often each verdict is wrong.

The tests are those of `significance.py` (one-sided at 2.5%: an effect's 95% interval on
the claimed side of zero), on replicates as `replicates.py` defines them. A claim read
from several curves holds when at least one curve passes after Holm's correction over
all its testable curves, the same rule for every claim:

1. progressive sensitivity: per schedule, the slope of the bpb increase under noise
   (mean over gammas) per 10x tokens is > 0;
2. U under perturbation: a U in the perturbed bpb (curves: schedule x gamma) and, in that
   schedule, the lowest budget moves to fewer tokens as gamma grows (a curve rising from
   its first budget counts as lowest at the first budget);
3. U after fine-tuning at a fixed LR: a U in pre-training-text bpb after fine-tuning
   (curves: schedule x task x LR);
4. schedules: at equal tokens, decayed checkpoints forget more than constant-LR ones
   (decayed minus constant forgetting, paired by budget, task, LR and seed, mean > 0);
5. tuned LR: at each budget's tuned LR (chosen on the validation part of the task), a U
   in the task metric on the test part (T_ft) or in pre-training-text bpb (T_pre);
   curves whose tuned LR sits at an edge of the LR grid are not testable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from overtrain.analysis import curves, significance, tables
from overtrain.analysis.page import short_tokens, sig
from overtrain.analysis.recommend import id_metric_for, reporting_metric
from overtrain.analysis.replicates import replicates
from overtrain.analysis.significance import ONE_SIDED
from overtrain.probes import metrics

HOLDS, DOES_NOT_HOLD, NOT_TESTABLE = "holds", "does not hold", "not testable"
SHARPNESS_SIDE_BY_SIDE = ("hessian_top_eig", "kl_sharpness")


@dataclass
class Claim:
    number: int
    title: str
    verdict: str                 # holds | does not hold | not testable
    reason: str                  # why not testable ("" otherwise)
    effect_label: str            # what `effect` measures, with its unit
    effect: float = np.nan       # of the curve with the strongest evidence
    effect_low: float = np.nan   # its 95% interval
    effect_high: float = np.nan
    finding: str = ""
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)

    @property
    def effect_text(self) -> str:
        if not np.isfinite(self.effect):
            return "n/a"
        interval = f" [{sig(self.effect_low)}, {sig(self.effect_high)}]" if np.isfinite(self.effect_low) else ""
        return f"{sig(self.effect)}{interval}"


def check_claims(results: pd.DataFrame, n_boot: int = curves.N_BOOT, seed: int = 0,
                 intervals: bool = True) -> list[Claim]:
    """Every claim on `results`. intervals=False skips the bootstrap of locations (verdicts unchanged)."""
    results = tables.plain(results)
    n_boot = n_boot if intervals else 0
    final = tables.finetune_final(results)  # read by three claims: made once
    return [progressive_sensitivity(results), perturbation_u(results, n_boot, seed),
            finetuning_u(results, n_boot, seed, final), decay_forgets_more(results, final),
            tuned_lr_inflections(results, n_boot, seed, final)]


# -- shared: a family of curves, Holm over it -------------------------------------------

def _not_testable(number: int, title: str, label: str, reason: str, found: pd.DataFrame | None = None,
                  name: str = "") -> Claim:
    claim_tables = [(name, found)] if found is not None and len(found) else []
    return Claim(number, title, NOT_TESTABLE, reason, label, finding=f"{reason[0].upper()}{reason[1:]}.", tables=claim_tables)


def _family(rows: list[dict]) -> pd.DataFrame:
    """Per-curve rows with `p_value` (NaN: untestable) -> with `p_holm` and `passes`."""
    table = pd.DataFrame(rows)
    table["p_holm"] = significance.holm(table["p_value"].to_numpy(dtype=float))
    table["passes"] = table["p_holm"] <= ONE_SIDED
    return table


def _reasons(table: pd.DataFrame) -> str:
    """The distinct reasons curves of a family are untestable, each once, with how many."""
    counts = table.loc[table["untestable"] != "", "untestable"].value_counts()
    return "; ".join(f"{reason} ({n} of {len(table)} curves)" for reason, n in counts.items())


def _u_row(points: pd.DataFrame, higher_is_better: bool = False, n_boot: int = 0, seed: int = 0) -> dict:
    """The U test of one curve, as a table row; with n_boot, the 95% interval of its lowest point."""
    curve = replicates(points)
    units = curve.units() * (-1 if higher_is_better else 1)
    why = significance.untestable(units, diverged=curve.diverged)
    row = {"budgets": len(curve.tokens), "replicates": len(units), "unit": curve.unit, "untestable": why}
    if why:
        return {**row, "p_value": np.nan}
    test = significance.u_shape(units)
    sign = -1 if higher_is_better else 1
    if n_boot:
        low, high = curves.lowest_interval(curves.badness(curve, higher_is_better), n_boot, seed)
        row |= {"lowest_ci_low": low, "lowest_ci_high": high}
    return {**row, "lowest_tokens": curve.tokens[test.lowest], "lowest_index": test.lowest,
            "rise": test.rise.value * sign, "rise_low": min(test.rise.low * sign, test.rise.high * sign),
            "rise_high": max(test.rise.low * sign, test.rise.high * sign), "p_value": test.p_value}


def _u_verdict(number: int, title: str, table: pd.DataFrame, describe, name: str) -> Claim:
    """Holds if any curve's U passes after Holm; the effect is the rise of the most convincing one."""
    label = "rise from the lowest budget to the last (bpb)"
    tested = table[table["untestable"] == ""]
    if tested.empty:
        return _not_testable(number, title, label, _reasons(table), table, name)
    best = tested.loc[tested["p_value"].idxmin()]
    verdict = HOLDS if table["passes"].any() else DOES_NOT_HOLD
    untested = _reasons(table)
    finding = (f"{int(table['passes'].sum())} of {len(tested)} testable curves show a U after Holm's correction "
               f"over {len(tested)}. " + describe(tested) + (f" Not testable: {untested}." if untested else ""))
    return Claim(number, title, verdict, "", label, best["rise"], best["rise_low"], best["rise_high"], finding,
                 [(name, table)])


def _describe_u(tested: pd.DataFrame, key) -> str:
    parts = []
    for row in tested.sort_values("p_value").itertuples():
        interval = (f" (95% {short_tokens(row.lowest_ci_low)}-{short_tokens(row.lowest_ci_high)})"
                    if np.isfinite(getattr(row, "lowest_ci_low", np.nan)) else "")
        where = (f"lowest at {short_tokens(row.lowest_tokens)} tokens{interval}, rise {sig(row.rise, plus=True)} "
                 f"[{sig(row.rise_low)}, {sig(row.rise_high)}] bpb to the last budget")
        parts.append(f"{key(row)}: {where}, p = {sig(row.p_value, 2)} (Holm {sig(row.p_holm, 2)})")
    return "; ".join(parts) + "."


# -- 1 ------------------------------------------------------------------------------------

def progressive_sensitivity(results: pd.DataFrame) -> Claim:
    title = "Progressive sensitivity: the same noise hurts more the longer a model was pre-trained"
    label = "slope of the bpb increase under noise per 10x tokens (bpb)"
    delta = tables.probe_points(results, "delta_bpb")
    if delta.empty:
        return _not_testable(1, title, label, "no perturbation probe in this run")
    rows = []
    for schedule, points in delta.groupby("schedule"):
        # One curve per schedule: the mean over gammas of each noise seed's increase.
        curve = replicates(points.groupby([*tables.CHECKPOINT_COLUMNS, "seed"], dropna=False)["value"].mean().reset_index())
        units = curve.units()
        why = significance.untestable(units, diverged=curve.diverged)
        row = {"schedule": schedule, "budgets": len(curve.tokens), "replicates": len(units), "unit": curve.unit,
               "untestable": why, "p_value": np.nan}
        if not why:
            slope = significance.trend(units, curve.tokens)
            row |= {"slope": slope.value, "slope_low": slope.low, "slope_high": slope.high, "p_value": slope.p_value}
        rows.append(row)
    table = _family(rows)
    tested = table[table["untestable"] == ""]
    if tested.empty:
        return _not_testable(1, title, label, _reasons(table), table, "sensitivity_trend")
    best = tested.loc[tested["p_value"].idxmin()]
    finding = ("Slope of the bpb increase under noise (mean over gammas) per 10x tokens, by schedule: " + "; ".join(
        f"{r.schedule}: {sig(r.slope, plus=True)} [{sig(r.slope_low)}, {sig(r.slope_high)}], p = {sig(r.p_value, 2)}"
        f" ({'holds' if r.passes else 'does not hold'})" for r in tested.itertuples()) + ".")
    verdict = HOLDS if table["passes"].any() else DOES_NOT_HOLD
    return Claim(1, title, verdict, "", label, best["slope"], best["slope_low"], best["slope_high"], finding,
                 [("sensitivity_trend", table)])


# -- 2 ------------------------------------------------------------------------------------

def perturbation_u(results: pd.DataFrame, n_boot: int, seed: int) -> Claim:
    title = "U-shape under perturbation: the perturbed model is best at an interior budget, earlier for larger noise"
    perturbed = tables.probe_points(results, "perturbed_bpb")
    if perturbed.empty:
        return _not_testable(2, title, "rise (bpb)", "no perturbation probe in this run")
    rows = [{"schedule": schedule, "gamma": gamma, **_u_row(points, n_boot=n_boot, seed=seed)}
            for (schedule, gamma), points in perturbed.groupby(["schedule", "gamma"])]
    table = _family(rows)
    moves = {schedule: _moves_earlier(group) for schedule, group in table.groupby("schedule")}
    table["moves_earlier"] = table["schedule"].map(moves)
    claim = _u_verdict(2, title, table, lambda t: _describe_u(t, lambda r: f"{r.schedule} gamma {r.gamma:g}"),
                       "perturbation_u")
    if claim.verdict == NOT_TESTABLE:
        return claim
    holds = any(group["passes"].any() and moves[schedule] for schedule, group in table.groupby("schedule"))
    claim.verdict = HOLDS if holds else DOES_NOT_HOLD
    claim.finding += " Lowest budget as gamma grows: " + "; ".join(
        f"{schedule}: " + " -> ".join(short_tokens(t) for t in group.sort_values("gamma")["lowest_tokens"])
        + (" (moves earlier)" if moves[schedule] else " (does not move earlier)")
        for schedule, group in table[table["untestable"] == ""].groupby("schedule")) + "."
    return claim


def _moves_earlier(group: pd.DataFrame) -> bool:
    """The lowest budget never moves later as gamma grows, and ends earlier than it starts."""
    lowest = group.sort_values("gamma")["lowest_index"].to_numpy(dtype=float) if "lowest_index" in group else []
    lowest = lowest[np.isfinite(lowest)] if len(lowest) else lowest
    return len(lowest) >= 2 and bool((np.diff(lowest) <= 0).all() and lowest[-1] < lowest[0])


# -- 3 ------------------------------------------------------------------------------------

def finetuning_u(results: pd.DataFrame, n_boot: int, seed: int, final: pd.DataFrame | None = None) -> Claim:
    title = ("U-shape after fine-tuning at a fixed LR: past some budget, pre-training longer leaves a worse model "
             "after fine-tuning")
    ood = tables.final_points(results, "ood_bpb", final)
    if ood.empty:
        return _not_testable(3, title, "rise (bpb)", "no fine-tuning in this run")
    rows = [{"schedule": schedule, "task": task, "lr": lr, **_u_row(points, n_boot=n_boot, seed=seed)}
            for (schedule, task, lr), points in ood.groupby(["schedule", "task", "lr"])]
    return _u_verdict(3, title, _family(rows),
                      lambda t: _describe_u(t, lambda r: f"{r.task} at LR {r.lr:g} ({r.schedule})"), "finetuning_u")


# -- 4 ------------------------------------------------------------------------------------

def decay_forgets_more(results: pd.DataFrame, final: pd.DataFrame | None = None) -> Claim:
    title = "Schedules: at equal tokens, checkpoints that ended in a learning-rate decay forget more when fine-tuned"
    label = "decayed minus constant-LR forgetting, mean over budgets, tasks and LRs (bpb)"
    forgetting = tables.forgetting_points(results, final)
    if forgetting.empty or forgetting["decayed"].nunique() < 2:
        return _not_testable(4, title, label, "needs decayed and constant-LR checkpoints at the same budgets, fine-tuned")
    pairs = _decayed_vs_constant(forgetting)
    usable = pairs.dropna(subset=["difference"])
    if usable.empty:
        return _not_testable(4, title, label, "no budget has both a decayed and a constant-LR checkpoint fine-tuned "
                             "without divergence")
    per_replicate = _per_replicate_mean(usable)
    if len(per_replicate) < 2:
        return _not_testable(4, title, label, "one seed: no spread to test against", pairs, "decayed_vs_constant")
    found = significance.across_replicates(per_replicate.to_numpy())
    verdict = HOLDS if found.p_value <= ONE_SIDED else DOES_NOT_HOLD
    dropped = len(pairs) - len(usable)
    by_lr = usable.groupby(["task", "lr"])["difference"].mean()
    finding = (f"Decayed minus constant-LR forgetting at equal tokens, task, LR and seed: {sig(found.value, plus=True)} "
               f"bpb [{sig(found.low)}, {sig(found.high)}] (p = {sig(found.p_value, 2)}, {len(per_replicate)} "
               f"{'pre-training seeds' if usable['pretrain_seed'].nunique() >= 2 else 'seeds'} as replicates, "
               f"{len(usable)} pairs). By task and LR: " + "; ".join(
                   f"{task} LR {lr:g}: {sig(d, plus=True)}" for (task, lr), d in by_lr.items()) + "."
               + (f" {dropped} pairs left out: a run diverged." if dropped else "")
               + _describe_sharpness(_sharpness_side_by_side(results)))
    claim_tables = [("decayed_vs_constant_forgetting", pairs)]
    sharpness = _sharpness_side_by_side(results)
    if not sharpness.empty:
        claim_tables.append(("decayed_vs_constant_sharpness", sharpness))
    return Claim(4, title, verdict, "", label, found.value, found.low, found.high, finding, claim_tables)


def _decayed_vs_constant(forgetting: pd.DataFrame) -> pd.DataFrame:
    """One row per (tokens, task, LR, pre-training seed, seed) with both kinds: each side's forgetting."""
    keys = ["tokens", "task", "lr", "pretrain_seed", "seed"]
    side = forgetting.assign(decayed=forgetting["decayed"].astype(bool))
    decayed = side[side["decayed"]].groupby(keys)["forgetting_bpb"].mean().rename("decayed")
    constant = side[~side["decayed"]].groupby(keys)["forgetting_bpb"].mean().rename("constant")
    pairs = pd.concat([decayed, constant], axis=1, join="inner").reset_index()
    return pairs.assign(difference=pairs["decayed"] - pairs["constant"])


def _per_replicate_mean(pairs: pd.DataFrame) -> pd.Series:
    """Each replicate's mean difference: pre-training seeds when there are several, else seeds."""
    unit = "pretrain_seed" if pairs["pretrain_seed"].nunique() >= 2 else "seed"
    return pairs.groupby(unit)["difference"].mean()


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

def tuned_lr_inflections(results: pd.DataFrame, n_boot: int, seed: int, final: pd.DataFrame | None = None) -> Claim:
    title = ("Tuned LR: even at each checkpoint's best LR, task (T_ft) or pre-training (T_pre) performance "
             "degrades past some budget")
    final = tables.finetune_final(results) if final is None else final
    if final.empty:
        return _not_testable(5, title, "rise (bpb)", "no fine-tuning in this run")
    grid = sorted(final["lr"].dropna().unique())
    rows, paths = [], []
    for task in sorted(final["task"].dropna().unique()):
        id_metric, higher_is_better = id_metric_for(final[final["task"] == task])
        choose = tables.final_points(results, id_metric, final).query("task == @task")
        report_metric = reporting_metric(id_metric, set(final["metric"]))  # the test part, where measured
        report = tables.final_points(results, report_metric, final).query("task == @task")
        ood = tables.final_points(results, "ood_bpb", final).query("task == @task")
        tuned = curves.tuned_lr(choose, higher_is_better)
        for schedule, lrs in tuned.groupby("schedule"):
            edge = curves.at_grid_edge(lrs, grid)
            paths.append(f"{task} ({schedule}): LR* " + " -> ".join(f"{lr:g}" for lr in lrs.sort_values("tokens")["lr"]))
            for name, metric, points, better in (("T_ft", report_metric, report, higher_is_better),
                                                 ("T_pre", "ood_bpb", ood, False)):
                at = curves.tuned_points(points[points["schedule"] == schedule], lrs)
                row = {"task": task, "schedule": schedule, "inflection": name, "metric": metric, **_u_row(at, better)}
                if n_boot and not row["untestable"]:  # the lowest point's interval, the LR chosen again per resample
                    row["lowest_ci_low"], row["lowest_ci_high"] = curves.tuned_lowest_interval(
                        choose[choose["schedule"] == schedule], points[points["schedule"] == schedule],
                        higher_is_better, better, n_boot, seed)
                if len(edge) and not row["untestable"]:
                    row |= {"untestable": f"tuned LR at the edge of the grid ({len(edge)} of {len(lrs)} budgets): "
                                          "the best LR may lie outside it", "p_value": np.nan}
                rows.append(row)
    table = _family(rows)
    claim = _u_verdict(5, title, table, lambda t: _describe_u(t, lambda r: f"{r.inflection} on {r.task} ({r.schedule})"),
                       "tuned_lr_inflections")
    claim.finding += f" LR grid {', '.join(f'{lr:g}' for lr in grid)}; tuned on the validation part: " + "; ".join(paths) + "."
    return claim
