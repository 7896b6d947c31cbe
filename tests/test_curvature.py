"""Curvature probes against a dense float64 Hessian of a tiny Llama, and on exact quadratics.

HF Llama computes RMSNorm and the attention softmax in float32 even in a float64
model, so its "float64" Hessian is exact only to ~1e-7 relative; the 1e-8 checks use
a pure float64 quadratic instead.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from overtrain.models.build import build_model
from overtrain.probes import hessian
from overtrain.probes.curvature import curvature_along, forgetting_prediction
from overtrain.probes.hessian import hessian_eigenvalues, hessian_trace
from overtrain.probes.objective import HVP_METHODS, Objective, causal_lm_objective, eager_eval, flatten, unflatten
from overtrain.spec import ModelSize

VOCAB = 32


def tiny_llama() -> torch.nn.Module:
    return build_model(ModelSize(d_model=8, n_layers=1, n_heads=2, max_seq_len=16), VOCAB, seed=0).double()


def heldout_batches() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (3, 10), generator=generator)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    batches[1]["labels"][:, :6] = -100  # batches with unequal token counts: the mean convention matters
    return batches


def reference_loss(model, batches, params) -> torch.Tensor:
    """Sum of all unmasked next-token losses over all batches / their number, written independently."""
    nats, count = 0.0, 0
    for batch in batches:
        logits = functional_call(model, params, (), {"input_ids": batch["input_ids"]}).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        nats = nats + F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    return nats / count


@pytest.fixture(scope="module")
def setup():
    model, batches = tiny_llama(), heldout_batches()
    with pytest.warns(UserWarning, match="eager"):
        objective = causal_lm_objective(model, batches)
    point = flatten(objective.params).clone()
    model.set_attn_implementation("eager")
    dense = torch.autograd.functional.hessian(
        lambda flat: reference_loss(model, batches, unflatten(flat, objective.params)), point, vectorize=True)
    model.set_attn_implementation("sdpa")
    return model, batches, objective, dense


def relative_error(a, b) -> float:
    return float(torch.linalg.norm(torch.as_tensor(a) - torch.as_tensor(b)) / torch.linalg.norm(torch.as_tensor(b)))


def test_loss_is_the_mean_over_all_unmasked_tokens(setup):
    model, batches, objective, _ = setup
    with eager_eval(model):  # the same attention code as the objective: same float32 internals
        expected = reference_loss(model, batches, objective.params).item()
    assert objective.value() == pytest.approx(expected, rel=1e-12)
    mean_of_batch_means = sum(model(**batch).loss.item() for batch in batches) / len(batches)
    assert objective.value() != pytest.approx(mean_of_batch_means, rel=1e-6)


@pytest.mark.parametrize("method", HVP_METHODS)
def test_hvp_equals_dense_hessian_times_vector(setup, method):
    _, _, objective, dense = setup
    vector = torch.randn(objective.dimension, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hvp_objective = Objective(objective.params, objective.terms, objective.context, method)
    product = flatten(hvp_objective.hvp(unflatten(vector, objective.params)))
    assert relative_error(product, dense @ vector) < 1e-6


def test_hvps_from_a_kept_graph_equal_fresh_ones_and_the_gradient(setup):
    _, _, objective, _ = setup
    generator = torch.Generator().manual_seed(2)
    vectors = [unflatten(torch.randn(objective.dimension, dtype=torch.float64, generator=generator), objective.params)
               for _ in range(3)]
    fresh = [objective.gradient_and_hvp(v) for v in vectors]
    with objective.kept_graph():
        kept = [objective.gradient_and_hvp(v) for v in vectors]  # the same graph serves every vector
    for (fresh_gradient, fresh_hvp), (kept_gradient, kept_hvp) in zip(fresh, kept):
        assert torch.equal(flatten(kept_hvp), flatten(fresh_hvp))
        assert torch.equal(flatten(kept_gradient), flatten(fresh_gradient))
    assert objective._kept_graphs is None  # released at the end of the block


def test_writing_to_the_weights_under_a_kept_graph_raises_instead_of_going_stale(setup):
    model, _, objective, _ = setup
    vector = {n: torch.ones_like(p) for n, p in objective.params.items()}
    weight = model.get_input_embeddings().weight
    with objective.kept_graph():
        objective.hvp(vector)
        with torch.no_grad():
            weight.add_(0.0)  # same values, new version: the saved tensors are no longer trusted
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            objective.hvp(vector)


def test_top_eigenvalues_match_dense(setup):
    _, _, objective, dense = setup
    result = hessian_eigenvalues(objective, k=3, tol=1e-8)
    expected = torch.linalg.eigvalsh(dense).flip(0)[:3]
    for value, reference in zip(result.eigenvalues, expected.tolist()):
        assert value == pytest.approx(reference, rel=1e-4)
    assert result.eigenvalues == sorted(result.eigenvalues, reverse=True)
    assert max(result.residuals) < 1e-5 * abs(result.eigenvalues[0])
    assert result.hvps > 3
    rows = {row["metric"]: row["value"] for row in result.to_rows()}
    assert rows["hessian_top_eig"] == result.eigenvalues[0] and rows["hessian_eig_hvps"] == result.hvps
    assert rows["hessian_eig_residual"] == result.residuals[0] and rows["hessian_eig_3"] == result.eigenvalues[2]


def test_a_large_model_keeps_its_lanczos_basis_in_float32_and_still_matches_dense(setup, monkeypatch):
    """Above the size limit (here: any size) the basis halves its memory; the eigenvalues hold."""
    _, _, objective, dense = setup
    monkeypatch.setattr(hessian, "FLOAT64_BASIS_LIMIT_BYTES", 0)
    result = hessian_eigenvalues(objective, k=2, tol=1e-8)
    assert result.eigenvectors.dtype == np.float32
    expected = torch.linalg.eigvalsh(dense).flip(0)[:2]
    for value, reference in zip(result.eigenvalues, expected.tolist()):
        assert value == pytest.approx(reference, rel=1e-4)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_a_few_standard_errors(setup, method):
    _, _, objective, dense = setup
    estimate = hessian_trace(objective, n_hvps=30, seed=0, method=method)
    assert estimate.hvps == 30 and estimate.standard_error > 0
    assert abs(estimate.trace - dense.trace().item()) < 4 * estimate.standard_error


def test_curvature_along_u_matches_dense(setup):
    _, _, objective, dense = setup
    u = torch.randn(objective.dimension, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    result = curvature_along(objective, unflatten(u, objective.params))
    assert result.curvature == pytest.approx((u @ dense @ u / (u @ u)).item(), rel=1e-6)
    assert result.direction_norm == pytest.approx(u.norm().item(), rel=1e-12)


def test_same_seed_same_numbers(setup):
    _, _, objective, _ = setup
    assert hessian_eigenvalues(objective, seed=3).eigenvalues == hessian_eigenvalues(objective, seed=3).eigenvalues
    assert hessian_trace(objective, 6, seed=3) == hessian_trace(objective, 6, seed=3)
    assert hessian_trace(objective, 6, seed=3).trace != hessian_trace(objective, 6, seed=4).trace


def test_probes_leave_weights_attention_and_mode_untouched(setup):
    model, batches, objective, _ = setup
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hessian_eigenvalues(objective)
    hessian_trace(objective, 4, method="hutch++")
    curvature_along(objective, objective.gradient())
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) and param.grad is None, name
    assert model.config._attn_implementation == "sdpa" and model.training


def test_forgetting_prediction_matches_observed_rise_for_a_small_update(setup):
    model, batches, objective, _ = setup
    finetuned = copy.deepcopy(model)
    with torch.no_grad():
        for param in finetuned.parameters():
            param.add_(1e-3 * torch.randn(param.shape, dtype=param.dtype, generator=torch.Generator().manual_seed(5)))
    with pytest.warns(UserWarning, match="eager"):
        result = forgetting_prediction(model, finetuned, batches)
    with eager_eval(finetuned):
        observed = reference_loss(finetuned, batches, dict(finetuned.named_parameters())).item() - objective.value()
    assert result.observed_forgetting_nats == pytest.approx(observed, rel=1e-9)
    # The quadratic model's error is third order in ||u||: well below the second-order term
    # (here first and second order are of the same size, so both must be right).
    assert abs(result.predicted_total_nats - observed) < 0.05 * abs(result.along_update.second_order_nats)
    metrics = {row["metric"] for row in result.to_rows()}
    assert {"curvature_along_u", "predicted_forgetting_nats", "observed_forgetting_nats"} <= metrics


# --------------------------------------------------------------------------- exact quadratics


def quadratic(seed: int = 0, n: int = 12):
    """0.5 (x - x*)^T A (x - x*) with A symmetric, of known spectrum, in float64."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    spectrum = torch.linspace(-2.0, 10.0, n, dtype=torch.float64)
    matrix = basis @ torch.diag(spectrum) @ basis.T
    minimum = torch.randn(n, dtype=torch.float64, generator=generator)

    def loss_fn(params):
        offset = params["x"] - minimum
        return 0.5 * offset @ matrix @ offset

    return loss_fn, matrix, minimum, spectrum, basis


@pytest.mark.parametrize("method", HVP_METHODS)
def test_generic_loss_function_exact(method):
    loss_fn, matrix, minimum, spectrum, _ = quadratic()
    objective = Objective.from_loss_fn(loss_fn, {"x": minimum + 1.0}, hvp_method=method)
    result = hessian_eigenvalues(objective, k=2, tol=1e-12)
    assert result.eigenvalues == pytest.approx(spectrum.flip(0)[:2].tolist(), rel=1e-10)
    u = torch.arange(12, dtype=torch.float64)
    along = curvature_along(objective, {"x": u})
    assert along.curvature == pytest.approx((u @ matrix @ u / (u @ u)).item(), rel=1e-8)
    assert along.first_order_nats == pytest.approx((matrix @ torch.ones(12, dtype=torch.float64) @ u).item(), rel=1e-8)
    assert hessian_trace(objective, 36, method="hutch++").trace == pytest.approx(spectrum.sum().item(), rel=1e-8)
    assert math.isfinite(hessian_trace(objective, 12).standard_error)
