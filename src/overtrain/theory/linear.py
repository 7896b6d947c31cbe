"""Catastrophic overtraining in a two-layer linear network, simulated exactly.

The model is f(x) = W2 W1 x with W1 (hidden x d_in) and W2 (d_out x hidden). Inputs
are whitened (E[x x^T] = I), so the population loss against a linear target A is

    L_A(W1, W2) = 0.5 * ||W2 W1 - A||_F^2

and gradient descent on it is exact: no data, no sampling noise, fully determined
by the seed of the initialisation and of the fine-tuning target.

The simulation follows the paper's theory (Springer et al. 2025, section "Theory"):

1. Pre-train from a small initialisation on A = U diag(s) V^T with a geometric
   spectrum s_i = s_0 * decay^i. Gradient descent picks up the singular directions
   one after another (incremental learning), direction i at roughly
   t_i ~ log(s_i / init^2) / (2 lr s_i) steps, so checkpoints are log-spaced.
2. At every checkpoint measure
   (a) the pre-training loss,
   (b) its expected increase under Gaussian noise of std gamma on every weight,
   (c) the pre-training loss after fine-tuning on a misaligned target B for a fixed
       number of steps at a fixed learning rate,
   (d) the same with the penalty lam * (||W1 - W1_pre||^2 + ||W2 - W2_pre||^2).

Entry point: `simulate(TheoryConfig()) -> TheoryResult`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from overtrain.errors import SpecError


@dataclass(frozen=True)
class TheoryConfig:
    """Every parameter of the simulation; the defaults show all the effects clearly."""

    d_in: int = 20
    """Input dimension."""
    d_out: int = 20
    """Output dimension."""
    hidden: int = 8
    """Hidden width of the network (W1 is hidden x d_in)."""
    rank: int = 8
    """Number of non-zero singular values of the pre-training target."""
    top_singular_value: float = 4.0
    """s_0, the largest singular value of the pre-training target."""
    spectrum_decay: float = 0.5
    """s_i = s_0 * decay^i: each direction is weaker (and learned later) than the one before."""
    init_scale: float = 1e-3
    """Std of every entry of W1 and W2 at initialisation (small: incremental learning)."""
    pretrain_lr: float = 0.05
    """Learning rate of pre-training (plain gradient descent)."""
    pretrain_steps: int = 10000
    """Length of pre-training in steps; the last checkpoint."""
    n_checkpoints: int = 41
    """Checkpoints, geometrically spaced from step 1 to pretrain_steps (duplicates merged)."""
    gammas: tuple[float, ...] = (0.1, 0.2, 0.3)
    """Std of the Gaussian noise added to every entry of W1 and W2, one curve per value."""
    perturbation_samples: int = 0
    """0: expected loss increase in closed form; N > 0: seeded Monte Carlo over N draws."""
    finetune_lrs: tuple[float, ...] = (0.015, 0.025, 0.04)
    """Fine-tuning learning rates, one curve per value."""
    finetune_steps: int = 100
    """Fine-tuning steps from every checkpoint (the same for every checkpoint)."""
    misalignment: float = 0.5
    """||B - A||_F / ||A||_F for the fine-tuning target B = A + shift; the shift is a
    random direction orthogonal to A (0 = fine-tuning on the pre-training task)."""
    lams: tuple[float, ...] = (0.0, 0.05, 0.2)
    """Strengths of the penalty lam * ||W - W_pre||^2 toward the checkpoint's weights."""
    seed: int = 0
    """Seed of the target's singular vectors, the initialisation, the fine-tuning shift
    and the Monte Carlo noise."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_out", "hidden", "rank", "pretrain_steps", "finetune_steps"):
            _require(_is_int(getattr(self, name)) and getattr(self, name) > 0, name, "must be a positive integer")
        _require(self.rank <= min(self.d_in, self.d_out), "rank", "must be at most min(d_in, d_out)")
        _require(_is_int(self.n_checkpoints) and self.n_checkpoints >= 3, "n_checkpoints",
                 "must be an integer >= 3 (a U-shape needs an interior point)")
        _require(_is_int(self.perturbation_samples) and self.perturbation_samples >= 0,
                 "perturbation_samples", "must be an integer >= 0")
        _require(_is_int(self.seed), "seed", "must be an integer")
        for name in ("top_singular_value", "init_scale", "pretrain_lr"):
            _require(_is_number(getattr(self, name)) and getattr(self, name) > 0, name, "must be a positive number")
        _require(_is_number(self.spectrum_decay) and 0 < self.spectrum_decay <= 1, "spectrum_decay", "must be in (0, 1]")
        _require(_is_number(self.misalignment) and self.misalignment >= 0, "misalignment", "must be >= 0")
        self._require_grid("gammas", lambda v: v > 0, "positive")
        self._require_grid("finetune_lrs", lambda v: v > 0, "positive")
        self._require_grid("lams", lambda v: v >= 0, "non-negative")

    def _require_grid(self, name: str, ok, wanted: str) -> None:
        values = getattr(self, name)
        _require(isinstance(values, tuple) and len(values) > 0, name, "must be a non-empty list")
        _require(all(_is_number(v) and ok(v) for v in values), name, f"must hold {wanted} numbers")
        _require(list(values) == sorted(set(values)), name, "must be strictly increasing")

    def singular_values(self) -> np.ndarray:
        return self.top_singular_value * self.spectrum_decay ** np.arange(self.rank)

    def checkpoint_times(self) -> np.ndarray:
        return np.unique(np.round(np.geomspace(1, self.pretrain_steps, self.n_checkpoints)).astype(int))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(condition: bool, name: str, problem: str) -> None:
    if not condition:
        raise SpecError(f"theory.{name}: {problem}")


def config_from_dict(section: dict | None) -> TheoryConfig:
    """The `theory:` section of a study file as a config; lists become tuples.

    Unknown keys fail with "theory.<key>: unknown key"; bad values with a message
    naming the key.
    """
    if section is not None and not isinstance(section, dict):
        raise SpecError(f"theory: must be a mapping of keys to values, got {type(section).__name__}")
    section = dict(section or {})
    known = {f.name for f in dataclasses.fields(TheoryConfig)}
    for key in section:
        if key not in known:
            raise SpecError(f"theory.{key}: unknown key (known: {', '.join(sorted(known))})")
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in section.items()}
    return TheoryConfig(**values)


# ---------------------------------------------------------------- targets and weights


@dataclass(frozen=True)
class Targets:
    """The pre-training target A = U diag(s) V^T and the misaligned fine-tuning target B."""

    U: np.ndarray
    s: np.ndarray
    V: np.ndarray
    A: np.ndarray
    B: np.ndarray


def make_targets(config: TheoryConfig, rng: np.random.Generator) -> Targets:
    """Random orthonormal singular vectors for A; B = A + a random shift orthogonal to A."""
    U = _random_orthonormal(rng, config.d_out, config.rank)
    V = _random_orthonormal(rng, config.d_in, config.rank)
    s = config.singular_values()
    A = (U * s) @ V.T
    shift = rng.standard_normal(A.shape)
    shift -= np.sum(shift * A) / np.sum(A * A) * A  # orthogonal to A: a new component, not a rescaling
    shift *= config.misalignment * np.linalg.norm(A) / np.linalg.norm(shift)
    return Targets(U=U, s=s, V=V, A=A, B=A + shift)


def _random_orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def loss(W1: np.ndarray, W2: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0.5 ||W2 W1 - target||_F^2, over the leading (checkpoint) axes if W1, W2 are stacks."""
    residual = W2 @ W1 - target
    return 0.5 * np.sum(residual**2, axis=(-2, -1))


def gradient_step(W1, W2, target, lr, lam=0.0, W1_anchor=None, W2_anchor=None):
    """One step of gradient descent on L_target + lam * ||W - W_anchor||^2 (stacks allowed).

    dL/dW1 = W2^T R and dL/dW2 = R W1^T with R = W2 W1 - target; the penalty adds
    2 lam (W - W_anchor).
    """
    residual = W2 @ W1 - target
    grad1 = np.swapaxes(W2, -1, -2) @ residual
    grad2 = residual @ np.swapaxes(W1, -1, -2)
    if lam:
        grad1 = grad1 + 2 * lam * (W1 - W1_anchor)
        grad2 = grad2 + 2 * lam * (W2 - W2_anchor)
    return W1 - lr * grad1, W2 - lr * grad2


# ---------------------------------------------------------------- the four measurements


def pretrain(config: TheoryConfig, targets: Targets, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradient descent on L_A from a small Gaussian init; weights at every checkpoint.

    Returns (times, W1 stack, W2 stack) with one slice per checkpoint time.
    """
    W1 = config.init_scale * rng.standard_normal((config.hidden, config.d_in))
    W2 = config.init_scale * rng.standard_normal((config.d_out, config.hidden))
    times = config.checkpoint_times()
    W1s, W2s = [], []
    step = 0
    with np.errstate(over="ignore", invalid="ignore"):  # divergence is detected below
        for time in times:
            while step < time:
                W1, W2 = gradient_step(W1, W2, targets.A, config.pretrain_lr)
                step += 1
            W1s.append(W1)
            W2s.append(W2)
    W1s, W2s = np.stack(W1s), np.stack(W2s)
    if not np.all(np.isfinite(W1s)):
        raise SpecError("theory.pretrain_lr: pre-training diverged; use a smaller learning rate")
    return times, W1s, W2s


def learned_singular_values(W1s: np.ndarray, W2s: np.ndarray, targets: Targets) -> np.ndarray:
    """u_i^T (W2 W1) v_i: how much of target direction i the network has learned (checkpoints x rank)."""
    products = W2s @ W1s
    return np.einsum("oi,toj,ji->ti", targets.U, products, targets.V)


def expected_perturbation_increase(W1: np.ndarray, W2: np.ndarray, gamma: float) -> np.ndarray:
    """E[L(W1 + gamma E1, W2 + gamma E2)] - L(W1, W2) for E1, E2 with iid N(0, 1) entries.

    Expanding (W2 + gE2)(W1 + gE1) - A = R + g E2 W1 + g W2 E1 + g^2 E2 E1, every cross
    term has zero mean, so the increase is
        0.5 * (g^2 (d_out ||W1||^2 + d_in ||W2||^2) + g^4 d_out d_in hidden).
    It grows with the weights' norm: the sensitivity that longer pre-training builds.
    """
    hidden, d_in = W1.shape[-2:]
    d_out = W2.shape[-2]
    norm1 = np.sum(W1**2, axis=(-2, -1))
    norm2 = np.sum(W2**2, axis=(-2, -1))
    return 0.5 * (gamma**2 * (d_out * norm1 + d_in * norm2) + gamma**4 * d_out * d_in * hidden)


def monte_carlo_perturbation_increase(W1, W2, target, gamma, samples, rng) -> np.ndarray:
    """The same expectation estimated from `samples` seeded Gaussian draws (checks the closed form)."""
    base = loss(W1, W2, target)
    draws = [loss(W1 + gamma * rng.standard_normal(W1.shape), W2 + gamma * rng.standard_normal(W2.shape), target)
             for _ in range(samples)]
    return np.mean(draws, axis=0) - base


def finetune(W1s, W2s, target, lr: float, steps: int, lam: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Fine-tune every checkpoint at once (stacks) for `steps` steps, penalised toward its own weights."""
    W1, W2 = W1s, W2s
    with np.errstate(over="ignore", invalid="ignore"):  # divergence is detected by the caller
        for _ in range(steps):
            W1, W2 = gradient_step(W1, W2, target, lr, lam, W1s, W2s)
    return W1, W2


# ---------------------------------------------------------------- the whole simulation


@dataclass(frozen=True)
class TheoryResult:
    """Tidy tables of one simulation (time = pre-training steps of the checkpoint).

    learning:     time, direction, target_value, learned_value
    checkpoints:  time, pretrain_loss, weight_norm_sq (||W1||^2 + ||W2||^2)
    perturbation: time, gamma, expected_increase, perturbed_loss
    finetune:     time, lr, lam, pretrain_loss_after, finetune_loss_after
    """

    config: TheoryConfig
    learning: pd.DataFrame
    checkpoints: pd.DataFrame
    perturbation: pd.DataFrame
    finetune: pd.DataFrame
    targets: Targets = field(repr=False)

    def inflection_points(self) -> pd.DataFrame:
        """The checkpoint with the lowest perturbed / post-fine-tuning pre-training loss.

        One row per gamma (probe "perturbation") and per (lr, lam) (probe "finetune"):
        probe, gamma, lr, lam, time, loss, finetune_loss (the fine-tuning task's loss
        at that checkpoint, the cost of the choice) and interior, False when the
        minimum sits on the first or last checkpoint, i.e. the grid shows no U-shape.
        """
        rows = []
        for gamma, curve in self.perturbation.groupby("gamma"):
            best = curve.loc[curve["perturbed_loss"].idxmin()]
            rows.append({"probe": "perturbation", "gamma": gamma, "lr": np.nan, "lam": np.nan, "time": best["time"],
                         "loss": best["perturbed_loss"], "finetune_loss": np.nan})
        for (lr, lam), curve in self.finetune.groupby(["lr", "lam"]):
            best = curve.loc[curve["pretrain_loss_after"].idxmin()]
            rows.append({"probe": "finetune", "gamma": np.nan, "lr": lr, "lam": lam, "time": best["time"],
                         "loss": best["pretrain_loss_after"], "finetune_loss": best["finetune_loss_after"]})
        table = pd.DataFrame(rows)
        table["time"] = table["time"].astype(int)
        times = self.checkpoints["time"]
        table["interior"] = (table["time"] > times.min()) & (table["time"] < times.max())
        return table


def simulate(config: TheoryConfig | None = None) -> TheoryResult:
    """Pre-train, checkpoint, perturb and fine-tune; see the module docstring."""
    config = config or TheoryConfig()
    rng = np.random.default_rng(config.seed)
    targets = make_targets(config, rng)
    times, W1s, W2s = pretrain(config, targets, rng)
    return TheoryResult(
        config=config,
        learning=_learning_table(times, W1s, W2s, targets),
        checkpoints=pd.DataFrame({"time": times, "pretrain_loss": loss(W1s, W2s, targets.A),
                                  "weight_norm_sq": np.sum(W1s**2, axis=(1, 2)) + np.sum(W2s**2, axis=(1, 2))}),
        perturbation=_perturbation_table(config, times, W1s, W2s, targets, rng),
        finetune=_finetune_table(config, times, W1s, W2s, targets),
        targets=targets,
    )


def _learning_table(times, W1s, W2s, targets: Targets) -> pd.DataFrame:
    learned = learned_singular_values(W1s, W2s, targets)
    return pd.DataFrame([
        {"time": time, "direction": i, "target_value": targets.s[i], "learned_value": learned[t, i]}
        for t, time in enumerate(times) for i in range(len(targets.s))
    ])


def _perturbation_table(config, times, W1s, W2s, targets, rng) -> pd.DataFrame:
    base = loss(W1s, W2s, targets.A)
    frames = []
    for gamma in config.gammas:
        if config.perturbation_samples:
            increase = monte_carlo_perturbation_increase(W1s, W2s, targets.A, gamma, config.perturbation_samples, rng)
        else:
            increase = expected_perturbation_increase(W1s, W2s, gamma)
        frames.append(pd.DataFrame({"time": times, "gamma": gamma, "expected_increase": increase,
                                    "perturbed_loss": base + increase}))
    return pd.concat(frames, ignore_index=True)


def _finetune_table(config, times, W1s, W2s, targets) -> pd.DataFrame:
    frames = []
    for lr in config.finetune_lrs:
        for lam in config.lams:
            W1, W2 = finetune(W1s, W2s, targets.B, lr, config.finetune_steps, lam)
            if not np.all(np.isfinite(W1)):
                raise SpecError(f"theory.finetune_lrs: fine-tuning at lr={lr} diverged; use smaller learning rates")
            frames.append(pd.DataFrame({"time": times, "lr": lr, "lam": lam,
                                        "pretrain_loss_after": loss(W1, W2, targets.A),
                                        "finetune_loss_after": loss(W1, W2, targets.B)}))
    return pd.concat(frames, ignore_index=True)
