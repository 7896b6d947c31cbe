"""`overtrain forecast`: the turn forecast from the first budgets, on results whose turn is planted,
its backtest claim, and the command's output and errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_claims import finetune_rows
from test_power import small_study, write_run_folder
from typer.testing import CliRunner

from overtrain.analysis import claims, forecast, tables
from overtrain.cli import app
from overtrain.study.store import RESULT_COLUMNS

FIRST = 2**20
BUDGETS = [FIRST * 2**k for k in range(7)]  # x = tokens / first budget: 1 to 64


def base(schedule, tokens):
    """The checkpoint's bpb before fine-tuning: 2 + x^-0.5."""
    return 2.0 + (tokens / FIRST) ** -0.5


def power_law_forgetting(schedule, lr, log2_tokens):
    """Forgetting x^0.5 / 16: the fine-tuned bpb base + forgetting is lowest at x* = 16, symmetric
    in log tokens around it (so the budgets measure the turn at 16 exactly)."""
    x = 2.0**log2_tokens / FIRST
    return base(schedule, 2.0**log2_tokens) + x**0.5 / 16


def backtest(rows: pd.DataFrame, n_boot: int = 300):
    return forecast.forecast_claim(rows, claims.finetune_u(rows, 0, 0), n_boot, 0, tables.finetune_final(rows))


def test_the_forecast_from_four_budgets_recovers_a_planted_turn_within_its_interval():
    rows = pd.DataFrame(finetune_rows(power_law_forgetting, before=base, budgets=BUDGETS, lrs=(1e-3,)))
    found = forecast.forecast(rows, first=4, n_boot=300)
    assert len(found) == 2 and (found["first"] == 4).all() and (found["fitted_to"] == BUDGETS[3]).all()
    assert found["alpha"].to_numpy() == pytest.approx(0.5, abs=0.05)
    assert found["beta"].to_numpy() == pytest.approx(0.5, abs=0.1)
    assert ((found["turn_low"] <= 16 * FIRST) & (16 * FIRST <= found["turn_high"])).all()
    assert found["measured_turn"].to_numpy() == pytest.approx(16 * FIRST, rel=0.05)
    assert found["covered"].all() and (found["budgets_beyond"] == 3).all()

    claim = backtest(rows)
    assert claim.verdict == "holds" and "covered on 2 of 2 curves" in claim.reason, claim.reason
    assert claim.effect_low <= 0 <= claim.effect_high  # forecast minus measured, in decades


def test_a_turn_the_first_budgets_do_not_announce_is_not_covered():
    def sudden(schedule, lr, log2_tokens):  # forgetting flat over the first 4 budgets, then climbing fast
        return base(schedule, 2.0**log2_tokens) + 0.1 + 0.3 * max(log2_tokens - 23, 0)

    claim = backtest(pd.DataFrame(finetune_rows(sudden, before=base, budgets=BUDGETS, lrs=(1e-3,))))
    assert claim.verdict == "does not hold" and "not covered" in claim.reason, claim.reason
    assert claim.effect_low > 0  # the forecast turn comes (far) later than the measured one


@pytest.mark.parametrize("budgets, after, reason", [
    (BUDGETS, lambda s, lr, x: base(s, 2.0**x) + 0.1, "no fixed-LR curve turns"),
    (BUDGETS[:5], power_law_forgetting, "5 budgets: the backtest fits the first 4 and needs 2 beyond them"),
])
def test_the_backtest_is_not_testable_without_a_turn_or_budgets_beyond_the_fit(budgets, after, reason):
    claim = backtest(pd.DataFrame(finetune_rows(after, before=base, budgets=budgets, lrs=(1e-3,))))
    assert claim.verdict == "not testable" and reason in claim.reason, claim.reason


def test_forgetting_that_does_not_grow_forecasts_no_turn():
    rows = pd.DataFrame(finetune_rows(lambda s, lr, x: base(s, 2.0**x) + 0.1, before=base, budgets=BUDGETS, lrs=(1e-3,),
                                      seeds=1))
    found = forecast.forecast(rows, n_boot=50)  # every budget fitted: nothing to compare with
    assert "measured_turn" not in found and (found["first"] == 7).all()
    assert (np.isinf(found["turn"]) | (found["turn"] > 1000 * BUDGETS[-1])).all()


# -- the command --------------------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(app, ["forecast", *(str(a) for a in args)])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    frame = pd.DataFrame(finetune_rows(power_law_forgetting, before=base, budgets=BUDGETS, lrs=(1e-3,)))
    frame = frame.assign(pretrain_seed=0, task="math").reindex(columns=["cell", "kind", *RESULT_COLUMNS, "metric", "value"])
    study = small_study(pretrain={"budgets": BUDGETS, "seq_len": 32, "batch_size": 32}, sensitivity=None,
                        finetune={"lrs": [1e-3]})
    return write_run_folder(tmp_path_factory.mktemp("forecast") / "run", study, frame)


def test_the_command_prints_the_forecast_beside_the_measured_turn(run_dir):
    text = invoke(run_dir, "--first", 4)
    assert text.exit_code == 0, text.output
    assert "4 budgets to 8.39M" in text.stdout and text.stdout.rstrip().endswith("yes"), text.stdout

    result = invoke(run_dir, "--first", 4, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["schedule"], r["task"], r["lr"]) for r in rows] == [("constant", "math", 1e-3), ("wsd", "math", 1e-3)]
    for row in rows:
        assert row["turn_low"] <= 16 * FIRST <= row["turn_high"] and row["covered"] is True


@pytest.mark.parametrize("args, expected", [
    (["--first", 2], "--first 2: the fit needs at least 3 budgets"),
    (["{missing}"], "no such file"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, args, expected):
    args = [run_dir, *args] if not args[0].startswith("{") else [tmp_path / "missing"]
    result = invoke(*args)
    message = result.output.strip()
    assert result.exit_code == 2 and message.startswith("error: ") and expected in message and "\n" not in message, message
