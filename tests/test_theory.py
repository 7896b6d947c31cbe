"""The linear-network theory: every effect the paper's theory claims, asserted on seeded runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from overtrain.theory.linear import (
    TheoryConfig,
    config_from_dict,
    expected_perturbation_increase,
    monte_carlo_perturbation_increase,
    simulate,
)
from overtrain.theory.plots import plot_theory
from overtrain.theory.run import run_theory, summary_markdown, summary_tables, written_summary


@pytest.fixture(scope="module")
def result():
    return simulate(TheoryConfig())


def _minima(result, probe: str) -> pd.DataFrame:
    points = result.inflection_points()
    return points[points["probe"] == probe]


def _non_increasing_and_earlier_at_the_end(times) -> bool:
    times = np.asarray(times)
    return bool(np.all(np.diff(times) <= 0) and times[-1] < times[0])


# ---------------------------------------------------------------- pre-training


def test_directions_are_learned_one_after_another(result):
    learning = result.learning
    half_times = []
    for direction, curve in learning.groupby("direction"):
        reached = curve[curve["learned_value"] >= curve["target_value"] / 2]
        assert not reached.empty, f"direction {direction} never reached half its target value"
        half_times.append(reached["time"].min())
    assert np.all(np.diff(half_times) > 0), half_times
    final = learning[learning["time"] == learning["time"].max()]
    np.testing.assert_allclose(final["learned_value"], final["target_value"], rtol=1e-3)


def test_pretraining_loss_falls_to_zero(result):
    losses = result.checkpoints["pretrain_loss"].to_numpy()
    assert np.all(np.diff(losses) <= 1e-12)
    assert losses[-1] < 1e-6 * losses[0]


def test_sensitivity_grows_with_pretraining_time(result):
    for gamma, curve in result.perturbation.groupby("gamma"):
        increase = curve.sort_values("time")["expected_increase"].to_numpy()
        # Once every direction is learned the norm is flat; unused hidden units may shrink it by ~1e-7.
        assert np.all(np.diff(increase) >= -1e-6 * increase[-1]), gamma
        assert increase[-1] > 2 * increase[0], gamma


# ---------------------------------------------------------------- (b) Gaussian perturbation


def test_closed_form_matches_monte_carlo():
    W1 = np.random.default_rng(1).standard_normal((6, 5))
    W2 = np.random.default_rng(2).standard_normal((4, 6))
    target = np.random.default_rng(3).standard_normal((4, 5))
    for gamma in (0.1, 0.5):
        exact = expected_perturbation_increase(W1, W2, gamma)
        estimate = monte_carlo_perturbation_increase(W1, W2, target, gamma, 20000, np.random.default_rng(0))
        assert estimate == pytest.approx(exact, rel=0.03)


def test_monte_carlo_option_reproduces_the_closed_form_curves(result):
    sampled = simulate(TheoryConfig(perturbation_samples=400))
    np.testing.assert_allclose(sampled.perturbation["expected_increase"],
                               result.perturbation["expected_increase"], rtol=0.1)


def _assert_u_shaped(curve, column: str, first_above: float, last_above: float, label) -> None:
    """An interior minimum, with both ends above it by the given factors."""
    loss = curve.sort_values("time")[column].to_numpy()
    bottom = loss.min()
    assert 0 < loss.argmin() < len(loss) - 1, label
    assert loss[0] > first_above * bottom and loss[-1] > last_above * bottom, label


def test_perturbed_loss_is_u_shaped_with_a_clear_interior_minimum(result):
    for gamma, curve in result.perturbation.groupby("gamma"):
        _assert_u_shaped(curve, "perturbed_loss", 1.05, 1.02, gamma)
    assert _minima(result, "perturbation")["interior"].all()


def test_larger_perturbations_move_the_minimum_earlier(result):
    minima = _minima(result, "perturbation").sort_values("gamma")
    assert _non_increasing_and_earlier_at_the_end(minima["time"]), minima


# ---------------------------------------------------------------- (c) fine-tuning, (d) regularization


def test_pretraining_loss_after_finetuning_is_u_shaped(result):
    unregularized = result.finetune[result.finetune["lam"] == 0]
    for lr, curve in unregularized.groupby("lr"):
        _assert_u_shaped(curve, "pretrain_loss_after", 1.2, 1.05, lr)
    assert _minima(result, "finetune")["interior"].all()


def test_larger_finetuning_lrs_move_the_minimum_earlier(result):
    for lam, minima in _minima(result, "finetune").groupby("lam"):
        assert _non_increasing_and_earlier_at_the_end(minima.sort_values("lr")["time"]), lam


def test_regularization_delays_the_minimum(result):
    for lr, minima in _minima(result, "finetune").groupby("lr"):
        times = minima.sort_values("lam")["time"].to_numpy()
        assert np.all(np.diff(times) >= 0), (lr, times)
        assert times[-1] > times[0], (lr, times)


def test_regularization_raises_the_finetuning_loss(result):
    table = result.finetune.pivot_table(index="time", columns=["lr", "lam"], values="finetune_loss_after")
    lams = result.config.lams
    for lr in result.config.finetune_lrs:
        for weaker, stronger in zip(lams, lams[1:]):
            assert np.all(table[(lr, stronger)] > table[(lr, weaker)]), (lr, weaker, stronger)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_effects_hold_for_other_seeds(seed):
    minima = simulate(TheoryConfig(seed=seed)).inflection_points()
    assert minima["interior"].all()
    assert _non_increasing_and_earlier_at_the_end(minima[minima["probe"] == "perturbation"]["time"])
    finetune = minima[minima["probe"] == "finetune"]
    assert _non_increasing_and_earlier_at_the_end(finetune[finetune["lam"] == 0].sort_values("lr")["time"])
    for lr, by_lam in finetune.groupby("lr"):
        assert np.all(np.diff(by_lam.sort_values("lam")["time"]) >= 0), lr


# ---------------------------------------------------------------- config, determinism, plots


@pytest.mark.parametrize("field, value", [
    ("d_in", 0), ("hidden", 2.5), ("seed", True), ("rank", 30), ("n_checkpoints", 2), ("spectrum_decay", 1.5),
    ("init_scale", -1.0), ("pretrain_lr", float("nan")), ("gammas", ()), ("gammas", (0.2, 0.1)),
    ("finetune_lrs", (0.0,)), ("lams", (-0.1,)), ("misalignment", -0.5), ("perturbation_samples", -1),
])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^theory\.{field}: "):
        TheoryConfig(**{field: value})


def test_config_from_dict_reads_a_study_section():
    config = config_from_dict({"gammas": [0.1, 0.4], "seed": 3})
    assert config.gammas == (0.1, 0.4) and config.seed == 3
    assert config_from_dict(None) == TheoryConfig()
    with pytest.raises(ValueError, match=r"^theory\.foo: unknown key"):
        config_from_dict({"foo": 1})
    with pytest.raises(ValueError, match=r"^theory\.lams: "):
        config_from_dict({"lams": [0.2, 0.1]})


def test_divergence_is_reported_as_a_config_error():
    with pytest.raises(ValueError, match=r"^theory\.pretrain_lr: .*diverged"):
        simulate(TheoryConfig(pretrain_lr=2.0))
    with pytest.raises(ValueError, match=r"^theory\.finetune_lrs: .*diverged"):
        simulate(TheoryConfig(finetune_lrs=(5.0,)))


def test_simulation_is_deterministic(result):
    again = simulate(TheoryConfig())
    for name in ("learning", "checkpoints", "perturbation", "finetune"):
        pd.testing.assert_frame_equal(getattr(result, name), getattr(again, name))
    other_seed = simulate(TheoryConfig(seed=1))
    assert not np.allclose(other_seed.finetune["pretrain_loss_after"], result.finetune["pretrain_loss_after"])


def test_summary_lists_every_minimum(result):
    text = summary_markdown(result)
    assert text.count("| True") == len(result.config.gammas) + len(result.config.finetune_lrs) * len(result.config.lams)


def test_the_folder_holds_the_summary_the_report_reads_back(tmp_path):
    config = TheoryConfig(pretrain_steps=2000, n_checkpoints=12)
    result = run_theory(config, tmp_path)
    assert (tmp_path / "summary.md").read_text() == summary_markdown(result)
    assert summary_markdown(result).startswith("# Theory: two-layer linear network\n")
    written = written_summary(tmp_path)
    assert [table.caption for table in written] == [table.caption for table in
                                                    summary_tables(result.inflection_points(), result.finetune)]
    assert written[1].frame["interior"].tolist() == summary_tables(result.inflection_points(),
                                                                    result.finetune)[1].frame["interior"].tolist()
    assert written_summary(tmp_path / "elsewhere") == []


def test_plots_are_written(result, tmp_path):
    paths = plot_theory(result, tmp_path / "theory")
    assert [p.name for p in paths] == ["incremental_learning.png", "perturbation.png", "finetune_lr.png",
                                       "regularization.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_aligned_finetuning_never_hurts():
    """Control: fine-tuning on the pre-training task itself (misalignment 0) has no inflection."""
    minima = simulate(TheoryConfig(misalignment=0.0, lams=(0.0,))).inflection_points()
    finetune = minima[minima["probe"] == "finetune"]
    assert (finetune["time"] == TheoryConfig().pretrain_steps).all()
    assert not finetune["interior"].any()


def test_example_study_section_holds_the_defaults():
    example = Path(__file__).parents[1] / "examples" / "theory.yaml"
    assert config_from_dict(yaml.safe_load(example.read_text())["theory"]) == TheoryConfig()
