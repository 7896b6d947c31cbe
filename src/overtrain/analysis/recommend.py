"""Which checkpoint to fine-tune, and at what LR, for a task and a forgetting tolerance.

Forgetting of one fine-tuning run = its pre-training-text bpb (`ood_bpb`) at the
end minus the same run's `ood_bpb` at step 0, i.e. the base checkpoint's own bpb on
the same held-out text. A (checkpoint, LR) pair is *within tolerance* when its mean
forgetting over seeds is at most `tolerance_bpb`; pairs with a diverged seed are
never recommended. Among pairs within tolerance, the best has the best mean final
task metric: `id_acc` (higher is better) when the runs measured it and it tells
runs apart (some run reaches at least MIN_INFORMATIVE_ACC), else `id_bpb` (lower
is better): tiny models score ~0 exact match on math, and a choice among zeros
would be a choice by forgetting alone.

How sure: seeds are redrawn with replacement for every pair (independently) and the
choice is made again; `p_best` is the fraction of resamples in which a pair is
chosen. A pair that is best in 90% of resamples is a clear winner; 40% means the
runners-up are as good within the noise. With a single seed there is nothing to
redraw and `p_best` is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from overtrain.analysis import tables
from overtrain.probes import metrics

DEFAULT_TOLERANCE_BPB = 0.05
RUNNERS_UP = 3


@dataclass(frozen=True)
class Recommendation:
    task: str
    tolerance_bpb: float
    id_metric: str
    higher_is_better: bool
    # One row per (checkpoint, LR), best first: id_mean, forgetting_bpb, seeds, diverged, within_tolerance, p_best.
    candidates: pd.DataFrame

    @property
    def best(self) -> pd.Series | None:
        feasible = self.candidates[self.candidates["within_tolerance"]]
        return feasible.iloc[0] if len(feasible) else None

    @property
    def runners_up(self) -> pd.DataFrame:
        return self.candidates[self.candidates["within_tolerance"]].iloc[1: 1 + RUNNERS_UP]


MIN_INFORMATIVE_ACC = 0.1


def id_metric_for(final: pd.DataFrame) -> tuple[str, bool]:
    """The task metric to optimize and whether higher is better: accuracy where it is informative."""
    accuracy = final.loc[final["metric"] == "id_acc", "value"]
    informative = len(accuracy) and accuracy.max() >= MIN_INFORMATIVE_ACC and accuracy.nunique() > 1
    name = "id_acc" if informative else "id_bpb"
    return name, metrics.higher_is_better(name)


def run_outcomes(results: pd.DataFrame, task: str) -> tuple[pd.DataFrame, str, bool]:
    """One row per fine-tuning run of `task`: final task metric, forgetting, diverged."""
    final = tables.finetune_final(results)
    final = final[final["task"] == task]
    id_metric, higher_is_better = id_metric_for(final)
    start = tables.finetune_start(results)
    keys = ["cell", "checkpoint", "schedule", "decayed", "tokens", "lr", "seed"]
    outcome = final[final["metric"] == id_metric][[*keys, "value"]].rename(columns={"value": "id"})
    ood_end = final[final["metric"] == "ood_bpb"][["cell", "value"]].rename(columns={"value": "ood_end"})
    ood_start = start[start["metric"] == "ood_bpb"][["cell", "value"]].rename(columns={"value": "ood_start"})
    outcome = outcome.merge(ood_end, on="cell").merge(ood_start, on="cell")
    outcome["forgetting_bpb"] = outcome["ood_end"] - outcome["ood_start"]
    diverged = set(results.loc[results["metric"] == "diverged_at_step", "cell"])
    outcome["diverged"] = outcome["cell"].isin(diverged)
    return outcome, id_metric, higher_is_better


def recommend(results: pd.DataFrame, task: str, tolerance_bpb: float = DEFAULT_TOLERANCE_BPB,
              n_boot: int = 1000, seed: int = 0) -> Recommendation:
    """The (checkpoint, LR) with the best task result whose forgetting stays within tolerance."""
    runs, id_metric, higher_is_better = run_outcomes(results, task)
    pairs = runs.groupby(["checkpoint", "schedule", "decayed", "tokens", "lr"], dropna=False)
    candidates = pairs.agg(id_mean=("id", "mean"), forgetting_bpb=("forgetting_bpb", "mean"),
                           seeds=("id", "size"), diverged=("diverged", "any")).reset_index()
    candidates["within_tolerance"] = ~candidates["diverged"] & (candidates["forgetting_bpb"] <= tolerance_bpb)
    candidates["p_best"] = _bootstrap_best(pairs, candidates, tolerance_bpb, higher_is_better, n_boot, seed)
    order = candidates["id_mean"] * (-1 if higher_is_better else 1)
    candidates = candidates.assign(_order=order).sort_values(["within_tolerance", "_order"], ascending=[False, True])
    return Recommendation(task, tolerance_bpb, id_metric, higher_is_better,
                          candidates.drop(columns="_order").reset_index(drop=True))


def _bootstrap_best(pairs, candidates: pd.DataFrame, tolerance_bpb: float, higher_is_better: bool,
                    n_boot: int, seed: int) -> np.ndarray:
    """For each candidate, the fraction of seed resamples in which it is the recommendation."""
    if (candidates["seeds"] < 2).any():
        return np.full(len(candidates), np.nan)
    rng = np.random.default_rng(seed)
    id_means, forgetting_means = [], []
    for _, runs in pairs:
        draws = rng.integers(0, len(runs), size=(n_boot, len(runs)))
        id_means.append(runs["id"].to_numpy()[draws].mean(axis=1))
        forgetting_means.append(runs["forgetting_bpb"].to_numpy()[draws].mean(axis=1))
    badness = np.column_stack(id_means) * (-1 if higher_is_better else 1)
    allowed = (np.column_stack(forgetting_means) <= tolerance_bpb) & ~candidates["diverged"].to_numpy()
    badness = np.where(allowed, badness, np.inf)
    any_allowed = allowed.any(axis=1)
    winners = badness.argmin(axis=1)[any_allowed]
    return np.bincount(winners, minlength=len(candidates)) / n_boot
