"""The reproduction's claim checks, on results whose answer is known, and the page on a real tiny run."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from overtrain.analysis import claims, tables, tuned_claims

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


def probe_rows(metric: str, value, gammas=(0.5, 1.0), seeds=3, schedules=("constant", "wsd"), rng_seed=0,
               budgets=BUDGETS) -> list[dict]:
    """value(schedule, gamma, log2 tokens) plus small seed noise."""
    rng = np.random.default_rng(rng_seed)
    return [_row(kind="probe", metric=metric, gamma=g, seed=s, value=value(sch, g, np.log2(t)) + rng.normal(0, 0.002),
                 **_checkpoint(sch, t))
            for sch in schedules for g in gammas for t in budgets for s in range(seeds)]


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
    found = claims.finetune_u(pd.DataFrame(finetune_rows(u_after)), 200, 0)
    assert found.verdict == "holds", found.finding
    table = found.tables[0][1]
    assert (table["lowest_tokens"] == U_MINIMUM).all() and (table["rise_low"] > 0).all()
    # The interval of the minimum spans at least the budgets on either side of it (STATISTICS §5).
    assert (table["lowest_ci_low"] <= U_MINIMUM / 2).all() and (table["lowest_ci_high"] >= U_MINIMUM * 2).all()


def test_a_rise_within_the_seed_noise_does_not_hold_claim_3():
    def after(schedule, lr, x):  # an interior minimum 0.001 bpb deep, under noise of 0.005 per seed
        return 2.5 + (0.001 if x != np.log2(U_MINIMUM) else 0.0)

    found = claims.finetune_u(pd.DataFrame(finetune_rows(after)), 200, 0)
    assert found.verdict == "does not hold" and "0 of 4 testable curves" in found.finding


@pytest.mark.parametrize("rows, reason", [
    (finetune_rows(u_after, seeds=1), "one seed"),
    (finetune_rows(u_after, budgets=BUDGETS[:3]), "3 budgets"),
])
def test_thin_data_is_not_testable_with_its_reason(rows, reason):
    found = claims.finetune_u(pd.DataFrame(rows), 100, 0)
    assert found.verdict == "not testable" and reason in found.reason, found.reason


def test_a_curve_with_a_diverged_run_is_not_testable_and_says_so():
    diverged = {f"constant-{BUDGETS[-1]}-0.003-0"}
    found = claims.finetune_u(pd.DataFrame(finetune_rows(u_after, diverged=diverged)), 100, 0)
    table = found.tables[0][1]
    untestable = table[table["untestable"] != ""]
    assert len(untestable) == 1 and "diverged" in untestable["untestable"].iloc[0] and "diverged" in found.finding
    assert found.verdict == "holds"  # the other three curves still show the U


def test_a_turn_that_comes_earlier_for_a_larger_lr_holds_lr_moves_turn():
    def earlier(schedule, lr, x):  # bottom at 2^23 tokens for LR 1e-3, 2^21 for 3e-3
        return 2.5 + 0.02 * (x - (23 if lr < 2e-3 else 21)) ** 2

    def later(schedule, lr, x):
        return 2.5 + 0.02 * (x - (21 if lr < 2e-3 else 23)) ** 2

    def moves(rows):
        results = pd.DataFrame(rows)
        return claims.lr_moves_turn(results, claims.finetune_u(results, 100, 0), 200, 0)

    moved = moves(finetune_rows(earlier))
    assert moved.verdict == "holds" and "8.39M -> 2.1M" in moved.reason, moved.reason
    assert moved.effect == pytest.approx(np.log10(2**21 / 2**23), abs=0.05)
    assert moved.effect_low <= moved.effect <= moved.effect_high < 0
    assert moves(finetune_rows(later)).verdict == "does not hold"
    thin = moves(finetune_rows(earlier, seeds=1))
    assert thin.verdict == "not testable" and "one seed" in thin.reason


def test_decayed_checkpoints_that_are_more_sensitive_hold_decay_sharper():
    def sensitivity(schedule, gamma, x):
        return gamma * (0.3 if schedule == "wsd" else 0.2)

    sharper = claims.decay_sharper(pd.DataFrame(probe_rows("delta_bpb", sensitivity)))
    assert sharper.verdict == "holds" and sharper.effect_low < 0.075 < sharper.effect_high  # 0.1 x mean gamma 0.75
    alike = claims.decay_sharper(pd.DataFrame(probe_rows("delta_bpb", lambda s, g, x: 0.2 * g)))
    assert alike.verdict == "does not hold"
    # The Hessian is measured once per checkpoint: one pre-training run gives it no spread.
    hessian = pd.DataFrame([_row(kind="probe", metric="hessian_top_eig", value=10.0 + (sch == "wsd"), **_checkpoint(sch, t))
                            for sch in ("constant", "wsd") for t in BUDGETS])
    once = claims.decay_sharper(hessian)
    assert once.verdict == "not testable" and "one seed" in once.reason


@pytest.mark.parametrize("exponent, gammas, verdict", [
    (-2.0, (0.35, 0.5, 0.71, 1.0), "holds"),          # the linear network's T* ~ gamma^-2
    (-0.5, (0.125, 0.25, 0.5, 1.0), "does not hold"),  # a minimum that moves, but far more slowly
])
def test_the_gamma_exponent_of_the_perturbed_minimum_is_fitted_against_the_theory(exponent, gammas, verdict):
    def perturbed(schedule, gamma, x):  # lowest at 2^23 tokens for gamma 1
        return 0.05 * (x - (23 + exponent * np.log2(gamma))) ** 2

    rows = pd.DataFrame(probe_rows("perturbed_bpb", perturbed, gammas=gammas, budgets=[2**20 * 2 ** (k / 2) for k in range(15)]))
    found = claims.gamma_scaling(rows, claims.perturbation_u(rows, 0, 0), 500, 0)
    assert found.verdict == verdict, found.reason
    assert found.effect == pytest.approx(exponent, abs=0.15) and found.effect_low < exponent < found.effect_high


def test_gamma_scaling_is_not_testable_without_two_minima_to_compare():
    rows = pd.DataFrame(probe_rows("perturbed_bpb", lambda s, g, x: 3.0 - 0.1 * x))  # no U at any gamma
    found = claims.gamma_scaling(rows, claims.perturbation_u(rows, 0, 0), 100, 0)
    assert found.verdict == "not testable" and "fewer than 2 gammas" in found.reason


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
def test_a_tuned_lr_at_the_grid_edge_makes_the_tuned_claims_not_testable(best_lr, testable):
    def task_bpb(lr, x):
        return 3.0 + abs(np.log10(lr / best_lr))

    rows = pd.DataFrame(finetune_rows(u_after, lrs=(1e-3, 3e-3, 1e-2), task_bpb=task_bpb))
    t_ft, t_pre, _ = tuned_claims.tuned_lr_claims(rows, 100, 0, tables.finetune_final(rows))
    assert (t_pre.verdict != "not testable") == testable, t_pre.finding
    assert ("end of the grid" in t_pre.reason) != testable
    assert f"LR* {best_lr:g} -> {best_lr:g}" in t_pre.finding
    if testable:  # T_pre: the U in pre-training text at the tuned LR; the task bpb has none (T_ft)
        assert t_pre.verdict == "holds" and t_ft.verdict == "does not hold"


def test_claims_without_their_data_are_not_testable():
    only_probes = pd.DataFrame(probe_rows("delta_bpb", lambda s, g, x: x))
    assert claims.finetune_u(pd.DataFrame(columns=only_probes.columns), 100, 0).verdict == "not testable"
    assert claims.decay_forgets_more(only_probes).verdict == "not testable"
    found = claims.check_claims(only_probes, n_boot=50)
    assert [c.id for c in found] == list(claims.CLAIM_IDS)
    untestable = {c.id for c in found if c.verdict == "not testable"}
    assert untestable == set(claims.CLAIM_IDS) - {"sensitivity", "decay_sharper"}
    assert all(c.reason for c in found)


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
    for number, claim_id in enumerate(claims.CLAIM_IDS, start=1):
        assert re.search(rf"^## {number}\. .+ \(`{claim_id}`\)\n\n\*\*(Holds|Does not hold|Not testable)\.\*\*", text,
                         re.M), claim_id
    assert "wall time" in text and "tokens per parameter" in text
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert figures and all((page.parent / f).is_file() for f in figures)

    # claims.json beside the page, in the figures' folder: the same verdicts, for a program
    found = json.loads((tmp_path / "docs" / "reproduction" / "claims.json").read_text())
    assert set(found) == {"study", "wall_minutes", "pretrain_seeds", "claims"}
    assert found["study"] == "tiny" and found["pretrain_seeds"] == 1 and 0 < found["wall_minutes"] < 10
    assert [c["claim"] for c in found["claims"]] == list(claims.CLAIM_IDS)
    for claim in found["claims"]:
        assert set(claim) == {"claim", "verdict", "reason", "effect", "interval"}
        assert claim["verdict"] in {"holds", "does not hold", "not testable"} and claim["reason"]
        assert claim["effect"] is None or isinstance(claim["effect"], float)
        assert claim["interval"] is None or (len(claim["interval"]) == 2 and claim["effect"] is not None)
        table_row = re.search(rf"^\| \d+\. `{claim['claim']}` +\| \*\*{claim['verdict']}\*\*", text, re.M)
        assert table_row, claim["claim"]
