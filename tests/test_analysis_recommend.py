"""The recommendation: best task result within a forgetting tolerance, and how sure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from overtrain.analysis.recommend import recommend


def finetune_rows(checkpoint: str, tokens: int, lr: float, seed: int, id_bpb: float, forgetting: float,
                  diverged: bool = False) -> list[dict]:
    """Tidy rows of one fine-tuning run: step 0 and its final evaluation."""
    cell = f"{checkpoint}-{lr}-{seed}"
    context = {"cell": cell, "kind": "finetune", "checkpoint": checkpoint, "schedule": "cosine", "decayed": 1,
               "tokens": tokens, "task": "math", "lr": lr, "gamma": np.nan, "seed": seed}
    base_ood = 3.0
    rows = [{**context, "step": 0, "metric": "id_bpb", "value": 5.0},
            {**context, "step": 0, "metric": "ood_bpb", "value": base_ood},
            {**context, "step": 10, "metric": "id_bpb", "value": id_bpb},
            {**context, "step": 10, "metric": "ood_bpb", "value": base_ood + forgetting}]
    if diverged:
        rows.append({**context, "step": np.nan, "metric": "diverged_at_step", "value": 7})
    return rows


def results(configs: dict[tuple[str, float], tuple[float, float]], seeds: int = 3, noise: float = 0.01,
            diverged: set = frozenset()) -> pd.DataFrame:
    """configs: (checkpoint, lr) -> (id_bpb, forgetting), each seed with a little noise."""
    rng = np.random.default_rng(0)
    rows = []
    for (checkpoint, lr), (id_bpb, forgetting) in configs.items():
        for seed in range(seeds):
            rows += finetune_rows(checkpoint, int(checkpoint.split("-")[1]), lr, seed,
                                  id_bpb + rng.normal(0, noise), forgetting + rng.normal(0, noise / 10),
                                  diverged=(checkpoint, lr) in diverged and seed == 0)
    return pd.DataFrame(rows)


CONFIGS = {("cosine-1000", 1e-3): (4.0, 0.01),   # little forgetting, weak task result
           ("cosine-8000", 1e-3): (3.5, 0.04),   # within 0.05: the answer
           ("cosine-8000", 1e-2): (3.0, 0.20)}   # best task result, forgets too much


def test_best_task_result_within_the_tolerance_is_chosen():
    found = recommend(results(CONFIGS), "math", tolerance_bpb=0.05)
    assert (found.best["checkpoint"], found.best["lr"]) == ("cosine-8000", 1e-3)
    assert found.best["forgetting_bpb"] <= 0.05
    assert list(found.runners_up["checkpoint"]) == ["cosine-1000"]


def test_a_looser_tolerance_admits_the_forgetful_choice():
    found = recommend(results(CONFIGS), "math", tolerance_bpb=0.3)
    assert (found.best["checkpoint"], found.best["lr"]) == ("cosine-8000", 1e-2)


def test_no_choice_within_a_tight_tolerance_is_said_so():
    assert recommend(results(CONFIGS), "math", tolerance_bpb=0.001).best is None


def test_a_configuration_with_a_diverged_seed_is_never_recommended():
    found = recommend(results(CONFIGS, diverged={("cosine-8000", 1e-3)}), "math", tolerance_bpb=0.05)
    assert found.best["checkpoint"] == "cosine-1000"


def test_p_best_is_high_for_a_clear_winner_and_split_for_a_tie():
    clear = recommend(results(CONFIGS), "math")
    assert clear.best["p_best"] > 0.95
    tie = recommend(results({("cosine-1000", 1e-3): (3.5, 0.0), ("cosine-2000", 1e-3): (3.5, 0.0)}, noise=0.05), "math")
    assert 0.15 < tie.candidates["p_best"].min() and tie.candidates["p_best"].sum() == pytest.approx(1.0)


def test_one_seed_has_no_bootstrap_certainty():
    found = recommend(results(CONFIGS, seeds=1), "math")
    assert found.best["checkpoint"] == "cosine-8000" and np.isnan(found.best["p_best"])


def test_accuracy_is_maximized_where_measured():
    frame = results(CONFIGS)
    accuracy = frame[frame["metric"] == "id_bpb"].assign(metric="id_acc", value=lambda f: 1 / f["value"])
    found = recommend(pd.concat([frame, accuracy]), "math", tolerance_bpb=0.3)
    assert found.id_metric == "id_acc" and found.best["lr"] == 1e-2
