"""How far fine-tuning moved a model: in weights and in representations.

- `parameter_drift`: ||theta_ft - theta_base|| in total, relative to ||theta_base||,
  and per tensor and per transformer layer.
- `representation_drift`: principal angles between the top-k principal subspaces of
  the base and fine-tuned hidden states at each layer, on held-out text. The
  subspace is that of PCA (centred hidden states): the top-k eigenvectors of the
  hidden-state covariance, accumulated batch by batch in float64 so memory is
  d x d per layer whatever the number of tokens (the same subspace as the top-k
  right singular vectors of the centred token-by-d matrix).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import subspace_angles

from overtrain.probes.curvature import weight_difference
from overtrain.probes.objective import Batch

# --------------------------------------------------------------------------- parameters


@dataclass
class TensorDrift:
    name: str
    layer: str            # "layer_3" for model.layers.3.*, else "other"
    distance: float       # ||theta_ft - theta_base|| of this tensor
    base_norm: float

    @property
    def relative(self) -> float:
        return self.distance / self.base_norm if self.base_norm else math.inf


@dataclass
class ParameterDrift:
    tensors: list[TensorDrift]

    @property
    def distance(self) -> float:
        return math.sqrt(math.fsum(t.distance ** 2 for t in self.tensors))

    @property
    def relative(self) -> float:
        return self.distance / math.sqrt(math.fsum(t.base_norm ** 2 for t in self.tensors))

    def by_layer(self) -> dict[str, float]:
        """L2 distance of each layer's tensors together."""
        squared = defaultdict(list)
        for tensor in self.tensors:
            squared[tensor.layer].append(tensor.distance ** 2)
        return {layer: math.sqrt(math.fsum(values)) for layer, values in squared.items()}

    def to_rows(self) -> list[dict]:
        rows = [{"metric": "param_drift_l2", "value": self.distance},
                {"metric": "param_drift_relative", "value": self.relative}]
        rows += [{"metric": "param_drift_l2", "layer": layer, "value": value}
                 for layer, value in self.by_layer().items()]
        for tensor in self.tensors:
            rows += [{"metric": "param_drift_l2", "tensor": tensor.name, "value": tensor.distance},
                     {"metric": "param_drift_relative", "tensor": tensor.name, "value": tensor.relative}]
        return rows


def parameter_drift(base_model: torch.nn.Module, finetuned_model: torch.nn.Module) -> ParameterDrift:
    base_params = dict(base_model.named_parameters())
    tensors = []
    for name, difference in weight_difference(finetuned_model, base_model).items():
        tensors.append(TensorDrift(name, _layer_of(name), _norm(difference), _norm(base_params[name])))
    return ParameterDrift(tensors)


def _norm(tensor: torch.Tensor) -> float:
    return torch.linalg.vector_norm(tensor.detach().double()).item()


def _layer_of(name: str) -> str:
    match = re.search(r"\blayers\.(\d+)\.", name)
    return f"layer_{match.group(1)}" if match else "other"


# --------------------------------------------------------------------------- representations


@dataclass
class LayerAngles:
    layer: int                # 0 = embeddings, i = output of block i (the last one after the final norm)
    angles_rad: list[float]   # principal angles, largest first

    def to_rows(self) -> list[dict]:
        degrees = np.degrees(self.angles_rad)
        return [{"metric": "repr_angle_mean_deg", "layer": self.layer, "value": float(degrees.mean())},
                {"metric": "repr_angle_max_deg", "layer": self.layer, "value": float(degrees.max())},
                {"metric": "repr_cos_mean", "layer": self.layer, "value": float(np.cos(self.angles_rad).mean())}]


@dataclass
class RepresentationDrift:
    k: int
    n_tokens: int
    layers: list[LayerAngles]

    def to_rows(self) -> list[dict]:
        mean_angle = float(np.mean([np.degrees(layer.angles_rad).mean() for layer in self.layers]))
        rows = [{"metric": "repr_angle_mean_deg", "value": mean_angle}]
        for layer in self.layers:
            rows += layer.to_rows()
        return rows


def representation_drift(base_model: torch.nn.Module, finetuned_model: torch.nn.Module,
                         batches: Sequence[Batch], k: int = 8) -> RepresentationDrift:
    """Principal angles between base and fine-tuned top-k hidden-state subspaces, per layer.

    Tokens: every position with attention_mask 1 (all positions without a mask).
    """
    base = _hidden_state_moments(base_model, batches)
    finetuned = _hidden_state_moments(finetuned_model, batches)
    k = min(k, base[0].dimension)
    layers = [LayerAngles(index, subspace_angles(b.principal_subspace(k), f.principal_subspace(k)).tolist())
              for index, (b, f) in enumerate(zip(base, finetuned))]
    return RepresentationDrift(k, base[0].count, layers)


class _Moments:
    """Running sum and sum of outer products of vectors, in float64."""

    def __init__(self, dimension: int):
        self.dimension = dimension
        self.count = 0
        self.total = torch.zeros(dimension, dtype=torch.float64)
        self.outer = torch.zeros(dimension, dimension, dtype=torch.float64)

    def add(self, vectors: torch.Tensor) -> None:
        vectors = vectors.detach().double().cpu()
        self.count += vectors.shape[0]
        self.total += vectors.sum(0)
        self.outer += vectors.T @ vectors

    def principal_subspace(self, k: int) -> np.ndarray:
        mean = self.total / self.count
        covariance = self.outer / self.count - torch.outer(mean, mean)
        _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
        return vectors[:, -k:].numpy()


@torch.no_grad()
def _hidden_state_moments(model: torch.nn.Module, batches: Sequence[Batch]) -> list[_Moments]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    moments: list[_Moments] = []
    try:
        for batch in batches:
            inputs = {"input_ids": batch["input_ids"].to(device), "use_cache": False, "output_hidden_states": True}
            keep = torch.ones_like(batch["input_ids"], dtype=torch.bool)
            if "attention_mask" in batch:
                inputs["attention_mask"] = batch["attention_mask"].to(device)
                keep = batch["attention_mask"].bool()
            hidden_states = model(**inputs).hidden_states
            if not moments:
                moments = [_Moments(h.shape[-1]) for h in hidden_states]
            for moment, hidden in zip(moments, hidden_states):
                moment.add(hidden[keep.to(hidden.device)])
    finally:
        model.train(was_training)
    return moments
