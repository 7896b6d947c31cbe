"""From tidy result rows to the small tables behind every plot and statistic.

Two shapes come out of here:

- *points*: one row per replicate (seed) of one curve point, with a `value` column;
  the statistics in `curves.py` and `recommend.py` resample these.
- *summaries*: one row per curve point with the mean over its replicates, a 95%
  t-interval (`ci_low`, `ci_high`) and the number of replicates `n`; the plots draw these.

Every row about a checkpoint carries its `pretrain_seed` (which independent
pre-training run made it; stores from before pre-training seeds read as seed 0).

A diverged fine-tune (a `diverged_at_step` row) is kept wherever fine-tunes are
listed, flagged `diverged`: it has no final evaluation, so its final values and its
forgetting are NaN, never its last evaluation before it diverged (a run that diverges
at step 0 would otherwise show no forgetting at all). Summaries leave NaN out of the
mean and count the diverged runs of each point beside it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

# Columns that identify a pre-trained checkpoint in every row about it.
CHECKPOINT_COLUMNS = ["schedule", "decayed", "tokens", "checkpoint", "pretrain_seed"]
# ... and one fine-tuning run of it.
RUN_COLUMNS = [*CHECKPOINT_COLUMNS, "task", "lr", "seed"]
# Fine-tuning metrics measured along a run (at step 0, every eval_every steps, at the end).
TRAJECTORY_METRICS = ["id_loss_nats", "id_bpb", "id_test_loss_nats", "id_test_bpb", "ood_loss_nats", "ood_bpb"]
SEED_KINDS = ["pretrain", "probe", "finetune"]  # the rows that name their pre-training seed


def with_pretrain_seed(rows: pd.DataFrame) -> pd.DataFrame:
    """`rows` with an integer `pretrain_seed` in each: a store written before pre-training seeds
    existed has none, and its checkpoints all come from one pre-training run, read as seed 0."""
    seeds = rows["pretrain_seed"] if "pretrain_seed" in rows else pd.Series(np.nan, index=rows.index)
    return rows.assign(pretrain_seed=pd.to_numeric(seeds).fillna(0).astype(int))


def pretrain_seeds(results: pd.DataFrame) -> list[int]:
    """The pre-training seeds behind the results' checkpoints (one, for a series of existing checkpoints)."""
    return sorted(with_pretrain_seed(results[results["kind"].isin(SEED_KINDS)])["pretrain_seed"].unique())


def mean_with_ci(frame: pd.DataFrame, by: list[str], value: str = "value") -> pd.DataFrame:
    """Mean and 95% t-interval of `value` over the replicates of each group of `by`.

    The replicates are the pre-training seeds when the points come from two or more
    (each first averaged over its fine-tuning or noise seeds), else the rows (seeds).
    Non-finite values (diverged runs) are left out; `n` counts the replicates behind the
    mean (no interval from one). Points that carry a `diverged` flag get a `diverged`
    column: how many runs of that point diverged, so a mean over fewer seeds shows.
    """
    columns = [*by, "mean", "ci_low", "ci_high", "n", *(["diverged"] if "diverged" in frame else [])]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    replicates = _replicate_values(frame, by, value)
    summary = replicates.groupby(by, dropna=False)[value].apply(_t_interval).unstack().reset_index()
    summary["n"] = summary["n"].astype(int)
    if "diverged" in frame:
        counts = frame.assign(diverged=frame["diverged"].astype(bool)).groupby(by, dropna=False)["diverged"].sum()
        summary = summary.merge(counts.astype(int).reset_index(), on=by, how="left")
    return summary[columns]


def _replicate_values(frame: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """One row per replicate: the frame itself, or its mean per pre-training seed when it has several."""
    finite = frame.assign(**{value: frame[value].where(np.isfinite(frame[value].astype(float)))})
    if "pretrain_seed" in by or "pretrain_seed" not in frame or frame["pretrain_seed"].nunique() < 2:
        return finite
    return finite.groupby([*by, "pretrain_seed"], dropna=False)[value].mean().reset_index()


def _t_interval(values: pd.Series) -> pd.Series:
    v = values.to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    mean = v.mean() if n else np.nan
    half = stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / np.sqrt(n) if n > 1 else np.nan
    return pd.Series({"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n})


# -- the base model -----------------------------------------------------------------

def base_metrics(results: pd.DataFrame) -> pd.DataFrame:
    """Held-out loss and bpb of every checkpoint before any change: one row per checkpoint."""
    probe = results[(results["kind"] == "probe") & results["gamma"].isna() & results["metric"].isin(["bpb", "loss_nats"])]
    if probe.empty:
        return pd.DataFrame(columns=[*CHECKPOINT_COLUMNS, "bpb", "loss_nats"])
    wide = with_pretrain_seed(probe).pivot_table(index=CHECKPOINT_COLUMNS, columns="metric", values="value").reset_index()
    wide.columns.name = None
    return wide


def probe_points(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One probe metric of every checkpoint, one row per (gamma, seed) where it has them."""
    rows = with_pretrain_seed(results[(results["kind"] == "probe") & (results["metric"] == metric)])
    return rows[[*CHECKPOINT_COLUMNS, "gamma", "seed", "value"]].reset_index(drop=True)


def probe_metrics_present(results: pd.DataFrame, candidates: list[str]) -> list[str]:
    """The candidate probe metrics that this run has measured, in the given order."""
    measured = set(results.loc[results["kind"] == "probe", "metric"])
    return [metric for metric in candidates if metric in measured]


def series_checkpoints(results: pd.DataFrame) -> pd.DataFrame:
    """A study's existing checkpoints, one row each: tokens, weights hash, source, and the earlier
    checkpoint whose weights it repeats (`duplicate_of`; such a checkpoint is measured once, as that one)."""
    rows = results[(results["kind"] == "import") & (results["metric"] == "parameters")]
    columns = ["checkpoint", "tokens", "weights", "duplicate_of", "source", "value"]
    if rows.empty:  # a study of our own checkpoints (or a frame from before the columns existed)
        return pd.DataFrame(columns=columns).rename(columns={"value": "parameters"})
    table = rows[columns].rename(columns={"value": "parameters"}).sort_values(["tokens", "checkpoint"])
    return table.astype({"parameters": "int64"}).reset_index(drop=True)  # stored as a float metric value


# -- fine-tuning --------------------------------------------------------------------

def finetune_runs(results: pd.DataFrame) -> pd.DataFrame:
    """Fine-tuning rows that belong to an evaluation step (drops run-level rows)."""
    return with_pretrain_seed(results[(results["kind"] == "finetune") & results["step"].notna()])


def divergence_steps(results: pd.DataFrame) -> pd.Series:
    """The step at which each diverged fine-tuning run diverged, by cell."""
    rows = results[(results["kind"] == "finetune") & (results["metric"] == "diverged_at_step")]
    return rows.groupby("cell")["value"].min()


def _one_row_per_metric(rows: pd.DataFrame) -> list[str]:
    # A run's mitigation variants (e.g. WiSE interpolations) share its cell.
    return ["cell", *(["mitigation"] if "mitigation" in rows else []), "metric"]


def finetune_final(results: pd.DataFrame) -> pd.DataFrame:
    """Each fine-tuning run's metrics at its last evaluation (tidy), with a `diverged` flag.

    A diverged run has no final evaluation: it gets one row per metric it measured,
    value NaN, step NaN, diverged True (its evaluations before it diverged, and anything
    measured on its diverged weights, are not its final values).
    """
    runs = finetune_runs(results)
    diverged = runs["cell"].isin(divergence_steps(results).index)
    finished = runs[~diverged]
    final = finished[finished["step"] == finished.groupby("cell")["step"].transform("max")].assign(diverged=False)
    broken = (runs[diverged].drop_duplicates(_one_row_per_metric(runs))
              .assign(value=np.nan, step=np.nan, diverged=True))
    return pd.concat([final, broken], ignore_index=True)


def early_stopped(results: pd.DataFrame, metric: str, higher_is_better: bool,
                  final: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each fine-tuning run at the evaluation after step 0 where `metric` (a validation metric) is
    best: its metrics at that step (tidy, as `finetune_final`), the step chosen per run (STATISTICS §6).

    With one evaluation after step 0, or a metric measured at the last step only (accuracy),
    that is the last step. A diverged run stays as `finetune_final` has it (NaN, diverged)."""
    runs = finetune_runs(results)
    final = finetune_final(results) if final is None else final
    broken = final[final["diverged"].astype(bool)]
    finished = runs[~runs["cell"].isin(broken["cell"])]
    scored = finished[(finished["metric"] == metric) & (finished["step"] > 0) & finished["value"].notna()]
    best = scored.groupby("cell")["value"].idxmax() if higher_is_better else scored.groupby("cell")["value"].idxmin()
    stopped = finished.merge(scored.loc[best.to_numpy(), ["cell", "step"]], on=["cell", "step"]).assign(diverged=False)
    return pd.concat([stopped, broken], ignore_index=True)


def finetune_start(results: pd.DataFrame) -> pd.DataFrame:
    """Each fine-tuning run's metrics at step 0, before any update (tidy, one row per metric)."""
    runs = finetune_runs(results)
    start = runs[runs["step"] == 0]
    # A run that diverged at step 0 measured its capabilities twice there, before and "after".
    return start.drop_duplicates(_one_row_per_metric(start)).reset_index(drop=True)


def final_points(results: pd.DataFrame, metric: str, final: pd.DataFrame | None = None) -> pd.DataFrame:
    """One final fine-tuning metric: one row per checkpoint, task, LR and seed; diverged runs NaN.

    final: `finetune_final(results)`, when the caller has it already (it is the slow part)."""
    final = finetune_final(results) if final is None else final
    rows = final[final["metric"] == metric]
    return rows[[*RUN_COLUMNS, "value", "diverged"]].reset_index(drop=True)


def finetune_metrics_present(results: pd.DataFrame) -> set[str]:
    return set(finetune_runs(results)["metric"])


def trajectories(results: pd.DataFrame) -> pd.DataFrame:
    """Fine-tuning runs along their steps, one row per run and evaluation, metrics as columns.

    A diverged run keeps its evaluations from before the step it diverged at (and its
    step 0, the base checkpoint), flagged `diverged`: its curve ends early, with no final point.
    """
    runs = finetune_runs(results)
    runs = runs[runs["metric"].isin(TRAJECTORY_METRICS)]
    diverged_at = runs["cell"].map(divergence_steps(results))
    runs = runs[~(runs["step"] >= diverged_at.clip(lower=1))].assign(diverged=diverged_at.notna())
    index = [*RUN_COLUMNS, "step"]
    columns = [*index, *TRAJECTORY_METRICS, "diverged"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    wide = runs.pivot_table(index=[*index, "diverged"], columns="metric", values="value").reset_index()
    wide.columns.name = None
    return wide.reindex(columns=columns).sort_values(index).reset_index(drop=True)


def diverged_runs(results: pd.DataFrame) -> pd.DataFrame:
    """Every run that diverged, of any kind (pre-training, fine-tuning, any mitigation), and the step."""
    rows = with_pretrain_seed(results[results["metric"] == "diverged_at_step"])
    columns = ["kind", "checkpoint", "schedule", "tokens", "pretrain_seed", "task", "lr", "seed", "mitigation", "value"]
    return rows.reindex(columns=columns).rename(columns={"value": "diverged_at_step"}).reset_index(drop=True)


def forgetting_points(results: pd.DataFrame, final: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per fine-tuning run: the rise of held-out pre-training bpb from step 0 to the end (NaN if diverged)."""
    start = finetune_start(results)
    start = start[start["metric"] == "ood_bpb"].drop_duplicates("cell").set_index("cell")["value"]
    final = finetune_final(results) if final is None else final
    final = final[final["metric"] == "ood_bpb"]
    final = final.assign(forgetting_bpb=final["value"] - final["cell"].map(start).astype(float))
    return final[["cell", *RUN_COLUMNS, "forgetting_bpb", "diverged"]].reset_index(drop=True)


def sharpness_vs_forgetting(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One point per checkpoint (per pre-training seed) and (task, LR): its sharpness beside
    the mean forgetting of its fine-tuning seeds.

    The seeds of one checkpoint share its sharpness: they are one point, not several
    (`seeds` counts the finite ones behind the mean, `diverged` the runs that diverged).
    """
    sharpness = probe_points(results, metric).groupby("checkpoint")["value"].mean().rename(metric)
    forgetting = forgetting_points(results)
    finite = forgetting["forgetting_bpb"].where(np.isfinite(forgetting["forgetting_bpb"].astype(float)))
    points = (forgetting.assign(forgetting_bpb=finite)
              .groupby([*CHECKPOINT_COLUMNS, "task", "lr"], dropna=False)
              .agg(forgetting_bpb=("forgetting_bpb", "mean"), seeds=("forgetting_bpb", "count"),
                   diverged=("diverged", "sum"))
              .reset_index())
    return points.join(sharpness, on="checkpoint").dropna(subset=[metric]).reset_index(drop=True)


def rank_correlations(points: pd.DataFrame, x: str, y: str, by: list[str]) -> pd.DataFrame:
    """Spearman rho of `y` with `x` within each group of `by`, over its rows with both finite.

    One row per group: rho, p_value, n (the rows behind it); rho is NaN below 3 rows or
    when either side does not vary.
    """
    rows = []
    for key, group in points.groupby(by, sort=True, dropna=False):
        both = group[np.isfinite(group[x].astype(float)) & np.isfinite(group[y].astype(float))]
        varies = len(both) >= 3 and both[x].nunique() > 1 and both[y].nunique() > 1
        rho, p_value = stats.spearmanr(both[x], both[y]) if varies else (np.nan, np.nan)
        rows.append({**dict(zip(by, key)), "rho": float(rho), "p_value": float(p_value), "n": len(both)})
    return pd.DataFrame(rows, columns=[*by, "rho", "p_value", "n"])


def predicted_vs_observed(results: pd.DataFrame) -> pd.DataFrame:
    """Per fine-tuning run: forgetting predicted along the update (nats) beside the observed rise."""
    rows = with_pretrain_seed(results[(results["kind"] == "finetune") & results["metric"].isin(
        ["predicted_forgetting_nats", "first_order_term_nats", "observed_forgetting_nats"])])
    wide = rows.pivot_table(index=["cell", *RUN_COLUMNS], columns="metric", values="value", dropna=False).reset_index()
    if wide.empty:
        return wide
    return wide.assign(predicted_total_nats=wide["predicted_forgetting_nats"] + wide["first_order_term_nats"])


# -- mitigations ----------------------------------------------------------------------

def _mitigation(results: pd.DataFrame) -> pd.Series:
    """Each row's mitigation, "none" for plain runs (and for stores written before the column)."""
    if "mitigation" not in results:
        return pd.Series("none", index=results.index)
    return results["mitigation"].fillna("none")


def plain(results: pd.DataFrame) -> pd.DataFrame:
    """Rows of plain fine-tunes (and of every other kind of cell)."""
    return results[_mitigation(results) == "none"]


def only_mitigation(results: pd.DataFrame, variant: str) -> pd.DataFrame:
    """Rows of one mitigation variant, and the divergence rows of its runs (a WiSE variant shares
    its run's cell, whose `diverged_at_step` row is written as the plain run's)."""
    of_variant = _mitigation(results) == variant
    divergence = (results["metric"] == "diverged_at_step") & results["cell"].isin(results.loc[of_variant, "cell"])
    return results[of_variant | divergence]


def mitigations_present(results: pd.DataFrame) -> list[str]:
    """"none" first, then every mitigation variant the fine-tunes carry."""
    variants = set(_mitigation(results[results["kind"] == "finetune"]))
    return sorted(variants, key=lambda v: (v != "none", v))
