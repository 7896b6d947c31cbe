"""Curvature of the held-out loss along one direction, and the forgetting it predicts.

- `curvature_along`: u^T H u / ||u||^2 and the first- and second-order terms of the
  Taylor expansion of L along u (one HVP, which also yields the gradient);
- `forgetting_prediction`: that expansion for u = theta_finetuned - theta_base set
  beside the observed rise in loss;
- `weight_difference`: u itself, by parameter name.

L is an `Objective` (probes/objective.py); H is never formed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from overtrain.errors import CheckpointError
from overtrain.probes.objective import Batch, Objective, Params, causal_lm_objective, dot


@dataclass
class DirectionalCurvature:
    """Taylor expansion of the loss along u: L(theta + u) ~ L + g^T u + 0.5 u^T H u."""

    curvature: float          # u^T H u / ||u||^2
    direction_norm: float     # ||u||
    first_order_nats: float   # g^T u
    second_order_nats: float  # 0.5 u^T H u

    def to_rows(self) -> list[dict]:
        return [{"metric": "curvature_along_u", "value": self.curvature},
                {"metric": "u_norm", "value": self.direction_norm},
                {"metric": "first_order_term_nats", "value": self.first_order_nats},
                {"metric": "predicted_forgetting_nats", "value": self.second_order_nats}]


def curvature_along(objective: Objective, direction: Params) -> DirectionalCurvature:
    """Curvature and Taylor terms along `direction` (one HVP, which also yields g)."""
    gradient, product = objective.gradient_and_hvp(direction)
    norm_squared = dot(direction, direction)
    if norm_squared == 0:
        raise ValueError("the direction is zero")
    u_h_u = dot(direction, product)
    return DirectionalCurvature(u_h_u / norm_squared, math.sqrt(norm_squared), dot(gradient, direction), 0.5 * u_h_u)


@dataclass
class ForgettingPrediction:
    """Predicted (quadratic model at the base weights) and observed rise of the held-out loss."""

    along_update: DirectionalCurvature
    base_loss_nats: float
    finetuned_loss_nats: float

    @property
    def observed_forgetting_nats(self) -> float:
        return self.finetuned_loss_nats - self.base_loss_nats

    @property
    def predicted_total_nats(self) -> float:
        return self.along_update.first_order_nats + self.along_update.second_order_nats

    def to_rows(self) -> list[dict]:
        return [*self.along_update.to_rows(),
                {"metric": "predicted_forgetting_total_nats", "value": self.predicted_total_nats},
                {"metric": "observed_forgetting_nats", "value": self.observed_forgetting_nats},
                {"metric": "base_loss_nats", "value": self.base_loss_nats},
                {"metric": "finetuned_loss_nats", "value": self.finetuned_loss_nats}]


def weight_difference(finetuned: torch.nn.Module, base: torch.nn.Module) -> Params:
    """theta_finetuned - theta_base by parameter name (the models must share names and shapes)."""
    base_params = dict(base.named_parameters())
    finetuned_params = dict(finetuned.named_parameters())
    if base_params.keys() != finetuned_params.keys():
        missing = sorted(base_params.keys() ^ finetuned_params.keys())[:5]
        raise CheckpointError(f"the models' parameters differ, e.g. {missing}")
    return {n: (finetuned_params[n].detach() - p.detach()) for n, p in base_params.items()}


def forgetting_prediction(base_model: torch.nn.Module, finetuned_model: torch.nn.Module,
                          batches: Sequence[Batch], hvp_method: str = "double_backward") -> ForgettingPrediction:
    """0.5 u^T H u (and g^T u) at the base weights for u = theta_ft - theta_base, beside
    the observed L(theta_ft) - L(theta_base) on the same batches with the same loss."""
    objective = causal_lm_objective(base_model, batches, hvp_method)
    update = weight_difference(finetuned_model, base_model)
    along_update = curvature_along(objective, update)
    finetuned_params = {n: p.detach() for n, p in finetuned_model.named_parameters()}
    return ForgettingPrediction(along_update, objective.value(), objective.value(finetuned_params))
