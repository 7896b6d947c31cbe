"""Sharpness without second derivatives: the KL proxy and critical sharpness.

- `kl_sharpness`: mean KL(p_base || p_perturbed) per predicted token between the
  model's next-token distributions and those of its Gaussian-perturbed self
  (theta + gamma * sigma_init * eps, via `InPlacePerturber`), over several seeds.
  Forward passes only: usable on models of 100M+ parameters and wherever double
  backward is not. Memory: one batch of base log-probs at a time, plus the
  perturber's single backup of the noised weights (what makes the restore exact).
- `critical_sharpness`: 2 / eta_c, with eta_c the smallest learning rate at which a
  gradient step, restricted to a line, raises the loss; found with forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from overtrain.models.build import init_stds
from overtrain.probes.objective import Batch, Objective, Params, dot
from overtrain.probes.perturb import InPlacePerturber
from overtrain.probes.scoring import next_token_targets

# --------------------------------------------------------------------------- KL proxy


@dataclass
class KLSharpness:
    """Mean KL(base || perturbed) in nats per predicted token, one value per seed."""

    gamma: float
    seeds: list[int]
    kl_per_seed: list[float]
    n_tokens: int

    @property
    def mean(self) -> float:
        return float(np.mean(self.kl_per_seed))

    @property
    def standard_error(self) -> float:
        if len(self.kl_per_seed) < 2:
            return float("nan")
        return float(np.std(self.kl_per_seed, ddof=1) / math.sqrt(len(self.kl_per_seed)))

    def to_rows(self) -> list[dict]:
        rows = [{"metric": "kl_sharpness", "gamma": self.gamma, "value": self.mean},
                {"metric": "kl_sharpness_se", "gamma": self.gamma, "value": self.standard_error}]
        rows += [{"metric": "kl_nats", "gamma": self.gamma, "seed": seed, "value": kl}
                 for seed, kl in zip(self.seeds, self.kl_per_seed)]
        return rows


def kl_sharpness(model: torch.nn.Module, batches: Sequence[Batch], gamma: float,
                 seeds: Sequence[int] = (0, 1, 2), stds: Mapping[str, float] | None = None) -> KLSharpness:
    """KL between the model's and its perturbed versions' next-token distributions.

    Averaged over every unmasked next-token position of all batches (labels != -100
    after the shift), in float32 at least. Batch by batch: the base log-probs of
    a batch, then each seed's perturbed log-probs of the same batch. The noise of a
    seed is the same for every batch (InPlacePerturber draws it from the seed).
    """
    perturber = InPlacePerturber(model, init_stds(model) if stds is None else stds)
    kl_sums = [0.0] * len(seeds)
    n_tokens = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            base = _next_token_log_probs(model, batch)
            for index, seed in enumerate(seeds):
                with perturber.perturbed(gamma, seed):
                    perturbed = _next_token_log_probs(model, batch)
                kl_sums[index] += F.kl_div(perturbed, base, log_target=True, reduction="sum").double().item()
            n_tokens += base.shape[0]
    finally:
        model.train(was_training)
    if n_tokens == 0:
        raise ValueError("the batches hold no unmasked next-token label")
    return KLSharpness(gamma, list(seeds), [total / n_tokens for total in kl_sums], n_tokens)


@torch.no_grad()
def _next_token_log_probs(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Log-probs [predicted positions, vocab] at the positions whose next-token label is unmasked."""
    device = next(model.parameters()).device
    inputs = {"input_ids": batch["input_ids"].to(device), "use_cache": False}
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"].to(device)
    predictions, _ = next_token_targets(model(**inputs).logits, batch["labels"])
    return F.log_softmax(predictions, dim=-1)


# --------------------------------------------------------------------------- critical sharpness


@dataclass
class CriticalSharpness:
    """2 / eta_c along a unit direction d, for the step theta - eta (g.d) d."""

    critical_step: float      # eta_c (upper end of the final bracket: a step that raises the loss)
    bracket: tuple[float, float]
    loss_evaluations: int
    base_loss_nats: float

    @property
    def sharpness(self) -> float:
        return 2.0 / self.critical_step

    def to_rows(self) -> list[dict]:
        return [{"metric": "critical_sharpness", "value": self.sharpness},
                {"metric": "critical_lr", "value": self.critical_step},
                {"metric": "loss_evaluations", "value": self.loss_evaluations}]


def critical_sharpness(objective: Objective, direction: Params | None = None, initial_step: float = 1e-2,
                       rtol: float = 1e-3, max_evaluations: int = 200) -> CriticalSharpness:
    """2 / eta_c, with eta_c the smallest learning rate eta at which the step
    theta - eta * (g.d) * d raises the loss above L(theta).

    d is `direction` normalised (default: the negative gradient, which makes the step
    plain gradient descent theta - eta g). On a quadratic loss the loss rises exactly
    when eta > 2 / (d^T H d), so the result is the curvature along d (the top
    eigenvalue along the top eigenvector). Search: from `initial_step`, double (or
    halve) until a step that raises the loss and one that does not bracket eta_c,
    then bisect until the bracket's width is at most `rtol` times its upper end. On a
    non-convex line this finds the first rise seen on the geometric grid.
    """
    gradient = objective.gradient()
    direction = {n: -g for n, g in gradient.items()} if direction is None else direction
    norm = math.sqrt(dot(direction, direction))
    if norm == 0:
        raise ValueError("the direction is zero (at a stationary point the default direction is undefined)")
    slope = dot(gradient, direction) / norm  # g.d for the unit direction d
    if slope == 0:
        raise ValueError("the direction is orthogonal to the gradient: a step along it does not descend")
    # theta + eta * shift is the step; shift = -(g.d) d
    shift = {n: -(slope / norm) * u for n, u in direction.items()}
    base_loss = objective.value()
    evaluations = 0

    def rises(step: float) -> bool:
        nonlocal evaluations
        if evaluations >= max_evaluations:
            raise RuntimeError(f"critical sharpness: no {rtol} bracket within {max_evaluations} loss evaluations")
        evaluations += 1
        trial = {n: p + step * shift[n] for n, p in objective.params.items()}
        return objective.value(trial) > base_loss

    low, high = _geometric_bracket(rises, initial_step)
    while high - low > rtol * high:
        middle = 0.5 * (low + high)
        if rises(middle):
            high = middle
        else:
            low = middle
    return CriticalSharpness(high, (low, high), evaluations, base_loss)


def _geometric_bracket(rises, step: float) -> tuple[float, float]:
    """(low, high = 2 low): the loss does not rise at `low` and rises at `high`."""
    if rises(step):
        while True:
            smaller = step / 2
            if not rises(smaller):
                return smaller, step
            step = smaller
    while not rises(2 * step):
        step *= 2
    return step, 2 * step
