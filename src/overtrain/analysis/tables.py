"""From tidy result rows to the summary tables behind every plot.

Each table has one row per curve point: the grouping columns, then the mean over
seeds, a 95% t-interval (`ci_low`, `ci_high`) and the number of seeds `n`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def mean_with_ci(frame: pd.DataFrame, by: list[str], value: str = "value") -> pd.DataFrame:
    """Mean and 95% t-interval of `value` over the rows of each group (seeds)."""

    def summarize(values: pd.Series) -> pd.Series:
        v = values.to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        n = len(v)
        mean = v.mean() if n else np.nan
        half = stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / np.sqrt(n) if n > 1 else 0.0
        return pd.Series({"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n})

    grouped = frame.groupby(by, dropna=False)[value].apply(summarize).unstack()
    return grouped.reset_index()


def base_metrics(results: pd.DataFrame) -> pd.DataFrame:
    """Held-out loss and bpb of every checkpoint before any change: tokens x schedule."""
    probe = results[(results["kind"] == "probe") & results["gamma"].isna() & results["metric"].isin(["bpb", "loss_nats"])]
    return probe.pivot_table(index=["schedule", "decayed", "tokens"], columns="metric", values="value").reset_index()


def sensitivity(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`delta_bpb` or `perturbed_bpb` per schedule, gamma and tokens, over noise seeds."""
    rows = results[(results["kind"] == "probe") & (results["metric"] == metric)]
    return mean_with_ci(rows, ["schedule", "decayed", "gamma", "tokens"])


def finetune_final(results: pd.DataFrame) -> pd.DataFrame:
    """Each fine-tuning run's metrics at its last evaluation (tidy)."""
    runs = results[(results["kind"] == "finetune") & results["step"].notna()]
    last = runs.groupby("cell")["step"].transform("max")
    final = runs[(runs["step"] == last) & runs["metric"].str.startswith(("id_", "ood_"))]
    return final.reset_index(drop=True)


def finetune_curves(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """A final fine-tuning metric per schedule, task, LR and tokens, over seeds."""
    final = finetune_final(results)
    return mean_with_ci(final[final["metric"] == metric], ["schedule", "decayed", "task", "lr", "tokens"])


def diverged_runs(results: pd.DataFrame) -> pd.DataFrame:
    rows = results[results["metric"] == "diverged_at_step"]
    return rows[["kind", "checkpoint", "task", "lr", "seed", "value"]].rename(columns={"value": "diverged_at_step"})
