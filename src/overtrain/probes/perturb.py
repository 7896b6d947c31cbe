"""Gaussian weight perturbation scaled by each tensor's init std, in place.

theta' = theta + gamma * sigma_init * eps, eps ~ N(0, I), with sigma_init the std of
the tensor's initialisation (0 for tensors initialised to a constant, which therefore
get no noise). The model is perturbed in place and restored bit for bit from one
backup of the noised tensors taken per probe, never one copy per perturbation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch


class InPlacePerturber:
    """Adds seeded Gaussian noise to a model's weights and takes it away exactly."""

    def __init__(self, model: torch.nn.Module, stds: Mapping[str, float]):
        self.params = {n: p for n, p in model.named_parameters() if stds.get(n, 0.0) > 0}
        self.stds = {n: float(stds[n]) for n in self.params}
        # One backup for the whole probe: (x + e) - e is not x in floating point.
        self.backup = {n: p.detach().clone() for n, p in self.params.items()}

    @contextmanager
    def perturbed(self, gamma: float, seed: int) -> Iterator[None]:
        """Within the block the weights are perturbed; afterwards they are exactly back."""
        try:
            with torch.no_grad():
                for index, (name, param) in enumerate(sorted(self.params.items())):
                    param.add_(self.noise(param, seed, index), alpha=gamma * self.stds[name])
            yield
        finally:
            self.restore()

    def perturbed_copies(self, gamma: float, seed: int) -> dict[str, torch.Tensor]:
        """The noised tensors that `perturbed(gamma, seed)` sets, as new tensors, bit for bit the
        same (e.g. to stack many draws as the members of one ensemble)."""
        with torch.no_grad():
            return {name: self.backup[name].clone().add_(self.noise(param, seed, index), alpha=gamma * self.stds[name])
                    for index, (name, param) in enumerate(sorted(self.params.items()))}

    @staticmethod
    def noise(param: torch.Tensor, seed: int, index: int) -> torch.Tensor:
        # Draw on the CPU from a generator per tensor: the same seed gives the same
        # noise on every device and whatever the order the tensors are visited in.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        eps = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        return eps.to(device=param.device, dtype=param.dtype)

    def restore(self) -> None:
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.backup[name])


def gaussian_sensitivity(
    model: torch.nn.Module,
    stds: Mapping[str, float],
    gammas: list[float],
    seeds: list[int],
    evaluate: Callable[[torch.nn.Module], dict[str, float]],
) -> list[dict]:
    """Metrics of the base model and of each (gamma, seed) perturbation of it.

    Returns tidy rows: {gamma, seed, <metric>, delta_<metric>} with gamma=0 for the
    unperturbed model. `evaluate` maps the model to metrics such as loss_nats and bpb.
    """
    base = evaluate(model)
    perturber = InPlacePerturber(model, stds)
    measured = []
    for gamma in gammas:
        for seed in seeds:
            with perturber.perturbed(gamma, seed):
                measured.append(((gamma, seed), evaluate(model)))
    return sensitivity_entries(base, measured)


def sensitivity_entries(base: dict[str, float], measured: list[tuple[tuple[float, int], dict[str, float]]]) -> list[dict]:
    """Tidy rows {gamma, seed, <metric>, delta_<metric>} of the unperturbed model's metrics (gamma 0,
    seed -1) and of each ((gamma, seed), metrics) drawn."""
    return [{"gamma": 0.0, "seed": -1, **base, **{f"delta_{k}": 0.0 for k in base}}] + [
        {"gamma": gamma, "seed": seed, **metrics, **{f"delta_{k}": metrics[k] - base[k] for k in base}}
        for (gamma, seed), metrics in measured]
