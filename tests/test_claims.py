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
                  task_bpb=lambda lr, x: 3.0 - 0.01 * x, budgets=BUDGETS, diverged=()) -> list[dict]:
    """Per run, as a real run writes them: ood_bpb and the task bpb (validation and test parts) at step 0
    and step 100 (`after(schedule, lr, log2 tokens)` + noise). A run whose cell is in `diverged` has a
    diverged_at_step row and no evaluation after step 0."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for sch in ("constant", "wsd"):
        for t in budgets:
            for lr in lrs:
                for s in range(seeds):
                    cell = f"{sch}-{t}-{lr}-{s}"
                    common = {"cell": cell, "kind": "finetune", "task": "math", "lr": lr, "seed": s, **_checkpoint(sch, t)}
                    rows.append(_row(step=0, metric="ood_bpb", value=before(sch, t), **common))
                    rows += [_row(step=0, metric=m, value=3.5, **common) for m in ("id_bpb", "id_test_bpb")]
                    if cell in diverged:
                        rows.append(_row(metric="diverged_at_step", value=3, **common))
                        continue
                    rows.append(_row(step=100, metric="ood_bpb", value=after(sch, lr, np.log2(t)) + rng.normal(0, 0.005),
                                     **common))
                    rows += [_row(step=100, metric=m, value=task_bpb(lr, np.log2(t)) + rng.normal(0, 0.005), **common)
                             for m in ("id_bpb", "id_test_bpb")]
    return rows


def u_after(schedule, lr, x):
    return 2.5 + 0.02 * (x - np.log2(U_MINIMUM)) ** 2


def test_sensitivity_that_rises_with_tokens_holds_with_its_slope_and_interval():
    rising = claims.progressive_sensitivity(pd.DataFrame(probe_rows("delta_bpb", lambda s, g, x: g * x)))
    assert rising.verdict == "holds", rising.finding
    assert 0 < rising.effect_low < rising.effect < rising.effect_high  # slope per 10x tokens: ~0.75 * log2(10)


def test_flat_sensitivity_does_not_hold_and_a_falling_schedule_is_named():
    flat = claims.progressive_sensitivity(pd.DataFrame(probe_rows("delta_bpb", lambda s, g, x: g)))
    assert flat.verdict == "does not hold"
    mixed = claims.progressive_sensitivity(
        pd.DataFrame(probe_rows("delta_bpb", lambda s, g, x: g * x if s == "wsd" else -x)))
    assert mixed.verdict == "holds" and "constant: -" in mixed.finding and "(does not hold)" in mixed.finding


def test_perturbed_minimum_that_moves_earlier_with_noise_holds_claim_2():
    def perturbed(schedule, gamma, x):  # the bottom of the U sits at 2^(24 - 2 gamma) tokens
        return 0.05 * (x - (24 - 2 * gamma)) ** 2

    found = claims.perturbation_u(pd.DataFrame(probe_rows("perturbed_bpb", perturbed)), 200, 0)
    assert found.verdict == "holds", found.finding
    lowest = found.tables[0][1].query("schedule == 'constant'").sort_values("gamma")["lowest_tokens"].to_numpy()
    assert lowest[0] > lowest[1]


def test_perturbed_minimum_that_moves_later_with_noise_does_not_hold_claim_2():
    def perturbed(schedule, gamma, x):
        return 0.05 * (x - (21 + 2 * gamma)) ** 2

    found = claims.perturbation_u(pd.DataFrame(probe_rows("perturbed_bpb", perturbed)), 200, 0)
    assert found.verdict == "does not hold" and "does not move earlier" in found.finding


def test_a_significant_rise_after_an_interior_minimum_holds_claim_3_with_a_located_minimum():
    found = claims.finetuning_u(pd.DataFrame(finetune_rows(u_after)), 200, 0)
    assert found.verdict == "holds", found.finding
    table = found.tables[0][1]
    assert (table["lowest_tokens"] == U_MINIMUM).all() and (table["rise_low"] > 0).all()
    # The interval of the minimum spans at least the budgets on either side of it (STATISTICS §5).
    assert (table["lowest_ci_low"] <= U_MINIMUM / 2).all() and (table["lowest_ci_high"] >= U_MINIMUM * 2).all()


def test_a_rise_within_the_seed_noise_does_not_hold_claim_3():
    def after(schedule, lr, x):  # an interior minimum 0.001 bpb deep, under noise of 0.005 per seed
        return 2.5 + (0.001 if x != np.log2(U_MINIMUM) else 0.0)

    found = claims.finetuning_u(pd.DataFrame(finetune_rows(after)), 200, 0)
    assert found.verdict == "does not hold" and "0 of 4 testable curves" in found.finding


@pytest.mark.parametrize("rows, reason", [
    (finetune_rows(u_after, seeds=1), "one seed"),
    (finetune_rows(u_after, budgets=BUDGETS[:3]), "3 budgets"),
])
def test_thin_data_is_not_testable_with_its_reason(rows, reason):
    found = claims.finetuning_u(pd.DataFrame(rows), 100, 0)
    assert found.verdict == "not testable" and reason in found.reason, found.reason


def test_a_curve_with_a_diverged_run_is_not_testable_and_says_so():
    diverged = {f"constant-{BUDGETS[-1]}-0.003-0"}
    found = claims.finetuning_u(pd.DataFrame(finetune_rows(u_after, diverged=diverged)), 100, 0)
    table = found.tables[0][1]
    untestable = table[table["untestable"] != ""]
    assert len(untestable) == 1 and "diverged" in untestable["untestable"].iloc[0] and "diverged" in found.finding
    assert found.verdict == "holds"  # the other three curves still show the U


def test_decayed_checkpoints_that_forget_more_hold_claim_4_with_an_interval():
    def after(schedule, lr, x):
        return 2.3 + (0.1 if schedule == "wsd" else 0.0)

    found = claims.decay_forgets_more(pd.DataFrame(finetune_rows(after)))
    assert found.verdict == "holds" and found.effect_low < 0.1 < found.effect_high


def test_decay_that_helps_at_half_the_budgets_does_not_hold_claim_4():
    def after(schedule, lr, x):
        return 2.3 + (0.1 if (schedule == "wsd") == (x < 22.5) else 0.0)

    found = claims.decay_forgets_more(pd.DataFrame(finetune_rows(after)))
    assert found.verdict == "does not hold" and found.effect_low < 0 < found.effect_high


@pytest.mark.parametrize("best_lr, testable", [(3e-3, True), (1e-2, False)])
def test_a_tuned_lr_at_the_grid_edge_makes_claim_5_not_testable(best_lr, testable):
    def task_bpb(lr, x):
        return 3.0 + abs(np.log10(lr / best_lr))

    rows = finetune_rows(u_after, lrs=(1e-3, 3e-3, 1e-2), task_bpb=task_bpb)
    found = claims.tuned_lr_inflections(pd.DataFrame(rows), 100, 0)
    assert (found.verdict != "not testable") == testable, found.finding
    assert ("edge of the grid" in found.finding) != testable
    assert f"LR* {best_lr:g} -> {best_lr:g}" in found.finding
    if testable:  # T_pre: the U in pre-training text at the tuned LR
        assert found.verdict == "holds"


def test_claims_without_their_data_are_not_testable():
    only_probes = pd.DataFrame(probe_rows("delta_bpb", lambda s, g, x: x))
    assert claims.finetuning_u(pd.DataFrame(columns=only_probes.columns), 100, 0).verdict == "not testable"
    assert claims.decay_forgets_more(only_probes).verdict == "not testable"
    assert claims.tuned_lr_inflections(only_probes, 100, 0).verdict == "not testable"


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
        assert re.search(rf"^## {number}\. .+\n\n\*\*(Holds|Does not hold|Not testable)\.\*\*", text, re.M), number
    assert "wall time" in text and "tokens per parameter" in text
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert figures and all((page.parent / f).is_file() for f in figures)
