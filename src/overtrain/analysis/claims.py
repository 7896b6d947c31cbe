"""The papers' controlled findings, checked on one run's results.

Each check reads the tidy results (never typed-in numbers) and returns a `Claim`
(`verdicts.py`): holds, does not hold, or not testable with the reason; the effect size
with its 95% interval; a paragraph with the numbers; the tables it was read from.
`reproduction.py` writes docs/REPRODUCTION.md and claims.json from these, `power.py`
measures how often each verdict is wrong. One claim per finding, by its short id:

- `sensitivity`: per schedule, the slope of the bpb increase under noise (mean over
  gammas) per 10x tokens is > 0;
- `perturbation_u`: a U in the perturbed bpb (curves: schedule x gamma) and, in that
  schedule, the lowest budget moves to fewer tokens as gamma grows (a curve rising from its
  first budget counts as lowest at the first budget);
- `finetune_u`: a U in pre-training-text bpb after fine-tuning at a fixed LR (curves:
  schedule x task x LR);
- `lr_moves_turn`: in a (schedule, task) with such a U, the lowest budget is at fewer tokens at
  the largest LR than at the smallest (a paired bootstrap of the shift);
- `t_ft_tuned`, `t_pre_tuned`, `lr_trend`, `matched_loss`: the fine-tuning LR (`tuned_claims.py`);
- `decay_forgets_more`: at equal tokens, decayed minus constant-LR forgetting (paired by
  budget, task, LR and seed) > 0; the text says whether decay moves the fixed-LR turn earlier;
- `decay_sharper`: at equal tokens, decayed minus constant-LR sharpness > 0 (Hessian top
  eigenvalue, KL sharpness, bpb increase under noise: Holm over those measured);
- `gamma_scaling`: the exponent b of T* ~ gamma^b, fitted on the minima of the perturbed
  bpb, against the linear network's -2;
- `forecast`: the turn forecast from the first 4 budgets covers the measured one (`forecast.py`).

The tests are those of `significance.py` (one-sided at 2.5%: an effect's 95% interval on
the claimed side of zero), on replicates as `replicates.py` defines them; a claim read from
several curves holds when one passes after Holm's correction over all of them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from overtrain.analysis import curves, forecast, significance, tables, tuned_claims
from overtrain.analysis.page import short_tokens, sig
from overtrain.analysis.replicates import Replicates, SeedDraws, means_under, replicates
from overtrain.analysis.significance import ONE_SIDED
from overtrain.analysis.verdicts import (DOES_NOT_HOLD, HOLDS, NOT_TESTABLE, VERDICT_BOOT, Claim, family,
                                         moves_earlier, not_testable, passing, reasons, u_row, u_verdict)
from overtrain.probes import metrics

CLAIM_IDS = ("sensitivity", "perturbation_u", "finetune_u", "lr_moves_turn", "t_ft_tuned", "t_pre_tuned", "lr_trend",
             "decay_forgets_more", "decay_sharper", "matched_loss", "gamma_scaling", "forecast")
# Sharpness of a checkpoint, the paper's first (the Hessian's top eigenvalue), then its proxies.
SHARPNESS_METRICS = ("hessian_top_eig", "kl_sharpness", "delta_bpb")
GAMMA_EXPONENT_THEORY = -2.0  # the linear network: the perturbed loss is lowest at T* ~ gamma^-2 (docs/THEORY.md)


def check_claims(results: pd.DataFrame, n_boot: int = curves.N_BOOT, seed: int = 0,
                 intervals: bool = True) -> list[Claim]:
    """Every claim on `results`, in the order of CLAIM_IDS. intervals=False skips the bootstraps no
    verdict reads (the locations of minima); the two whose interval is the verdict (gamma_scaling,
    forecast) then draw VERDICT_BOOT resamples."""
    results = tables.plain(results)
    located_boot, verdict_boot = (n_boot, n_boot) if intervals else (0, VERDICT_BOOT)
    final = tables.finetune_final(results)  # read by several claims: made once
    perturbation = perturbation_u(results, located_boot, seed)
    fixed_lr = finetune_u(results, located_boot, seed, final)
    return [progressive_sensitivity(results), perturbation, fixed_lr, lr_moves_turn(results, fixed_lr, verdict_boot, seed, final),
            *tuned_claims.tuned_lr_claims(results, located_boot, seed, final),
            decay_forgets_more(results, final, fixed_lr), decay_sharper(results), tuned_claims.matched_loss(results),
            gamma_scaling(results, perturbation, verdict_boot, seed),
            forecast.forecast_claim(results, fixed_lr, verdict_boot, seed, final)]


def _table(claim: Claim, name: str) -> pd.DataFrame | None:
    return dict(claim.tables).get(name)


# -- progressive sensitivity ---------------------------------------------------------------

def progressive_sensitivity(results: pd.DataFrame) -> Claim:
    title = "Progressive sensitivity: the same noise hurts more the longer a model was pre-trained"
    label = "slope of the bpb increase under noise per 10x tokens (bpb)"
    delta = tables.probe_points(results, "delta_bpb")
    if delta.empty:
        return not_testable("sensitivity", title, label, "no perturbation probe in this run")
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
    table = family(rows)
    tested = table[table["untestable"] == ""]
    if tested.empty:
        return not_testable("sensitivity", title, label, reasons(table), table, "sensitivity_trend")
    best = tested.loc[tested["p_value"].idxmin()]
    finding = ("Slope of the bpb increase under noise (mean over gammas) per 10x tokens, by schedule: " + "; ".join(
        f"{r.schedule}: {sig(r.slope, plus=True)} [{sig(r.slope_low)}, {sig(r.slope_high)}], p = {sig(r.p_value, 2)}"
        f" ({'holds' if r.passes else 'does not hold'})" for r in tested.itertuples()) + ".")
    reason = f"{passing(table, 'rise')}; steepest evidence: {best['schedule']}, p = {sig(best['p_value'], 2)}"
    return Claim("sensitivity", title, HOLDS if table["passes"].any() else DOES_NOT_HOLD, reason, label,
                 best["slope"], best["slope_low"], best["slope_high"], finding, [("sensitivity_trend", table)])


# -- U under perturbation, and its scaling with gamma ---------------------------------------

def perturbation_u(results: pd.DataFrame, n_boot: int, seed: int) -> Claim:
    title = "U-shape under perturbation: the perturbed model is best at an interior budget, earlier for larger noise"
    perturbed = tables.probe_points(results, "perturbed_bpb")
    if perturbed.empty:
        return not_testable("perturbation_u", title, "rise (bpb)", "no perturbation probe in this run")
    rows = [{"schedule": schedule, "gamma": gamma, **u_row(points, n_boot=n_boot, seed=seed)}
            for (schedule, gamma), points in perturbed.groupby(["schedule", "gamma"])]
    table = family(rows)
    moves = {schedule: moves_earlier(group, "gamma") for schedule, group in table.groupby("schedule")}
    table["moves_earlier"] = table["schedule"].map(moves)
    claim = u_verdict("perturbation_u", title, table, lambda r: f"{r.schedule} gamma {r.gamma:g}", "perturbation_u")
    if claim.verdict == NOT_TESTABLE:
        return claim
    holds = any(group["passes"].any() and moves[schedule] for schedule, group in table.groupby("schedule"))
    claim.verdict = HOLDS if holds else DOES_NOT_HOLD
    paths = {schedule: " -> ".join(short_tokens(t) for t in group.sort_values("gamma")["lowest_tokens"])
             + (" (moves earlier)" if moves[schedule] else " (does not move earlier)")
             for schedule, group in table[table["untestable"] == ""].groupby("schedule")}
    claim.reason += "; lowest budget as gamma grows: " + "; ".join(f"{s}: {p}" for s, p in paths.items())
    claim.finding += " Lowest budget as gamma grows: " + "; ".join(f"{s}: {p}" for s, p in paths.items()) + "."
    return claim


def gamma_scaling(results: pd.DataFrame, perturbation: Claim, n_boot: int, seed: int) -> Claim:
    """The exponent b of T* ~ gamma^b over the perturbed curves with a U, against the theory's -2.

    T* is each curve's lowest budget refined to the vertex of the parabola through it and its
    neighbours (log tokens); b is the slope of log T* on log gamma with one intercept per
    schedule (schedules with two located gammas or more). Its 95% interval is a hierarchical
    bootstrap over replicates (one draw for every curve: noise seeds are paired across
    gammas) in which each curve's minimum lies anywhere (uniform in log tokens) between the
    budgets around that resample's lowest one, so the interval includes the budgets' spacing
    (STATISTICS §5). Holds when the interval contains -2 and lies below 0; does not hold when
    it excludes -2; not testable when it contains both -2 and 0 (it cannot tell the theory's
    scaling from none) or fewer than 2 gammas show a U in any schedule.
    """
    title = "Gamma scaling: the perturbed model's best budget falls as gamma^-2, as the linear network predicts"
    label = f"exponent b of T* ~ gamma^b (theory: {GAMMA_EXPONENT_THEORY:g})"
    table = _table(perturbation, "perturbation_u")
    if table is None or "passes" not in table:
        return not_testable("gamma_scaling", title, label, perturbation.reason)
    located = table[table["passes"]]
    gammas_per_schedule = located.groupby("schedule")["gamma"].nunique()
    located = located[located["schedule"].isin(gammas_per_schedule[gammas_per_schedule >= 2].index)]
    if located.empty:
        return not_testable("gamma_scaling", title, label, "fewer than 2 gammas of one schedule show a U after Holm's "
                            "correction: no minimum to scale", table, "perturbation_u")
    perturbed = tables.probe_points(results, "perturbed_bpb")
    values = np.stack([replicates(perturbed[(perturbed["schedule"] == s) & (perturbed["gamma"] == g)], like=perturbed).values
                       for s, g in zip(located["schedule"], located["gamma"])])          # (K, P, S, B)
    log_tokens = np.log10(np.sort(perturbed["tokens"].astype(float).unique()))
    log_gamma, schedules = np.log10(located["gamma"].to_numpy(dtype=float)), located["schedule"].to_numpy()
    n_pretrain, n_seed = values.shape[1], values.shape[2]
    minima = curves.lowest_vertex(log_tokens, means_under(values, SeedDraws.identity(n_pretrain, n_seed)))  # (1, K)
    exponent = float(_pooled_slope(log_gamma, minima, schedules)[0])
    rng = np.random.default_rng(seed)
    resampled = means_under(values, SeedDraws.hierarchical(n_pretrain, n_seed, n_boot, rng))                 # (n, K, B)
    low, high = np.percentile(_pooled_slope(log_gamma, _lowest_in_bracket(log_tokens, resampled, rng), schedules),
                              [100 * (1 - curves.LEVEL) / 2, 100 * (1 + curves.LEVEL) / 2])
    fits, below_zero = low <= GAMMA_EXPONENT_THEORY <= high, high < 0
    where = "; ".join(f"{s} gamma {g:g}: {short_tokens(10 ** m)}" for s, g, m in zip(schedules, located["gamma"], minima[0]))
    numbers = f"b = {sig(exponent)} [{sig(low)}, {sig(high)}] against the theory's {GAMMA_EXPONENT_THEORY:g}"
    finding = (f"Lowest budget of the perturbed bpb (refined), over the curves with a U: {where}. Fitted {numbers} "
               f"({len(located)} curves, {n_boot} resamples).")
    if fits and not below_zero:
        return Claim("gamma_scaling", title, NOT_TESTABLE, f"{numbers}: the interval also contains 0, so it cannot "
                     "tell the theory's scaling from none", label, exponent, low, high, finding,
                     [("gamma_minima", located)])
    reason = numbers + (": consistent with it, and below 0" if fits else ": the interval excludes it")
    return Claim("gamma_scaling", title, HOLDS if fits else DOES_NOT_HOLD, reason, label, exponent, low, high, finding,
                 [("gamma_minima", located)])


def _lowest_in_bracket(log_tokens: np.ndarray, resampled: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each resampled curve's (..., B) lowest point as a position drawn uniformly between the budgets
    around it (log10 tokens): the minimum lies somewhere between them, so an interval over resamples
    includes the budgets' spacing (STATISTICS 5)."""
    lowest = np.argmin(np.where(np.isfinite(resampled), resampled, np.inf), axis=-1)
    before, after = log_tokens[np.maximum(lowest - 1, 0)], log_tokens[np.minimum(lowest + 1, len(log_tokens) - 1)]
    return before + rng.random(lowest.shape) * (after - before)


def _pooled_slope(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Least-squares slope of each row of y (n, K) on x (K,), with one intercept per group (K,)."""
    _, index = np.unique(groups, return_inverse=True)
    member = np.eye(index.max() + 1)[index]                 # (K, G)
    counts = member.sum(axis=0)
    x_centred = x - member @ (member.T @ x / counts)
    y_centred = y - (y @ member / counts) @ member.T
    return (y_centred @ x_centred) / (x_centred @ x_centred)


# -- U after fine-tuning at a fixed LR, and the LR that moves it -------------------------------

def finetune_u(results: pd.DataFrame, n_boot: int, seed: int, final: pd.DataFrame | None = None) -> Claim:
    title = ("U-shape after fine-tuning at a fixed LR: past some budget, pre-training longer leaves a worse model "
             "after fine-tuning")
    ood = tables.final_points(results, "ood_bpb", final)
    if ood.empty:
        return not_testable("finetune_u", title, "rise (bpb)", "no fine-tuning in this run")
    rows = [{"schedule": schedule, "decayed": points["decayed"].iloc[0], "task": task, "lr": lr,
             **u_row(points, n_boot=n_boot, seed=seed)}
            for (schedule, task, lr), points in ood.groupby(["schedule", "task", "lr"])]
    return u_verdict("finetune_u", title, family(rows), lambda r: f"{r.task} at LR {r.lr:g} ({r.schedule})", "finetune_u")


def lr_moves_turn(results: pd.DataFrame, fixed_lr: Claim, n_boot: int, seed: int,
                  final: pd.DataFrame | None = None) -> Claim:
    """In a (schedule, task) whose fixed-LR curves show a U after Holm (claim finetune_u), the lowest
    budget is earlier at the largest LR than at the smallest: one paired test, the 95% interval of
    the shift (the same seed resamples for both curves) below zero."""
    title = "Fixed LR: a larger fine-tuning LR moves the turn to fewer tokens"
    label = "shift of the lowest budget from the smallest to the largest LR (decades of tokens)"
    table = _table(fixed_lr, "finetune_u")
    if table is None or not (table["untestable"] == "").any():
        return not_testable("lr_moves_turn", title, label, fixed_lr.reason)
    ood = tables.final_points(results, "ood_bpb", final)
    rows = []
    for (schedule, task), group in table[table["untestable"] == ""].groupby(["schedule", "task"]):
        by_lr = group.sort_values("lr")
        if len(by_lr) < 2:
            continue
        points = ood[(ood["schedule"] == schedule) & (ood["task"] == task)]
        ends = [points[points["lr"] == by_lr["lr"].iloc[i]] for i in (0, -1)]
        shift, low, high = _paired_shift([replicates(end, like=points) for end in ends], n_boot, seed)
        rows.append({"schedule": schedule, "task": task, "lrs": len(by_lr), "u_after_holm": bool(by_lr["passes"].any()),
                     "p_holm": by_lr["p_holm"].min(),
                     "lowest": " -> ".join(short_tokens(t) for t in by_lr["lowest_tokens"]),
                     "shift": shift, "shift_low": low, "shift_high": high})
    if not rows:
        return not_testable("lr_moves_turn", title, label, "one testable LR per (schedule, task): nothing to move")
    summary = pd.DataFrame(rows)
    summary["holds"] = summary["u_after_holm"] & (summary["shift_high"] < 0)
    best = summary.sort_values(["holds", "shift_high"], ascending=[False, True]).iloc[0]
    describe = "; ".join(f"{r.task} ({r.schedule}): {r.lowest}, shift {sig(r.shift, plus=True)} "
                         f"[{sig(r.shift_low)}, {sig(r.shift_high)}] decades"
                         + ("" if r.u_after_holm else " (no U after Holm)") for r in summary.itertuples())
    reason = (f"in {int(summary['holds'].sum())} of {len(summary)} (schedule, task) the lowest budget is earlier at the "
              f"largest LR than at the smallest (95% interval of the paired shift below 0), with a U after Holm; "
              f"{best['task']} ({best['schedule']}): {best['lowest']}")
    return Claim("lr_moves_turn", title, HOLDS if summary["holds"].any() else DOES_NOT_HOLD, reason, label,
                 best["shift"], best["shift_low"], best["shift_high"],
                 f"Lowest budget of pre-training-text bpb after fine-tuning, by LR from the smallest: {describe}.",
                 [("lr_moves_turn", summary)])


def _paired_shift(ends: list[Replicates], n_boot: int, seed: int) -> tuple[float, float, float]:
    """log10 of the lowest budget (refined between its neighbours) at the second curve minus at the
    first, and its 95% interval over hierarchical seed resamples drawn once for both curves, each
    resample's lowest budgets placed in their brackets (`_lowest_in_bracket`)."""
    values = np.stack([end.values for end in ends])                         # (2, P, S, B)
    log_tokens = np.log10(ends[0].tokens)
    n_pretrain, n_seed = values.shape[1], values.shape[2]
    point = curves.lowest_vertex(log_tokens, means_under(values, SeedDraws.identity(n_pretrain, n_seed)))[0]
    rng = np.random.default_rng(seed)
    lowest = _lowest_in_bracket(log_tokens, means_under(values, SeedDraws.hierarchical(n_pretrain, n_seed, n_boot, rng)),
                                rng)                                          # (n, 2)
    shifts = lowest[:, 1] - lowest[:, 0]
    tail = 100 * (1 - curves.LEVEL) / 2
    low, high = np.nanpercentile(shifts, [tail, 100 - tail])
    return float(point[1] - point[0]), float(low), float(high)


# -- decayed vs constant LR ------------------------------------------------------------------

DECAY_TITLE = "Schedules: at equal tokens, checkpoints that ended in a learning-rate decay forget more when fine-tuned"
SHARPER_TITLE = "Schedules: at equal tokens, checkpoints that ended in a learning-rate decay are sharper"


def decay_forgets_more(results: pd.DataFrame, final: pd.DataFrame | None = None, fixed_lr: Claim | None = None) -> Claim:
    label = "decayed minus constant-LR forgetting, mean over budgets, tasks and LRs (bpb)"
    forgetting = tables.forgetting_points(results, final)
    if forgetting.empty or forgetting["decayed"].nunique() < 2:
        return not_testable("decay_forgets_more", DECAY_TITLE, label,
                            "needs decayed and constant-LR checkpoints at the same budgets, fine-tuned")
    pairs = _decayed_minus_constant(forgetting, ["tokens", "task", "lr", "pretrain_seed", "seed"], "forgetting_bpb")
    usable = pairs.dropna(subset=["difference"])
    if usable.empty:
        return not_testable("decay_forgets_more", DECAY_TITLE, label, "no budget has both a decayed and a constant-LR "
                            "checkpoint fine-tuned without divergence")
    per_replicate = _per_replicate_mean(usable)
    if len(per_replicate) < 2:
        return not_testable("decay_forgets_more", DECAY_TITLE, label, "one seed: no spread to test against", pairs,
                            "decayed_vs_constant")
    found = significance.across_replicates(per_replicate.to_numpy())
    verdict = HOLDS if found.p_value <= ONE_SIDED else DOES_NOT_HOLD
    dropped = len(pairs) - len(usable)
    by_lr = usable.groupby(["task", "lr"])["difference"].mean()
    turn, turn_text = _decay_and_turn(_table(fixed_lr, "finetune_u") if fixed_lr is not None else None)
    finding = (f"Decayed minus constant-LR forgetting at equal tokens, task, LR and seed: {sig(found.value, plus=True)} "
               f"bpb [{sig(found.low)}, {sig(found.high)}] (p = {sig(found.p_value, 2)}, {len(per_replicate)} "
               f"{'pre-training seeds' if usable['pretrain_seed'].nunique() >= 2 else 'seeds'} as replicates, "
               f"{len(usable)} pairs). By task and LR: " + "; ".join(
                   f"{task} LR {lr:g}: {sig(d, plus=True)}" for (task, lr), d in by_lr.items()) + "."
               + (f" {dropped} pairs left out: a run diverged." if dropped else "") + turn_text)
    reason = (f"decayed checkpoints forget {sig(found.value, plus=True)} bpb [{sig(found.low)}, {sig(found.high)}] vs "
              f"constant LR, p = {sig(found.p_value, 2)}" + (f"; {turn}" if turn else ""))
    return Claim("decay_forgets_more", DECAY_TITLE, verdict, reason, label, found.value, found.low, found.high, finding,
                 [("decayed_vs_constant_forgetting", pairs)])


def _decay_and_turn(table: pd.DataFrame | None) -> tuple[str, str]:
    """Whether decay moves the fixed-LR turn earlier (descriptive: the lowest budgets compared per
    task and LR), as a short clause and a sentence; empty without testable curves of both kinds."""
    if table is None or "lowest_tokens" not in table:
        return "", ""
    tested = table[table["untestable"] == ""].assign(decayed=lambda t: t["decayed"].astype(bool))
    rows = []
    for (task, lr), group in tested.groupby(["task", "lr"]):
        constant = group.loc[~group["decayed"], "lowest_tokens"]
        for decayed in group[group["decayed"]].itertuples():
            if len(constant):
                rows.append((task, lr, decayed.schedule, decayed.lowest_tokens, constant.iloc[0]))
    if not rows:
        return "", ""
    earlier = sum(d < c for *_, d, c in rows)
    clause = f"decay moves the fixed-LR turn earlier at {earlier} of {len(rows)} (task, LR) (lowest budgets compared)"
    detail = "; ".join(f"{task} LR {lr:g}: {schedule} {short_tokens(d)} vs constant {short_tokens(c)}"
                       for task, lr, schedule, d, c in rows)
    return clause, f" Turn (lowest budget of pre-training-text bpb after fine-tuning at a fixed LR): {clause}: {detail}."


def decay_sharper(results: pd.DataFrame) -> Claim:
    """Decayed minus constant-LR sharpness at equal tokens, per sharpness metric measured, mean over
    budgets (and gammas), tested > 0 across replicates; holds when one metric passes after Holm."""
    label = "decayed minus constant-LR sharpness, mean over budgets"
    rows = []
    for metric in tables.probe_metrics_present(results, list(SHARPNESS_METRICS)):
        points = tables.probe_points(results, metric)
        points = points.assign(seed=points["seed"].fillna(0))  # one measurement per checkpoint: seed 0
        per_seed = points.groupby(tables.CHECKPOINT_COLUMNS + ["seed"])["value"].mean().reset_index()
        pairs = _decayed_minus_constant(per_seed, ["tokens", "pretrain_seed", "seed"], "value").dropna(subset=["difference"])
        row = {"metric": metric, "pairs": len(pairs), "untestable": "", "p_value": np.nan}
        per_replicate = _per_replicate_mean(pairs) if len(pairs) else pd.Series(dtype=float)
        if pairs.empty:
            row["untestable"] = "no budget has both a decayed and a constant-LR checkpoint"
        elif len(per_replicate) < 2:
            row["untestable"] = "one seed: no spread to test against"
        else:
            found = significance.across_replicates(per_replicate.to_numpy())
            row |= {"replicates": len(per_replicate), "difference": found.value, "difference_low": found.low,
                    "difference_high": found.high, "p_value": found.p_value}
        rows.append(row)
    if not rows:
        return not_testable("decay_sharper", SHARPER_TITLE, label, "no sharpness or perturbation probe in this run")
    table = family(rows)
    tested = table[table["untestable"] == ""]
    side_by_side = _sharpness_side_by_side(results)
    claim_tables = [("decayed_vs_constant_sharpness", table)] + (
        [("sharpness_side_by_side", side_by_side)] if not side_by_side.empty else [])
    if tested.empty:
        claim = not_testable("decay_sharper", SHARPER_TITLE, label, reasons(table, "metrics"))
        claim.tables = claim_tables
        return claim
    best = tested.loc[tested["p_value"].idxmin()]
    untested = reasons(table, "metrics")
    finding = ("Decayed minus constant-LR value at equal tokens and seed, mean over budgets: " + "; ".join(
        f"{metrics.label(r.metric)}: {sig(r.difference, plus=True)} [{sig(r.difference_low)}, {sig(r.difference_high)}], "
        f"p = {sig(r.p_value, 2)} (Holm {sig(r.p_holm, 2)})" for r in tested.itertuples()) + "."
               + (f" Not testable: {untested}." if untested else "") + _describe_sharpness(side_by_side))
    reason = (f"{passing(table, noun='metrics')}; {best['metric']}: decayed minus constant "
              f"{sig(best['difference'], plus=True)} [{sig(best['difference_low'])}, {sig(best['difference_high'])}]")
    return Claim("decay_sharper", SHARPER_TITLE, HOLDS if table["passes"].any() else DOES_NOT_HOLD, reason,
                 f"decayed minus constant-LR {metrics.label(best['metric'])}, mean over budgets", best["difference"],
                 best["difference_low"], best["difference_high"], finding, claim_tables)


def _decayed_minus_constant(points: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """One row per `keys` with both kinds of checkpoint: each side's mean `value` and their difference."""
    side = points.assign(decayed=points["decayed"].astype(bool))
    decayed = side[side["decayed"]].groupby(keys)[value].mean().rename("decayed")
    constant = side[~side["decayed"]].groupby(keys)[value].mean().rename("constant")
    pairs = pd.concat([decayed, constant], axis=1, join="inner").reset_index()
    return pairs.assign(difference=pairs["decayed"] - pairs["constant"])


def _per_replicate_mean(pairs: pd.DataFrame) -> pd.Series:
    """Each replicate's mean difference: pre-training seeds when there are several, else seeds."""
    unit = "pretrain_seed" if pairs["pretrain_seed"].nunique() >= 2 else "seed"
    return pairs.groupby(unit)["difference"].mean()


def _sharpness_side_by_side(results: pd.DataFrame) -> pd.DataFrame:
    """Per budget, each sharpness metric's mean for the decayed and the constant-LR checkpoint."""
    columns = {}
    for metric in tables.probe_metrics_present(results, list(SHARPNESS_METRICS[:2])):
        means = tables.probe_points(results, metric).groupby(["tokens", "decayed"])["value"].mean().unstack("decayed")
        if {0, 1} <= set(means.columns.astype(int)):
            means.columns = means.columns.astype(int)
            columns[f"{metric} constant"], columns[f"{metric} decayed"] = means[0], means[1]
    return pd.DataFrame(columns).reset_index() if columns else pd.DataFrame()


def _describe_sharpness(table: pd.DataFrame) -> str:
    if table.empty:
        return ""
    parts = []
    for metric in SHARPNESS_METRICS[:2]:
        if f"{metric} decayed" in table:
            sharper = int((table[f"{metric} decayed"] > table[f"{metric} constant"]).sum())
            parts.append(f"{metrics.label(metric)} is higher for the decayed checkpoint at {sharper} of {len(table)} budgets")
    return " Side by side: " + "; ".join(parts) + "."
