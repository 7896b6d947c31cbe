import pytest
import torch

from overtrain.models.build import init_stds
from overtrain.probes.perturb import InPlacePerturber, gaussian_sensitivity


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_weights_restored_bit_for_bit(tiny_model):
    before = snapshot(tiny_model)
    perturber = InPlacePerturber(tiny_model, init_stds(tiny_model))
    for gamma, seed in [(0.5, 0), (3.0, 1), (1e3, 2)]:
        with perturber.perturbed(gamma, seed):
            assert any(not torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())
    for name, param in tiny_model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_noise_is_scaled_by_each_tensors_init_std(tiny_model):
    stds = init_stds(tiny_model)
    assert stds["model.norm.weight"] == 0.0 and stds["model.embed_tokens.weight"] == 0.02
    before = snapshot(tiny_model)
    with InPlacePerturber(tiny_model, stds).perturbed(gamma=2.0, seed=0):
        for name, param in tiny_model.named_parameters():
            noise = (param - before[name]) / 2.0
            if stds[name] == 0:
                assert torch.equal(noise, torch.zeros_like(noise)), name
            elif param.numel() >= 1000:
                assert abs(noise.std().item() / stds[name] - 1) < 0.1, name


def test_same_seed_same_noise_other_seed_other_noise(tiny_model):
    perturber = InPlacePerturber(tiny_model, init_stds(tiny_model))
    weight = tiny_model.model.embed_tokens.weight
    draws = []
    for seed in (7, 7, 8):
        with perturber.perturbed(1.0, seed):
            draws.append(weight.detach().clone())
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_sensitivity_rows_grow_with_gamma(tiny_model, byte_corpus):
    from overtrain.probes.loss import heldout_metrics

    batches = byte_corpus.heldout_batches(8, 64, 2048)
    rows = gaussian_sensitivity(tiny_model, init_stds(tiny_model), [1.0, 30.0], [0, 1],
                                lambda m: heldout_metrics(m, batches, byte_corpus.byte_lengths))
    assert [r["gamma"] for r in rows] == [0.0, 1.0, 1.0, 30.0, 30.0]
    small = [r["delta_bpb"] for r in rows if r["gamma"] == 1.0]
    large = [r["delta_bpb"] for r in rows if r["gamma"] == 30.0]
    assert max(map(abs, small)) < min(large)


def test_draws_stacked_as_one_ensemble_measure_what_they_measure_one_by_one(tiny_model, byte_corpus):
    """The same noise bit for bit; the same held-out loss and bpb to float32 rounding."""
    from overtrain.probes.loss import heldout_metrics
    from overtrain.probes.suite import stacked_sensitivity

    batches = byte_corpus.heldout_batches(8, 64, 2048)
    perturber = InPlacePerturber(tiny_model, init_stds(tiny_model))
    with perturber.perturbed(3.0, 1):
        for name, param in tiny_model.named_parameters():
            if name in perturber.params:
                assert torch.equal(perturber.perturbed_copies(3.0, 1)[name], param), name
    one_by_one = gaussian_sensitivity(tiny_model, init_stds(tiny_model), [1.0, 30.0], [0, 1],
                                      lambda m: heldout_metrics(m, batches, byte_corpus.byte_lengths))
    stacked = stacked_sensitivity(tiny_model, [1.0, 30.0], [0, 1], batches, byte_corpus.byte_lengths)
    assert [(r["gamma"], r["seed"]) for r in stacked] == [(r["gamma"], r["seed"]) for r in one_by_one]
    for alone, together in zip(one_by_one, stacked):
        for name in ("loss_nats", "bpb"):
            assert together[name] == pytest.approx(alone[name], rel=1e-6)
            assert together[f"delta_{name}"] == pytest.approx(alone[f"delta_{name}"], rel=1e-4, abs=1e-6)
