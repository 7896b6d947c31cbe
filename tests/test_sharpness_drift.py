"""KL sharpness, critical sharpness, parameter and representation drift."""

import copy
import math

import pytest
import torch

from overtrain.models.build import build_model
from overtrain.probes.curvature import curvature_along
from overtrain.probes.drift import parameter_drift, representation_drift
from overtrain.probes.objective import Objective, causal_lm_objective
from overtrain.probes.sharpness import critical_sharpness, kl_sharpness
from overtrain.spec import ModelSize

VOCAB = 64


@pytest.fixture()
def model():
    return build_model(ModelSize(d_model=16, n_layers=2, n_heads=2, max_seq_len=32), VOCAB, seed=0)


@pytest.fixture()
def batches():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 4, 16), generator=generator)
    batches = [{"input_ids": i, "labels": i.clone()} for i in ids]
    batches[0]["labels"][:, :4] = -100
    return batches


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model, before):
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def nudged_copy(model, scale: float, seed: int = 1):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return other


# --------------------------------------------------------------------------- KL sharpness


def test_kl_is_zero_at_gamma_zero_and_grows_with_gamma(model, batches):
    before = snapshot(model)
    assert kl_sharpness(model, batches, gamma=0.0).kl_per_seed == [0.0, 0.0, 0.0]
    means = [kl_sharpness(model, batches, gamma).mean for gamma in (0.5, 2.0, 8.0)]
    assert 0 < means[0] < means[1] < means[2]
    assert_unchanged(model, before)


def test_kl_is_deterministic_and_reports_its_standard_error(model, batches):
    first, second = (kl_sharpness(model, batches, 1.0, seeds=(3, 4, 5)) for _ in range(2))
    assert first == second
    assert first.n_tokens == 2 * 4 * 15 - 4 * 3  # label 0 is never predicted: 3 masked per row
    rows = {row["metric"]: row["value"] for row in first.to_rows() if "seed" not in row}
    assert rows["kl_sharpness"] == pytest.approx(first.mean) and rows["kl_sharpness_se"] > 0


# --------------------------------------------------------------------------- critical sharpness


def quadratic(n: int = 8):
    """0.5 x^T A x with A symmetric positive definite, of known spectrum and eigenbasis."""
    basis, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    spectrum = torch.linspace(0.5, 6.0, n, dtype=torch.float64)
    matrix = basis @ torch.diag(spectrum) @ basis.T
    return (lambda params: 0.5 * params["x"] @ matrix @ params["x"]), matrix, spectrum, basis


def test_critical_sharpness_along_top_eigenvector_is_the_top_eigenvalue():
    loss_fn, _, spectrum, basis = quadratic()
    objective = Objective.from_loss_fn(loss_fn, {"x": 0.3 * basis[:, -1]})  # gradient along the top eigenvector
    result = critical_sharpness(objective, rtol=1e-6)
    assert result.sharpness == pytest.approx(spectrum[-1].item(), rel=1e-5)


def test_critical_sharpness_along_a_given_direction_is_its_curvature():
    loss_fn, matrix, _, _ = quadratic()
    objective = Objective.from_loss_fn(loss_fn, {"x": torch.linspace(-1, 1, 8, dtype=torch.float64)})
    direction = torch.tensor([1.0, 0, 2, 0, -1, 0, 0, 3], dtype=torch.float64)
    result = critical_sharpness(objective, {"x": direction}, initial_step=5.0, rtol=1e-6)
    expected = (direction @ matrix @ direction / (direction @ direction)).item()
    assert result.sharpness == pytest.approx(expected, rel=1e-5)
    assert result.bracket[1] - result.bracket[0] <= 1e-6 * result.bracket[1]


def test_critical_sharpness_of_a_language_model_is_near_the_curvature_along_the_gradient(model, batches):
    before = snapshot(model)
    with pytest.warns(UserWarning, match="eager"):
        objective = causal_lm_objective(model, batches)
    result = critical_sharpness(objective)
    along_gradient = curvature_along(objective, objective.gradient()).curvature
    assert 0.3 < result.sharpness / along_gradient < 3  # equal for a quadratic; close for a smooth loss
    assert critical_sharpness(objective) == result
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- drift


def test_parameter_drift_totals_and_per_tensor_rows(model):
    finetuned = copy.deepcopy(model)
    with torch.no_grad():
        finetuned.model.layers[1].mlp.up_proj.weight.add_(0.5)
    drift = parameter_drift(model, finetuned)
    up_proj = finetuned.model.layers[1].mlp.up_proj.weight
    assert drift.distance == pytest.approx(0.5 * math.sqrt(up_proj.numel()), rel=1e-6)
    assert drift.by_layer() == {"other": 0.0, "layer_0": 0.0, "layer_1": pytest.approx(drift.distance)}
    base_norm = math.sqrt(sum(p.detach().double().pow(2).sum().item() for p in model.parameters()))
    assert drift.relative == pytest.approx(drift.distance / base_norm, rel=1e-9)
    rows = drift.to_rows()
    assert {"metric": "param_drift_l2", "tensor": "model.layers.1.mlp.up_proj.weight",
            "value": pytest.approx(drift.distance)} in rows


def test_representation_drift_is_zero_for_the_same_model_and_grows_with_change(model, batches):
    same = representation_drift(model, copy.deepcopy(model), batches, k=4)
    assert len(same.layers) == 3  # embeddings + 2 blocks
    assert max(max(layer.angles_rad) for layer in same.layers) < 1e-5
    small, large = (representation_drift(model, nudged_copy(model, scale), batches, k=4) for scale in (0.002, 0.05))
    mean_angle = [{row["metric"]: row["value"] for row in r.to_rows() if "layer" not in row}["repr_angle_mean_deg"]
                  for r in (small, large)]
    assert 0 < mean_angle[0] < mean_angle[1]
