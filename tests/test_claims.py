"""The reproduction's claim checks, on results whose answer is known, and the page on a real tiny run."""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from overtrain.analysis import claims

BUDGETS = [2**20 * 2**k for k in range(6)]  # 1M to 32M tokens
U_MINIMUM = 2**22  # 4M tokens


def _row(**fields) -> dict:
    base = {"cell": None, "kind": None, "checkpoint": None, "schedule": None, "decayed": None, "tokens": None,
            "task": None, "lr": None, "gamma": None, "seed": None, "step": None, "mitigation": None, "metric": None,
            "value": None}
    return {**base, **fields}


def _checkpoint(schedule: str, tokens: int) -> dict:
    return {"checkpoint": f"{schedule}-{tokens}", "schedule": schedule, "decayed": int(schedule != "constant"),
            "tokens": tokens}


def probe_rows(metric: str, value, gammas=(0.5, 1.0), seeds=3, schedules=("constant", "wsd"), rng_seed=0) -> list[dict]:
    """value(schedule, gamma, log2 tokens) plus small seed noise."""
    rng = np.random.default_rng(rng_seed)
    return [_row(kind="probe", metric=metric, gamma=g, seed=s, value=value(sch, g, np.log2(t)) + rng.normal(0, 0.002),
                 **_checkpoint(sch, t))
            for sch in schedules for g in gammas for t in BUDGETS for s in range(seeds)]


def finetune_rows(after, before=lambda sch, t: 2.0, seeds=3, lrs=(1e-3, 3e-3), rng_seed=0,
                  task_bpb=lambda lr, x: 3.0 - 0.01 * x) -> list[dict]:
    """Per run: ood_bpb at step 0 (`before`) and at step 100 (`after(schedule, lr, log2 tokens)` + noise)."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for sch in ("constant", "wsd"):
        for t in BUDGETS:
            for lr in lrs:
                for s in range(seeds):
                    cell = f"{sch}-{t}-{lr}-{s}"
                    common = {"cell": cell, "kind": "finetune", "task": "math", "lr": lr, "seed": s, **_checkpoint(sch, t)}
                    rows.append(_row(step=0, metric="ood_bpb", value=before(sch, t), **common))
                    rows.append(_row(step=100, metric="ood_bpb", value=after(sch, lr, np.log2(t)) + rng.normal(0, 0.005),
                                     **common))
                    rows.append(_row(step=100, metric="id_bpb", value=task_bpb(lr, np.log2(t)), **common))
    return rows


def test_sensitivity_that_rises_with_tokens_everywhere_reproduces_claim_1():
    rising = claims.progressive_sensitivity(pd.DataFrame(probe_rows("delta_bpb", lambda s, g, x: g * x)), 200, 0)
    assert rising.holds and rising.tables[0][1]["rho"].min() > 0.99


def test_one_gamma_whose_sensitivity_falls_breaks_claim_1_and_is_named():
    mixed = claims.progressive_sensitivity(
        pd.DataFrame(probe_rows("delta_bpb", lambda s, g, x: g * x if g < 1 else -x)), 200, 0)
    assert mixed.holds is False and "gamma 1" in mixed.finding and "-1.00" in mixed.finding


def test_perturbed_minimum_that_moves_earlier_with_noise_reproduces_claim_2():
    def perturbed(schedule, gamma, x):  # the bottom of the U sits at 2^(24 - 2 gamma) tokens
        return 0.05 * (x - (24 - 2 * gamma)) ** 2

    found = claims.perturbation_u(pd.DataFrame(probe_rows("perturbed_bpb", perturbed)), 200, 0)
    assert found.holds, found.finding
    minima = found.tables[0][1].query("schedule == 'constant'").sort_values("gamma")["tokens"].to_numpy()
    assert minima[0] > minima[1]


def test_perturbed_minimum_that_moves_later_with_noise_does_not_reproduce_claim_2():
    def perturbed(schedule, gamma, x):
        return 0.05 * (x - (21 + 2 * gamma)) ** 2

    assert claims.perturbation_u(pd.DataFrame(probe_rows("perturbed_bpb", perturbed)), 200, 0).holds is False


def test_a_significant_rise_after_an_interior_minimum_reproduces_claim_3():
    def after(schedule, lr, x):
        return 2.5 + 0.02 * (x - np.log2(U_MINIMUM)) ** 2

    found = claims.finetuning_u(pd.DataFrame(finetune_rows(after)), 200, 0)
    assert found.holds, found.finding
    table = found.tables[0][1]
    assert (table["minimum_tokens"] == U_MINIMUM).all() and (table["rise_in_se"] > 2).all()


def test_a_rise_within_the_seed_noise_is_not_claim_3():
    def after(schedule, lr, x):  # an interior minimum 0.001 bpb deep, under noise of 0.005 per seed
        return 2.5 + (0.001 if x != np.log2(U_MINIMUM) else 0.0)

    found = claims.finetuning_u(pd.DataFrame(finetune_rows(after)), 200, 0)
    assert found.holds is False and "2 standard errors" in found.finding


def test_decayed_checkpoints_that_forget_more_everywhere_reproduce_claim_4_with_an_interval():
    def after(schedule, lr, x):
        return 2.3 + (0.1 if schedule == "wsd" else 0.0)

    found = claims.decay_forgets_more(pd.DataFrame(finetune_rows(after)), 200, 0)
    assert found.holds and "100% of 12" in found.finding and "100%-100%" in found.finding


def test_decay_that_helps_at_half_the_budgets_is_not_claim_4():
    def after(schedule, lr, x):
        return 2.3 + (0.1 if (schedule == "wsd") == (x < 22.5) else 0.0)

    found = claims.decay_forgets_more(pd.DataFrame(finetune_rows(after)), 200, 0)
    assert found.holds is False and "50% of 12" in found.finding


@pytest.mark.parametrize("best_lr, warned", [(3e-3, False), (1e-2, True)])
def test_a_tuned_lr_pinned_to_the_grid_edge_is_called_a_bound(best_lr, warned):
    def task_bpb(lr, x):
        return 3.0 + abs(np.log10(lr / best_lr))

    rows = finetune_rows(lambda schedule, lr, x: 2.3, lrs=(1e-3, 3e-3, 1e-2), task_bpb=task_bpb)
    found = claims.tuned_lr_inflections(pd.DataFrame(rows), 100, 0)
    assert ("end of the grid" in found.finding) == warned
    assert f"LR* {best_lr:g} -> {best_lr:g}" in found.finding


def test_claims_without_their_data_are_not_tested():
    only_probes = pd.DataFrame(probe_rows("delta_bpb", lambda s, g, x: x))
    assert claims.finetuning_u(pd.DataFrame(columns=only_probes.columns)).holds is None
    assert claims.decay_forgets_more(only_probes, 100, 0).holds is None
    assert claims.tuned_lr_inflections(only_probes, 100, 0).holds is None


@pytest.mark.timeout(600)
def test_reproduction_page_of_a_real_tiny_run_has_every_verdict_and_its_figures(tmp_path):
    from tiny_study import tiny_study

    from overtrain.analysis.reproduction import write_reproduction
    from overtrain.spec import load_spec
    from overtrain.study.runner import run_study

    study = tiny_study(tmp_path, pretrain={"budgets": [1024, 2048, 3072, 4096], "schedules": ["constant", "wsd"]},
                       sensitivity={"gammas": [0.5, 1.0], "seeds": [0, 1]}, finetune={"seeds": [0, 1]})
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    os.chdir(tmp_path)  # the task file is named relative to the study folder
    run_study(load_spec(tmp_path / "study.yaml"), tmp_path / "run")

    page = write_reproduction(tmp_path / "run", tmp_path / "docs" / "REPRODUCTION.md", n_boot=100)
    text = page.read_text()
    for number in range(1, 6):
        assert re.search(rf"^## {number}\. .+\n\n\*\*(Reproduced|Not reproduced|Not tested)\.\*\*", text, re.M), number
    assert "wall time" in text and "tokens per parameter" in text
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert figures and all((page.parent / f).is_file() for f in figures)
