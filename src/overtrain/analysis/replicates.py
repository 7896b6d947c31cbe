"""Replicates of a curve, and how they are redrawn.

A curve is one metric at several budgets. A study measures it in two levels of
replicates (STATISTICS.md §1):

1. pre-training seeds (`pretrain_seed`): independent pre-training runs. All
   checkpoints of one run share its luck, so only these replicate a trend across
   budgets;
2. second-level seeds (`seed`): fine-tuning seeds, or the noise seeds of a probe,
   inside each pre-training run.

Seeds are paired across budgets (seed s draws the same noise, the same batch order,
at every budget), so a curve is held as one array `values[p, s, b]` and every
resample redraws seed ids jointly for all budgets (and for every curve drawn with
the same generator state: candidates and learning rates stay paired too).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd

PRETRAIN_SEED, SEED = "pretrain_seed", "seed"


@dataclass(frozen=True)
class Replicates:
    """One curve's measurements: `values[p, s, b]` (NaN where a run is missing or diverged)."""

    tokens: np.ndarray   # (B,) budgets, increasing
    values: np.ndarray   # (P, S, B)
    diverged: int = 0    # runs of this curve that diverged

    @property
    def pretrain_seeds(self) -> int:
        return self.values.shape[0]

    @property
    def seeds(self) -> int:
        return self.values.shape[1]

    @property
    def unit(self) -> str:
        """What a replicate is in the tests: pre-training runs when there are several."""
        return "pre-training seed" if self.pretrain_seeds >= 2 else "seed"

    def units(self) -> np.ndarray:
        """(U, B) replicate-by-budget values for the tests: each pre-training seed's mean over its
        seeds when the study has several pre-training seeds, else the seeds of its one run.
        Replicates missing a budget are dropped, so that every difference stays paired."""
        matrix = unit_values(self.values)
        return matrix[np.isfinite(matrix).all(axis=1)]

    def means(self) -> np.ndarray:
        """(B,) the curve: mean over seeds within each pre-training seed, then over pre-training seeds."""
        with _quiet():
            return np.nanmean(np.nanmean(self.values, axis=1), axis=0)


def unit_values(values: np.ndarray) -> np.ndarray:
    """(..., U, B) replicates of values (..., P, S, B), as `Replicates.units` counts them (NaN kept)."""
    *rest, pretrain, seeds, budgets = values.shape
    if pretrain < 2:  # the seeds of the one run (or no run at all)
        return values.reshape(*rest, pretrain * seeds, budgets)
    with _quiet():
        return np.nanmean(values, axis=-2)


def replicates(points: pd.DataFrame, value: str = "value", like: pd.DataFrame | None = None) -> Replicates:
    """The `Replicates` of a points table (tokens, value[, seed][, pretrain_seed][, diverged]).

    like: a larger points table whose seeds and budgets set the array's shape, so that curves
    cut from it (one per LR, say) stack and stay paired."""
    shape = points if like is None else like
    pre_ids, seed_ids, budgets = (np.sort(_column(shape, PRETRAIN_SEED).unique()), np.sort(_column(shape, SEED).unique()),
                                  np.sort(shape["tokens"].astype(float).unique()))
    where = (np.searchsorted(pre_ids, _column(points, PRETRAIN_SEED).to_numpy()),
             np.searchsorted(seed_ids, _column(points, SEED).to_numpy()),
             np.searchsorted(budgets, points["tokens"].astype(float).to_numpy()))
    measured = points[value].to_numpy(dtype=float)
    measured = np.where(_diverged(points).to_numpy(), np.nan, measured)
    # The mean of the rows of each (pre-training seed, seed, budget): one row each, in a real run.
    shape_of = (len(pre_ids), len(seed_ids), len(budgets))
    sums, counts = np.zeros(shape_of), np.zeros(shape_of)
    finite = np.isfinite(measured)
    np.add.at(sums, tuple(w[finite] for w in where), measured[finite])
    np.add.at(counts, tuple(w[finite] for w in where), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(counts > 0, sums / counts, np.nan)
    return Replicates(budgets, values, int(_diverged(points).sum()))


@dataclass(frozen=True)
class SeedDraws:
    """Which seeds each resample takes: positions of pre-training seeds (resamples, P) and, within
    each drawn one, of second-level seeds (resamples, P, S). One draw serves everything resampled
    with it, so that budgets, LRs and candidates stay paired."""

    pretrain: np.ndarray
    seed: np.ndarray

    @classmethod
    def identity(cls, n_pretrain: int, n_seed: int) -> SeedDraws:
        """Every seed once: the point estimate, as one resample."""
        return cls(np.arange(n_pretrain)[None], np.broadcast_to(np.arange(n_seed), (1, n_pretrain, n_seed)))

    @classmethod
    def hierarchical(cls, n_pretrain: int, n_seed: int, n_boot: int, rng: np.random.Generator) -> SeedDraws:
        """Pre-training seeds with replacement, then seeds with replacement within each drawn one."""
        return cls(rng.integers(0, n_pretrain, size=(n_boot, n_pretrain)),
                   rng.integers(0, n_seed, size=(n_boot, n_pretrain, n_seed)))


def resampled_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Curve means under the hierarchical, paired bootstrap: (n_boot, ..., B) for values (..., P, S, B)."""
    return means_under(values, SeedDraws.hierarchical(values.shape[-3], values.shape[-2], n_boot, rng))


def means_under(values: np.ndarray, draws: SeedDraws) -> np.ndarray:
    """(resamples, ..., B) means of values (..., P, S, B) over the drawn seeds: within each drawn
    pre-training seed first, then over them (missing runs, NaN, left out)."""
    moved = np.moveaxis(values, (-3, -2), (0, 1))                # (P, S, ..., B)
    drawn = moved[draws.pretrain[:, :, None], draws.seed]        # (resamples, P, S, ..., B)
    with _quiet():
        return np.nanmean(np.nanmean(drawn, axis=2), axis=1)


def _column(points: pd.DataFrame, name: str) -> pd.Series:
    """A seed column with NaN (a measurement with one replicate, or a store from before it) as 0."""
    if name not in points:
        return pd.Series(0, index=points.index)
    return points[name].fillna(0).astype(int)


def _diverged(points: pd.DataFrame) -> pd.Series:
    if "diverged" not in points:
        return pd.Series(False, index=points.index)
    return points["diverged"].fillna(False).astype(bool)


@contextmanager
def _quiet():
    """Means of all-NaN slices are NaN, without a warning: a missing run is data here."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
