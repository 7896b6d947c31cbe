"""Which checkpoint to fine-tune, at what LR and for how many steps: chosen on absolute outcomes.

Candidates
    Every evaluation step after step 0 of every plain fine-tune of the task is a
    candidate (checkpoint, LR, step). The task metric is `id_acc` where it tells runs
    apart (`id_metric_for`), measured at the last step only, so then the last step is
    the only one; else `id_bpb`, measured at every evaluation. Values are seed means:
    over the fine-tuning seeds within each pre-training seed, then over the
    pre-training seeds (checkpoints of the same schedule and budget from different
    pre-training seeds are one candidate).

Choice on validation, report on test
    The task's held-out examples are split in two halves. The validation half
    (`id_bpb`, `id_acc`) chooses the candidate, the step included; the test half
    (`id_test_bpb`, `id_test_acc`) reports it. A store written before the split has
    no test half: the validation value is reported, and the report says so.

The rule
    The user's constraint is absolute: pre-training-text bpb after fine-tuning
    (`ood_bpb`) at most `max_bpb`, or at most `within_bpb` above the best base
    checkpoint's held-out bpb (probe `bpb`; where a checkpoint has no probe row, its
    fine-tunes' step-0 `ood_bpb`, the same text before any update). Among candidates
    that meet it, the best validation task metric wins, ties to the lower `ood_bpb`:
    that candidate is on the Pareto frontier of (validation task metric, `ood_bpb`),
    since anything that beats it on both axes would also meet the constraint and have
    a task metric at least as good. When none meets it, the candidate with the lowest
    `ood_bpb` wins (ties to the better task metric: again on the frontier) and
    `constraint_met` is False: the answer is "closest you can get", never nothing.
    A (checkpoint, LR) with any diverged seed is never recommended; it stays in the
    candidate table with `diverged` True. Relative forgetting (`ood_bpb` at the step
    minus the same run's `ood_bpb` at step 0) is a column, not the criterion: it
    penalizes a checkpoint for having been better to begin with.

How sure: p_best
    The fraction of seed resamples in which a candidate is the recommendation.
    A resample draws pre-training seeds with replacement, then fine-tuning seeds with
    replacement within each drawn pre-training seed; one draw of seed ids serves every
    candidate (seed s is paired across checkpoints and LRs), and the whole choice
    (step on validation, the constraint's limit, the frontier) is made again in it.
    With one seed overall there is nothing to redraw: p_best is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from overtrain.analysis import tables
from overtrain.analysis.page import sig
from overtrain.analysis.replicates import SeedDraws, means_under
from overtrain.errors import SpecError
from overtrain.probes import metrics

# Measured on the demo (examples/quick.yaml): no candidate is within 0.05 (the closest ends
# 0.052 above the best base checkpoint), 0.1 admits full fine-tunes at the smallest LR of the
# two largest checkpoints; larger LRs forget 0.13-0.5 bpb.
DEFAULT_WITHIN_BPB = 0.1
RUNNERS_UP = 3
MIN_INFORMATIVE_ACC = 0.1

CHECKPOINT_KEY = ["schedule", "decayed", "tokens"]  # one checkpoint across pre-training seeds
PAIR = [*CHECKPOINT_KEY, "lr"]
CANDIDATE = [*PAIR, "step"]


@dataclass(frozen=True)
class Constraint:
    """The most pre-training-text bpb after fine-tuning the user accepts: a fixed `max_bpb`,
    or `within_bpb` above the best base checkpoint's held-out bpb (the default)."""

    max_bpb: float | None = None
    within_bpb: float = DEFAULT_WITHIN_BPB

    @classmethod
    def of(cls, max_bpb: float | None = None, within_bpb: float | None = None) -> Constraint:
        """The constraint the user asked for; both at once is a mistake."""
        if max_bpb is not None and within_bpb is not None:
            raise SpecError("--max-bpb and --within-bpb are two constraints on the same bpb: give one of them")
        if max_bpb is not None and not max_bpb > 0:
            raise SpecError(f"--max-bpb {max_bpb:g}: must be a positive bpb")
        if within_bpb is not None and not within_bpb >= 0:
            raise SpecError(f"--within-bpb {within_bpb:g}: must be zero or more bpb")
        return cls(max_bpb, DEFAULT_WITHIN_BPB if within_bpb is None else within_bpb)

    def limits(self, best_base_bpb: np.ndarray) -> np.ndarray:
        """The bpb limit for each value of the best base bpb (one per resample)."""
        if self.max_bpb is not None:
            return np.full(np.shape(best_base_bpb), self.max_bpb)
        return best_base_bpb + self.within_bpb


@dataclass(frozen=True)
class Recommendation:
    task: str
    id_metric: str              # the validation metric that chooses
    reported_metric: str        # the metric of `value`: the test half, or the validation one in an old store
    higher_is_better: bool
    constraint: str             # the constraint in words, with its limit
    limit_bpb: float            # the most pre-training-text bpb after fine-tuning allowed (NaN: unknown)
    constraint_met: bool
    resampling: str             # what p_best redraws, or why it is NaN
    # One row per (checkpoint, LR, step), in the rule's order: the recommendation first, then its
    # runners-up, then the others; diverged pairs last.
    candidates: pd.DataFrame

    @property
    def best(self) -> pd.Series | None:
        """The recommended candidate; None only when there is none to choose (no run, or every pair diverged)."""
        first = self.candidates.head(1)
        return first.iloc[0] if len(first) and first["eligible"].iloc[0] else None

    @property
    def runners_up(self) -> pd.DataFrame:
        """The next candidates by the same rule: meeting the constraint if the best does, else by least forgetting."""
        best = self.best
        if best is None:
            return self.candidates.iloc[0:0]
        same_kind = self.candidates["eligible"] & (self.candidates["feasible"] == best["feasible"])
        return self.candidates[same_kind].iloc[1: 1 + RUNNERS_UP]

    def to_json(self) -> dict:
        """The answer as `report/recommendation.json` holds it (one object per task)."""
        best = self.best
        answer = {"task": self.task, "checkpoint": None, "schedule": None, "tokens": None, "pretrain_seeds": [],
                  "lr": None, "step": None, "metric": self.reported_metric, "value": None,
                  "validation_metric": self.id_metric, "validation_value": None, "ood_bpb": None,
                  "forgetting_bpb": None, "p_best": None, "constraint": self.constraint,
                  "constraint_met": self.constraint_met, "runners_up": []}
        if best is None:
            return answer
        answer.update({"checkpoint": best["checkpoint"], "schedule": best["schedule"], "tokens": _int(best["tokens"]),
                       "pretrain_seeds": [int(s) for s in best["pretrain_seeds"]], "lr": _float(best["lr"]),
                       "step": _int(best["step"]), "value": _float(best["value"]),
                       "validation_value": _float(best["validation_value"]), "ood_bpb": _float(best["ood_bpb"]),
                       "forgetting_bpb": _float(best["forgetting_bpb"]), "p_best": _float(best["p_best"])})
        answer["runners_up"] = [{"checkpoint": row["checkpoint"], "lr": _float(row["lr"]), "step": _int(row["step"]),
                                 "value": _float(row["value"]), "ood_bpb": _float(row["ood_bpb"]),
                                 "p_best": _float(row["p_best"])} for _, row in self.runners_up.iterrows()]
        return answer


def _float(value) -> float | None:
    """A JSON number, null for NaN."""
    return float(value) if np.isfinite(float(value)) else None


def _int(value) -> int | None:
    return int(value) if np.isfinite(float(value)) else None


def id_metric_for(final: pd.DataFrame) -> tuple[str, bool]:
    """The task metric to optimize and whether higher is better: accuracy where it is informative.

    Tiny models score ~0 exact match on math, and a choice among zeros would be a choice by
    forgetting alone: accuracy counts only if some run reaches MIN_INFORMATIVE_ACC and runs differ.
    """
    accuracy = final.loc[final["metric"] == "id_acc", "value"]
    informative = len(accuracy) and accuracy.max() >= MIN_INFORMATIVE_ACC and accuracy.nunique() > 1
    name = "id_acc" if informative else "id_bpb"
    return name, metrics.higher_is_better(name)


def reporting_metric(id_metric: str, measured: set[str]) -> str:
    """The metric that reports a choice made on `id_metric`: its test-half twin (id_bpb -> id_test_bpb)
    where `measured` holds it, else, in a store from before the split, `id_metric` itself."""
    twin = "id_test_" + id_metric.removeprefix("id_")
    return twin if twin in measured else id_metric


# -- from rows to seed means ------------------------------------------------------------

def evaluations(runs: pd.DataFrame, id_metric: str, reported_metric: str) -> pd.DataFrame:
    """One row per fine-tuning run and evaluation step > 0 with a validation task value:
    validation_value, value (reported), ood_bpb, forgetting_bpb (ood_bpb minus the run's step-0 ood_bpb)."""
    index = ["cell", *CANDIDATE, "pretrain_seed", "seed"]
    measures = ["validation_value", "value", "ood_bpb", "forgetting_bpb"]
    wanted = runs[runs["step"].notna() & runs["metric"].isin([id_metric, reported_metric, "ood_bpb"])]
    if wanted.empty:  # keep the key columns' types: they are merged with other rows of the runs
        return runs.iloc[0:0].reindex(columns=[*index, *measures])
    wide = wanted.set_index([*index, "metric"])["value"].unstack("metric")
    wide = wide.reindex(columns=list(dict.fromkeys([id_metric, reported_metric, "ood_bpb"]))).reset_index()
    start = wide.loc[wide["step"] == 0].set_index("cell")["ood_bpb"]
    wide["forgetting_bpb"] = wide["ood_bpb"] - wide["cell"].map(start)
    wide["validation_value"], wide["value"] = wide[id_metric], wide[reported_metric]
    chosen = wide[(wide["step"] > 0) & wide["validation_value"].notna()]
    return chosen[[*index, *measures]].reset_index(drop=True)


def candidate_keys(found: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Every candidate with its checkpoint name (that of its lowest pre-training seed) and whether its
    (checkpoint, LR) has a diverged seed. A diverged pair with no evaluation after step 0 gets one
    row (step NaN), so that it shows in the table too."""
    diverged = runs.loc[runs["metric"] == "diverged_at_step", PAIR].drop_duplicates().assign(diverged=True)
    keys = found[CANDIDATE].drop_duplicates()
    silent = diverged.merge(keys[PAIR].drop_duplicates(), on=PAIR, how="left", indicator=True)
    silent = silent.loc[silent["_merge"] == "left_only", PAIR].assign(step=np.nan)
    keys = pd.concat([keys, silent], ignore_index=True).merge(diverged, on=PAIR, how="left")
    keys["diverged"] = keys["diverged"].astype("boolean").fillna(False).astype(bool)
    names = runs.sort_values("pretrain_seed").drop_duplicates(CHECKPOINT_KEY)[[*CHECKPOINT_KEY, "checkpoint"]]
    return keys.merge(names, on=CHECKPOINT_KEY, how="left").sort_values(CANDIDATE).reset_index(drop=True)


@dataclass(frozen=True)
class Seeds:
    """The seed ids of a task's runs, sorted: the axes of every seed cube."""

    pretrain: np.ndarray
    finetune: np.ndarray

    @classmethod
    def of(cls, runs: pd.DataFrame) -> Seeds:
        return cls(np.sort(runs["pretrain_seed"].dropna().unique()), np.sort(runs["seed"].dropna().unique()))

    @property
    def count(self) -> int:
        return len(self.pretrain) * len(self.finetune)


def seed_cube(found: pd.DataFrame, column: str, keys: pd.DataFrame, seeds: Seeds) -> np.ndarray:
    """(candidates, pre-training seeds, fine-tuning seeds) values of `column`, NaN where not measured."""
    cube = np.full((len(keys), len(seeds.pretrain), len(seeds.finetune)), np.nan)
    if found.empty:
        return cube
    row = found[CANDIDATE].merge(keys[CANDIDATE].reset_index(), on=CANDIDATE, how="left")["index"]
    cube[row.to_numpy(), np.searchsorted(seeds.pretrain, found["pretrain_seed"]),
         np.searchsorted(seeds.finetune, found["seed"])] = found[column].to_numpy(dtype=float)
    return cube


def seed_means(cube: np.ndarray, draws: SeedDraws) -> np.ndarray:
    """(resamples, candidates): the mean over the drawn fine-tuning seeds within each drawn
    pre-training seed, then over the drawn pre-training seeds."""
    return means_under(cube[..., None], draws)[..., 0]


def _mean_finite(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean of the finite entries along `axis`; NaN where there are none."""
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, values, 0.0).sum(axis=axis) / finite.sum(axis=axis)


@dataclass(frozen=True)
class BaseBpb:
    """Held-out bpb of each checkpoint before fine-tuning: (checkpoints, pre-training seeds)."""

    names: pd.Series  # checkpoint name of each row
    values: np.ndarray

    @classmethod
    def of(cls, results: pd.DataFrame, runs: pd.DataFrame, seeds: Seeds) -> BaseBpb:
        """The probe's `bpb`, else the fine-tunes' step-0 `ood_bpb` (the same text, before any update)."""
        probe = results[(results["kind"] == "probe") & results["gamma"].isna() & (results["metric"] == "bpb")]
        start = runs[(runs["step"] == 0) & (runs["metric"] == "ood_bpb")]
        columns = [*CHECKPOINT_KEY, "checkpoint", "pretrain_seed", "value"]
        rows = pd.concat([probe[columns], start[columns]], ignore_index=True)
        rows = rows[rows["pretrain_seed"].isin(seeds.pretrain)].drop_duplicates([*CHECKPOINT_KEY, "pretrain_seed"])
        checkpoints = rows.sort_values("pretrain_seed").drop_duplicates(CHECKPOINT_KEY).reset_index(drop=True)
        row = rows[CHECKPOINT_KEY].merge(checkpoints[CHECKPOINT_KEY].reset_index(), on=CHECKPOINT_KEY, how="left")
        values = np.full((len(checkpoints), len(seeds.pretrain)), np.nan)
        values[row["index"].to_numpy(), np.searchsorted(seeds.pretrain, rows["pretrain_seed"])] = rows["value"]
        return cls(checkpoints["checkpoint"], values)

    def means(self, draws: SeedDraws) -> np.ndarray:
        """(resamples, checkpoints): means over the drawn pre-training seeds."""
        return _mean_finite(self.values[:, draws.pretrain], axis=-1).T

    def best(self, draws: SeedDraws) -> np.ndarray:
        """The lowest checkpoint mean of each resample; NaN where none is known."""
        means = np.where(np.isfinite(m := self.means(draws)), m, np.inf)
        lowest = means.min(axis=1, initial=np.inf)
        return np.where(np.isfinite(lowest), lowest, np.nan)


# -- the choice --------------------------------------------------------------------------

def preference(validation: np.ndarray, ood: np.ndarray, eligible: np.ndarray, limit: np.ndarray,
               higher_is_better: bool) -> np.ndarray:
    """(resamples, candidates): candidate positions in the rule's order, the recommendation first.

    Group 0, candidates that meet the constraint: by task metric, then ood_bpb. Group 1, the other
    usable candidates: by ood_bpb, then task metric (its first wins when group 0 is empty).
    Group 2, diverged or unmeasured: never chosen.
    """
    badness = -validation if higher_is_better else validation
    usable = eligible[None, :] & np.isfinite(badness) & np.isfinite(ood)
    with np.errstate(invalid="ignore"):
        feasible = usable & (ood <= limit[:, None])
    group = np.where(feasible, 0, np.where(usable, 1, 2))
    first = np.where(feasible, badness, np.where(usable, ood, 0.0))
    second = np.where(feasible, ood, np.where(usable, badness, 0.0))
    return np.lexsort((second, first, group), axis=-1)


def frontier(validation: np.ndarray, ood: np.ndarray, usable: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Usable candidates that no other usable one beats on both axes (as good on both, better on one)."""
    badness = np.where(usable, -validation if higher_is_better else validation, np.inf)
    ood = np.where(usable, ood, np.inf)
    no_worse = (badness[:, None] <= badness[None, :]) & (ood[:, None] <= ood[None, :])
    better = (badness[:, None] < badness[None, :]) | (ood[:, None] < ood[None, :])
    dominated = (no_worse & better & usable[:, None]).any(axis=0)
    return usable & ~dominated


def p_best(validation: np.ndarray, ood: np.ndarray, base: BaseBpb, eligible: np.ndarray, constraint: Constraint,
           higher_is_better: bool, seeds: Seeds, n_boot: int, seed: int) -> np.ndarray:
    """How often each candidate is the recommendation when seeds are redrawn (see the module docstring);
    validation and ood are seed cubes. NaN with one seed overall."""
    if seeds.count < 2:
        return np.full(len(eligible), np.nan)
    draws = SeedDraws.hierarchical(len(seeds.pretrain), len(seeds.finetune), n_boot, np.random.default_rng(seed))
    val, bpb = seed_means(validation, draws), seed_means(ood, draws)
    top = preference(val, bpb, eligible, constraint.limits(base.best(draws)), higher_is_better)[:, 0]
    drawn = np.arange(n_boot)
    chosen = top[eligible[top] & np.isfinite(val[drawn, top]) & np.isfinite(bpb[drawn, top])]
    return np.bincount(chosen, minlength=len(eligible)) / n_boot


def resampling_note(seeds: Seeds, n_boot: int) -> str:
    """What p_best redraws, in words."""
    n_pretrain, n_finetune = len(seeds.pretrain), len(seeds.finetune)
    if seeds.count < 2:
        return "one seed in all: nothing to redraw, so how often the choice wins is not known"
    if n_pretrain < 2:
        return (f"{n_boot} resamples of the {n_finetune} fine-tuning seeds, the same draw for every candidate; "
                "one pre-training run, so its own luck is not covered")
    return (f"{n_boot} resamples: the {n_pretrain} pre-training seeds redrawn, then the {n_finetune} fine-tuning "
            "seeds within each, the same draw for every candidate")


CANDIDATE_COLUMNS = ["checkpoint", *CANDIDATE, "validation_value", "value", "ood_bpb", "forgetting_bpb", "seeds",
                     "pretrain_seeds", "diverged", "eligible", "feasible", "frontier", "p_best"]


def recommend(results: pd.DataFrame, task: str, constraint: Constraint = Constraint(), n_boot: int = 1000,
              seed: int = 0) -> Recommendation:
    """The candidate (checkpoint, LR, step) to fine-tune for `task` under `constraint`, and how sure."""
    results = tables.with_pretrain_seed(tables.plain(results))
    runs = results[(results["kind"] == "finetune") & (results["task"] == task)]
    id_metric, higher_is_better = id_metric_for(tables.finetune_final(runs))
    reported = reporting_metric(id_metric, set(runs["metric"]))
    found, seeds = evaluations(runs, id_metric, reported), Seeds.of(tables.finetune_runs(runs))
    keys, base = candidate_keys(found, runs), BaseBpb.of(results, runs, seeds)
    cubes = {column: seed_cube(found, column, keys, seeds)
             for column in ("validation_value", "value", "ood_bpb", "forgetting_bpb")}
    point = SeedDraws.identity(len(seeds.pretrain), len(seeds.finetune))
    limit = float(constraint.limits(base.best(point))[0])

    table = keys.assign(**{column: seed_means(cube, point)[0] for column, cube in cubes.items()})
    table = table.merge(_seeds_used(found), on=CANDIDATE, how="left")
    table["seeds"] = table["seeds"].fillna(0).astype(int)
    table["pretrain_seeds"] = [used if isinstance(used, list) else [] for used in table["pretrain_seeds"]]
    table["eligible"] = ~table["diverged"] & table["validation_value"].notna() & table["ood_bpb"].notna()
    table["feasible"] = table["eligible"] & (table["ood_bpb"] <= limit)
    table["frontier"] = frontier(table["validation_value"].to_numpy(), table["ood_bpb"].to_numpy(),
                                 table["eligible"].to_numpy(), higher_is_better)
    table["p_best"] = p_best(cubes["validation_value"], cubes["ood_bpb"], base, ~keys["diverged"].to_numpy(),
                             constraint, higher_is_better, seeds, n_boot, seed)
    order = preference(table["validation_value"].to_numpy()[None], table["ood_bpb"].to_numpy()[None],
                       ~table["diverged"].to_numpy(), np.array([limit]), higher_is_better)[0]
    table = table.iloc[order][CANDIDATE_COLUMNS].reset_index(drop=True)
    return Recommendation(task, id_metric, reported, higher_is_better, describe_constraint(constraint, base, point, limit),
                          limit, bool(table["feasible"].any()), resampling_note(seeds, n_boot), table)


def _seeds_used(found: pd.DataFrame) -> pd.DataFrame:
    """Per candidate: how many runs it averages and which pre-training seeds they came from."""
    return found.groupby(CANDIDATE, dropna=False).agg(
        seeds=("validation_value", "size"),
        pretrain_seeds=("pretrain_seed", lambda used: sorted(int(s) for s in used.unique()))).reset_index()


def describe_constraint(constraint: Constraint, base: BaseBpb, point: SeedDraws, limit: float) -> str:
    """The constraint in words, with the limit it comes to."""
    if constraint.max_bpb is not None:
        return f"pre-training-text bpb after fine-tuning at most {sig(constraint.max_bpb)}"
    means = base.means(point)[0]
    if not np.isfinite(means).any():
        return (f"pre-training-text bpb after fine-tuning within +{sig(constraint.within_bpb)} of the best base "
                "checkpoint, whose bpb was not measured")
    best = int(np.nanargmin(means))
    return (f"pre-training-text bpb after fine-tuning at most {sig(limit)}: within +{sig(constraint.within_bpb)} of the "
            f"best base checkpoint ({base.names.iloc[best]}, {sig(means[best])} bpb)")
