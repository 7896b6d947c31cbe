"""From tidy result rows to the small tables behind every plot and statistic.

Two shapes come out of here:

- *points*: one row per replicate (seed) of one curve point, with a `value` column;
  the statistics in `curves.py` and `recommend.py` resample these.
- *summaries*: one row per curve point with the mean over seeds, a 95% t-interval
  (`ci_low`, `ci_high`) and the number of seeds `n`; the plots draw these.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

# Columns that identify a pre-trained checkpoint in every row about it.
CHECKPOINT_COLUMNS = ["schedule", "decayed", "tokens", "checkpoint"]
# Fine-tuning metrics measured along a run (at step 0, every eval_every steps, at the end).
TRAJECTORY_METRICS = ["id_loss_nats", "id_bpb", "ood_loss_nats", "ood_bpb"]


def mean_with_ci(frame: pd.DataFrame, by: list[str], value: str = "value") -> pd.DataFrame:
    """Mean and 95% t-interval of `value` over the rows of each group (seeds)."""

    def summarize(values: pd.Series) -> pd.Series:
        v = values.to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        n = len(v)
        mean = v.mean() if n else np.nan
        half = stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / np.sqrt(n) if n > 1 else 0.0
        return pd.Series({"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n})

    if frame.empty:
        return pd.DataFrame(columns=[*by, "mean", "ci_low", "ci_high", "n"])
    grouped = frame.groupby(by, dropna=False)[value].apply(summarize).unstack()
    return grouped.reset_index()


# -- the base model -----------------------------------------------------------------

def base_metrics(results: pd.DataFrame) -> pd.DataFrame:
    """Held-out loss and bpb of every checkpoint before any change: tokens x schedule."""
    probe = results[(results["kind"] == "probe") & results["gamma"].isna() & results["metric"].isin(["bpb", "loss_nats"])]
    if probe.empty:
        return pd.DataFrame(columns=["schedule", "decayed", "tokens", "bpb", "loss_nats"])
    return probe.pivot_table(index=["schedule", "decayed", "tokens"], columns="metric", values="value").reset_index()


def probe_points(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One probe metric of every checkpoint, one row per (gamma, seed) where it has them."""
    rows = results[(results["kind"] == "probe") & (results["metric"] == metric)]
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
    return results[(results["kind"] == "finetune") & results["step"].notna()]


def finetune_final(results: pd.DataFrame) -> pd.DataFrame:
    """Each fine-tuning run's metrics at its last evaluation (tidy)."""
    runs = finetune_runs(results)
    last = runs.groupby("cell")["step"].transform("max")
    return runs[runs["step"] == last].reset_index(drop=True)


def finetune_start(results: pd.DataFrame) -> pd.DataFrame:
    """Each fine-tuning run's metrics at step 0, before any update (tidy)."""
    runs = finetune_runs(results)
    return runs[runs["step"] == 0].reset_index(drop=True)


def final_points(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One final fine-tuning metric: one row per checkpoint, task, LR and seed."""
    final = finetune_final(results)
    rows = final[final["metric"] == metric]
    return rows[[*CHECKPOINT_COLUMNS, "task", "lr", "seed", "value"]].reset_index(drop=True)


def finetune_metrics_present(results: pd.DataFrame) -> set[str]:
    return set(finetune_runs(results)["metric"])


def trajectories(results: pd.DataFrame) -> pd.DataFrame:
    """Fine-tuning runs along their steps, one row per run and evaluation, metrics as columns."""
    runs = finetune_runs(results)
    runs = runs[runs["metric"].isin(TRAJECTORY_METRICS)]
    index = [*CHECKPOINT_COLUMNS, "task", "lr", "seed", "step"]
    if runs.empty:
        return pd.DataFrame(columns=[*index, *TRAJECTORY_METRICS])
    wide = runs.pivot_table(index=index, columns="metric", values="value").reset_index()
    wide.columns.name = None
    return wide.sort_values(index).reset_index(drop=True)


def diverged_runs(results: pd.DataFrame) -> pd.DataFrame:
    rows = results[results["metric"] == "diverged_at_step"]
    return rows[["kind", "checkpoint", "task", "lr", "seed", "value"]].rename(columns={"value": "diverged_at_step"})


def forgetting_points(results: pd.DataFrame) -> pd.DataFrame:
    """Per fine-tuning run: the rise of held-out pre-training bpb from step 0 to the end."""
    start = finetune_start(results).query("metric == 'ood_bpb'").set_index("cell")["value"]
    final = finetune_final(results).query("metric == 'ood_bpb'").set_index("cell")
    final = final.assign(forgetting_bpb=final["value"] - start.reindex(final.index))
    return final[[*CHECKPOINT_COLUMNS, "task", "lr", "seed", "forgetting_bpb"]].reset_index()


def sharpness_vs_forgetting(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each checkpoint's sharpness beside the mean forgetting of its fine-tunes (per task and LR)."""
    sharpness = probe_points(results, metric).groupby("checkpoint")["value"].mean().rename(metric)
    forgetting = (forgetting_points(results).groupby([*CHECKPOINT_COLUMNS, "task", "lr"], dropna=False)["forgetting_bpb"]
                  .mean().reset_index())
    return forgetting.join(sharpness, on="checkpoint").dropna(subset=[metric, "forgetting_bpb"])


def predicted_vs_observed(results: pd.DataFrame) -> pd.DataFrame:
    """Per fine-tuning run: forgetting predicted along the update (nats) beside the observed rise."""
    rows = results[(results["kind"] == "finetune") & results["metric"].isin(
        ["predicted_forgetting_nats", "first_order_term_nats", "observed_forgetting_nats"])]
    wide = rows.pivot_table(index=["cell", *CHECKPOINT_COLUMNS, "task", "lr", "seed"], columns="metric",
                            values="value", dropna=False).reset_index()
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
    return results[_mitigation(results) == variant]


def mitigations_present(results: pd.DataFrame) -> list[str]:
    """"none" first, then every mitigation variant the fine-tunes carry."""
    variants = set(_mitigation(results[results["kind"] == "finetune"]))
    return sorted(variants, key=lambda v: (v != "none", v))
