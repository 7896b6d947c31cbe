"""Independent pre-training runs (`pretrain.seeds`) on a real tiny study: two runs of the
constant schedule, checkpoints at four budgets, each probed with two noise seeds."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_study import checkpoint_hashes, tiny_study
from typer.testing import CliRunner

from overtrain.analysis import claims, tables
from overtrain.cli import app
from overtrain.spec import parse_spec
from overtrain.study.runner import run_study
from overtrain.study.store import load_results

BUDGETS = [256, 512, 1024, 2048]  # 2 to 16 steps of 4 x 32 tokens


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    inputs = tmp_path_factory.mktemp("inputs")
    study = tiny_study(inputs, pretrain={"budgets": BUDGETS, "schedules": ["constant"], "seeds": [0, 1]},
                       sensitivity={"gammas": [1.0], "seeds": [0, 1]}, finetune=None)
    run_dir = tmp_path_factory.mktemp("pretrain_seeds") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(inputs)
        run_study(parse_spec(study), run_dir, workers=0)
    return run_dir


@pytest.fixture(scope="module")
def results(run_dir):
    return load_results(run_dir)


def test_each_pre_training_seed_trains_its_own_checkpoints(run_dir):
    hashes = checkpoint_hashes(run_dir)
    assert set(hashes) == {f"constant-{t}{suffix}" for t in BUDGETS for suffix in ("", "-seed1")}
    for tokens in BUDGETS:
        assert hashes[f"constant-{tokens}"] != hashes[f"constant-{tokens}-seed1"]
    assert len(set(hashes.values())) == len(hashes)


def test_every_row_about_a_checkpoint_names_its_pre_training_seed(results):
    probes = results[results["kind"] == "probe"]
    assert probes["pretrain_seed"].notna().all()
    from_seed1 = probes["checkpoint"].str.endswith("-seed1")
    assert (probes.loc[from_seed1, "pretrain_seed"] == 1).all() and (probes.loc[~from_seed1, "pretrain_seed"] == 0).all()
    assert set(results.loc[results["kind"] == "pretrain", "pretrain_seed"]) == {0, 1}


def widths(points) -> np.ndarray:
    summary = tables.mean_with_ci(points, ["tokens"])
    return (summary["ci_high"] - summary["ci_low"]).to_numpy(dtype=float)


def test_intervals_widen_when_the_replicates_are_pre_training_runs(results):
    # With one run, the replicates of the increase under noise are two noise draws on the
    # same weights: its interval says nothing about how another run would have come out.
    # With two runs, each replicate is a run's mean over its draws, and the runs differ by
    # their own initialisation and data order (0.07 bpb apart at 256 tokens, where the two
    # draws on one run are 0.001 apart). Measured: 0.70-1.1 bpb wide against 0.01-0.54,
    # 2.8 times as wide on average. (A slope across budgets need not widen: a run's level
    # cancels in it, so only how the runs' curves differ in shape counts.)
    delta = tables.probe_points(results, "delta_bpb")
    both, seed0 = widths(delta), widths(delta[delta["pretrain_seed"] == 0])
    assert both.mean() > 1.5 * seed0.mean()

    # The clean held-out bpb has no second-level seed: one run gives no interval at all.
    bpb = tables.probe_points(results, "bpb")
    assert np.isnan(widths(bpb[bpb["pretrain_seed"] == 0])).all()
    assert (widths(bpb) > 0).all()


def test_tests_count_pre_training_runs_as_replicates(results):
    one_run = results[results["pretrain_seed"].fillna(0) == 0]
    for rows, unit, replicates in ((results, "pre-training seed", 2), (one_run, "seed", 2)):
        table = dict(claims.progressive_sensitivity(rows).tables)["sensitivity_trend"]
        assert table["unit"].tolist() == [unit] and table["replicates"].tolist() == [replicates]


def test_the_study_reference_documents_pretrain_seeds():
    output = CliRunner().invoke(app, ["keys"]).output
    assert "`pretrain.seeds`" in output and "`{schedule}-{tokens}-seed{S}`" in output
