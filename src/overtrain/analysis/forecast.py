"""When will fine-tuning start to hurt? A forecast of the turn from the first budgets of a study.

    overtrain forecast runs/paper --first 4

Someone pre-training a model they will fine-tune asks when to stop. Per fine-tuning curve
(schedule, task, LR), pre-training-text bpb after fine-tuning is the checkpoint's own bpb
plus what fine-tuning costs it (forgetting), each fitted on the first K budgets as a power
law in x = tokens / the first budget:

    L(x) = base(x) + F(x),   base(x) = E + A x^-alpha,   F(x) = B x^beta.

base is each checkpoint's bpb before fine-tuning (its fine-tunes' step-0 `ood_bpb`: the same
text), F the forgetting of each run (final minus step-0 `ood_bpb`). When forgetting grows
(B, beta > 0) and the base still falls (A > 0), L is lowest at

    x* = (alpha A / (beta B))^(1 / (alpha + beta)),

the budget after which fine-tuned performance turns. Forgetting that does not grow forecasts
no turn (infinite); a base that no longer falls, a turn at the first budget. The fits are
least squares over a grid of exponents, exact in the linear coefficients. Beside them, the
growth of sensitivity (the bpb increase under noise, mean over gammas) as a power of tokens:
an early sign that needs no fine-tuning.

The interval is a hierarchical bootstrap over replicates (pre-training seeds, then
fine-tuning seeds within them; one draw for base and forgetting), refitting in each
resample. It covers the seeds' noise, not the power laws' misspecification; the backtest
measures that: fit on the first K budgets, then compare with the turn measured on all of
them (`curves.find_inflection`: a U test that passes, its lowest budget refined, its interval
never narrower than the budgets around it). The forecast covers the measured turn when the
two intervals meet: the measured turn is known to within its interval only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from overtrain.analysis import curves, significance, tables
from overtrain.analysis.page import short_tokens, sig
from overtrain.analysis.replicates import SeedDraws, means_under, replicates
from overtrain.analysis.verdicts import DOES_NOT_HOLD, HOLDS, Claim, not_testable
from overtrain.errors import SpecError, StoreError
from overtrain.study.store import load_results

ALPHAS = np.linspace(0.02, 3.0, 150)    # base: exponents of the fall tried (then 40 times finer)
BETAS = np.linspace(-1.0, 3.0, 201)     # forgetting: exponents of the growth tried (then 40 times finer)
BACKTEST_FIRST = 4                      # the claim fits the first 4 budgets...
MIN_BEYOND = 2                          # ...and needs 2 budgets beyond them to compare with
MIN_FIRST = 3                           # a fall E + A x^-alpha has three parameters
CURVE = ["schedule", "task", "lr"]
TITLE = "Forecast: the turn forecast from the first 4 budgets covers the turn measured on all of them"


def forecast(results: pd.DataFrame, first: int | None = None, n_boot: int = curves.N_BOOT, seed: int = 0,
             final: pd.DataFrame | None = None, only: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per fine-tuning curve (schedule, task, LR; `only` those listed in it): the fits on the
    first `first` budgets (default: all), the forecast turn with its 95% interval, and where more
    budgets were measured, the turn measured on all of them and whether the two intervals meet (`covered`)."""
    if first is not None and first < MIN_FIRST:
        raise SpecError(f"--first {first}: the fit needs at least {MIN_FIRST} budgets")
    results = tables.plain(results)
    final = tables.finetune_final(results) if final is None else final
    runs = _runs(results, final)
    if only is not None:
        runs = runs.merge(only[CURVE].drop_duplicates(), on=CURVE)
    ood = tables.final_points(results, "ood_bpb", final)
    sensitivity = tables.probe_points(results, "delta_bpb")
    rows = []
    for (schedule, task, lr), curve in runs.groupby(CURVE):
        budgets = np.sort(curve["tokens"].astype(float).unique())
        fitted = budgets[:len(budgets) if first is None else first]
        row = {"schedule": schedule, "task": task, "lr": lr, "budgets": len(budgets), "first": len(fitted),
               "fitted_to": fitted[-1],
               "sensitivity_exponent": _sensitivity_exponent(sensitivity[sensitivity["schedule"] == schedule], fitted),
               **_forecast_turn(curve[curve["tokens"].isin(fitted)], n_boot, seed)}
        row["turn_low"], row["turn_high"] = _at_least_the_spacing(row["turn"], row["turn_low"], row["turn_high"], budgets)
        beyond = len(budgets) - len(fitted)
        if beyond:
            measured = curves.find_inflection(ood[(ood["schedule"] == schedule) & (ood["task"] == task) & (ood["lr"] == lr)],
                                              n_boot=n_boot, seed=seed)
            # The measured turn is known to within its interval only (never narrower than the budgets around
            # it, STATISTICS §5): the forecast covers it when the two intervals meet.
            covered = bool(row["turn_low"] <= measured.ci_high and measured.ci_low <= row["turn_high"]) \
                if measured.found else None
            row |= {"measured_turn": measured.tokens, "measured_low": measured.ci_low, "measured_high": measured.ci_high,
                    "measured_p": measured.p_value, "measured_note": measured.note, "budgets_beyond": beyond,
                    "covered": covered}
        rows.append(row)
    return pd.DataFrame(rows)


def _runs(results: pd.DataFrame, final: pd.DataFrame) -> pd.DataFrame:
    """Per fine-tuning run: `base` (its checkpoint's bpb before the update) and `forgetting_bpb`."""
    forgetting = tables.forgetting_points(results, final)
    start = tables.finetune_start(results)
    start = start[start["metric"] == "ood_bpb"].drop_duplicates("cell").set_index("cell")["value"]
    return forgetting.assign(base=forgetting["cell"].map(start).astype(float))


def _forecast_turn(runs: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """The fits of one curve's runs and its turn (tokens), with a 95% bootstrap interval."""
    values = np.stack([replicates(runs, value, like=runs).values for value in ("base", "forgetting_bpb")])  # (2, P, S, B)
    tokens = np.sort(runs["tokens"].astype(float).unique())
    x = tokens / tokens[0]
    point = _fit(x, means_under(values, SeedDraws.identity(*values.shape[1:3])))
    draws = SeedDraws.hierarchical(*values.shape[1:3], n_boot, np.random.default_rng(seed))
    turns = tokens[0] * _fit(x, means_under(values, draws))["x_turn"]
    low, high = _percentiles(turns)
    return {"alpha": point["alpha"][0], "A": point["A"][0], "E": point["E"][0], "beta": point["beta"][0],
            "B": point["B"][0], "turn": tokens[0] * point["x_turn"][0], "turn_low": low, "turn_high": high}


def _fit(x: np.ndarray, means: np.ndarray) -> dict[str, np.ndarray]:
    """Both power laws for each resample of means (n, 2, K), and the turn x* of their sum."""
    fall, growth = _least_squares(_fall, x, means[:, 0], ALPHAS), _least_squares(_growth, x, means[:, 1], BETAS)
    alpha, a, beta, b = fall["exponent"], fall["scale"], growth["exponent"], growth["scale"]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x_turn = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
    grows = (beta > 0) & (b > 0)
    return {"alpha": alpha, "A": a, "E": fall["offset"], "beta": beta, "B": b,
            "x_turn": np.where(~grows, np.inf, np.where(a > 0, x_turn, 1.0))}


def _least_squares(model, x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> dict[str, np.ndarray]:
    """The best exponent of `model` for each row of y (n, K): on `grid`, then on a grid 40 times
    finer around the best point of it; the other coefficients are exact at each exponent."""
    coarse = model(x, y, np.broadcast_to(grid, (len(y), len(grid))))
    step = grid[1] - grid[0]
    around = coarse["exponent"][np.arange(len(y)), _best(coarse)][:, None] + np.linspace(-step, step, 81)[None, :]
    fine = model(x, y, np.clip(around, grid[0], grid[-1]))
    best = _best(fine)
    return {name: values[np.arange(len(y)), best] for name, values in fine.items() if name != "sse"}


def _best(fit: dict[str, np.ndarray]) -> np.ndarray:
    return np.argmin(np.where(np.isfinite(fit["sse"]), fit["sse"], np.inf), axis=1)


def _fall(x: np.ndarray, y: np.ndarray, alpha: np.ndarray) -> dict[str, np.ndarray]:
    """E + A x^-alpha for y (n, K) at exponents alpha (n, m): offset E, scale A and the squared error."""
    power = x ** -alpha[..., None]                                            # (n, m, K)
    centred = power - power.mean(axis=-1, keepdims=True)
    scale = (centred * (y - y.mean(axis=-1, keepdims=True))[:, None]).sum(axis=-1) / (centred ** 2).sum(axis=-1)
    offset = y.mean(axis=-1)[:, None] - scale * power.mean(axis=-1)
    sse = ((y[:, None] - offset[..., None] - scale[..., None] * power) ** 2).sum(axis=-1)
    return {"exponent": alpha, "scale": scale, "offset": offset, "sse": sse}


def _growth(x: np.ndarray, y: np.ndarray, beta: np.ndarray) -> dict[str, np.ndarray]:
    """B x^beta for y (n, K) at exponents beta (n, m): scale B and the squared error."""
    power = x ** beta[..., None]                                              # (n, m, K)
    scale = (power * y[:, None]).sum(axis=-1) / (power ** 2).sum(axis=-1)
    sse = ((y[:, None] - scale[..., None] * power) ** 2).sum(axis=-1)
    return {"exponent": beta, "scale": scale, "sse": sse}


def _at_least_the_spacing(turn: float, low: float, high: float, budgets: np.ndarray) -> tuple[float, float]:
    """A forecast turn's interval, never narrower than the budgets around it (STATISTICS §5): a turn
    between two budgets is known to that bracket at best; beyond the measured budgets the grid is
    continued at the ratio of its last (or first) two."""
    if not np.isfinite(turn) or len(budgets) < 2:
        return low, high
    if turn > budgets[-1]:
        ratio = budgets[-1] / budgets[-2]
        steps = np.floor(np.log(turn / budgets[-1]) / np.log(ratio))
        below, above = budgets[-1] * ratio ** steps, budgets[-1] * ratio ** (steps + 1)
    elif turn < budgets[0]:
        ratio = budgets[1] / budgets[0]
        steps = np.floor(np.log(budgets[0] / turn) / np.log(ratio))
        below, above = budgets[0] / ratio ** (steps + 1), budgets[0] / ratio ** steps
    else:
        below, above = budgets[budgets <= turn][-1], budgets[budgets >= turn][0]
    return min(low, float(below)), max(high, float(above))


def _percentiles(turns: np.ndarray) -> tuple[float, float]:
    """The 95% interval of turns that may be infinite (no turn forecast in some resamples)."""
    finite_stand_in = np.where(np.isfinite(turns), turns, 1e300)
    low, high = np.percentile(finite_stand_in, [100 * (1 - curves.LEVEL) / 2, 100 * (1 + curves.LEVEL) / 2],
                              method="nearest")
    return (float(low) if low < 1e300 else np.inf), (float(high) if high < 1e300 else np.inf)


def _sensitivity_exponent(delta: pd.DataFrame, fitted: np.ndarray) -> float:
    """d log(delta_bpb) / d log(tokens) over the fitted budgets (mean over gammas and seeds)."""
    means = delta[delta["tokens"].isin(fitted)].groupby("tokens")["value"].mean()
    if len(means) < 2 or (means <= 0).any():
        return np.nan
    return float(np.polyfit(np.log(means.index.to_numpy(dtype=float)), np.log(means.to_numpy()), 1)[0])


# -- the command -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ForecastReport:
    """`overtrain forecast`'s answer: one row per curve (see `forecast`)."""

    table: pd.DataFrame
    run_dir: str

    def as_dict(self) -> list[dict]:
        """The rows as JSON objects; a number that is not finite (no turn forecast) is null."""
        return [{key: _plain(value) for key, value in row.items()} for row in self.table.to_dict("records")]

    def to_text(self) -> str:
        table = self.table
        shown = pd.DataFrame({"schedule": table["schedule"], "task": table["task"], "lr": table["lr"].map("{:g}".format),
                              "fit on": [f"{k} budgets to {short_tokens(t)}" for k, t in zip(table["first"], table["fitted_to"])],
                              "base falls as T^-alpha": table["alpha"].map(lambda v: sig(v, 2)),
                              "forgetting grows as T^beta": table["beta"].map(lambda v: sig(v, 2)),
                              "sensitivity grows as T^": table["sensitivity_exponent"].map(lambda v: sig(v, 2)),
                              "turn [95%]": [f"{_tokens(t)} [{_tokens(lo)}, {_tokens(hi)}]" for t, lo, hi in
                                             zip(table["turn"], table["turn_low"], table["turn_high"])]})
        if "measured_turn" in table:
            shown["measured on all budgets"] = [
                f"{short_tokens(t)} [{short_tokens(lo)}, {short_tokens(hi)}]" if np.isfinite(t) else "no turn found"
                for t, lo, hi in zip(table["measured_turn"], table["measured_low"], table["measured_high"])]
            shown["covered"] = table["covered"].map({True: "yes", False: "no"}).fillna("-")
        return "\n".join([f"Forecast of the turn in pre-training-text bpb after fine-tuning ({self.run_dir}): the "
                          "budget after which fine-tuning at that LR leaves a worse model (docs/REPORT.md, Forecast).",
                          shown.to_string(index=False)])


def forecast_run(run_dir: str | Path, first: int | None = None, n_boot: int = curves.N_BOOT, seed: int = 0) -> ForecastReport:
    """`forecast` on a run folder's results."""
    table = forecast(load_results(run_dir), first, n_boot, seed)
    if table.empty:
        raise StoreError(f"{run_dir}: no fine-tuning runs to forecast from (the study needs a finetune: section)")
    return ForecastReport(table, str(run_dir))


def _plain(value):
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# -- the claim: the backtest ----------------------------------------------------------------

def forecast_claim(results: pd.DataFrame, fixed_lr: Claim, n_boot: int, seed: int, final: pd.DataFrame) -> Claim:
    """Fit on the first BACKTEST_FIRST budgets; holds when the forecast interval of the curve with the
    clearest measured turn (smallest U-test p over all budgets, claim finetune_u) meets that turn's interval."""
    label = ("forecast over measured turn, log10 (decades); interval: from the forecast's low end over the measured "
             "turn's high end to its high end over the measured low end (contains 0 when they meet)")
    table = dict(fixed_lr.tables).get("finetune_u")
    if table is None or not (table["untestable"] == "").any():
        return not_testable("forecast", TITLE, label, fixed_lr.reason)
    tested = table[table["untestable"] == ""]
    budgets = int(tested["budgets"].max())
    if budgets - BACKTEST_FIRST < MIN_BEYOND:
        return not_testable("forecast", TITLE, label, f"{budgets} budgets: the backtest fits the first {BACKTEST_FIRST} "
                            f"and needs {MIN_BEYOND} beyond them")
    turning = tested[tested["p_value"] <= significance.ONE_SIDED]
    if turning.empty:
        return not_testable("forecast", TITLE, label, "no fixed-LR curve turns within the budgets measured (U test "
                            "on all budgets): nothing to backtest against")
    found = forecast(results, BACKTEST_FIRST, n_boot, seed, final, only=turning)
    found = found[found["covered"].notna()]
    if found.empty:
        return not_testable("forecast", TITLE, label, "no curve's turn is located on all budgets")
    primary = found.loc[found["measured_p"].idxmin()]
    measured = primary["measured_turn"]
    effect, low, high = (np.log10(primary[forecast_end] / primary[measured_end]) for forecast_end, measured_end in
                         (("turn", "measured_turn"), ("turn_low", "measured_high"), ("turn_high", "measured_low")))
    name = f"{primary['task']} at LR {primary['lr']:g} ({primary['schedule']})"
    covered = int(found["covered"].sum())
    reason = (f"{name}: forecast {_tokens(primary['turn'])} [{_tokens(primary['turn_low'])}, "
              f"{_tokens(primary['turn_high'])}] from the first {BACKTEST_FIRST} budgets, measured "
              f"{short_tokens(measured)} [{short_tokens(primary['measured_low'])}, {short_tokens(primary['measured_high'])}] "
              f"on all {int(primary['budgets'])}: "
              f"{'covered' if primary['covered'] else 'not covered'}; covered on {covered} of {len(found)} curves with a turn")
    finding = ("Fit on the first 4 budgets, forecast turn [95%] vs the turn measured on all budgets [95%]: " + "; ".join(
        f"{r.task} at LR {r.lr:g} ({r.schedule}): {_tokens(r.turn)} [{_tokens(r.turn_low)}, {_tokens(r.turn_high)}] vs "
        f"{short_tokens(r.measured_turn)} [{short_tokens(r.measured_low)}, {short_tokens(r.measured_high)}], "
        f"{'covered' if r.covered else 'not covered'} (alpha {sig(r.alpha, 2)}, beta {sig(r.beta, 2)})"
        for r in found.sort_values("measured_p").itertuples()) + ".")
    return Claim("forecast", TITLE, HOLDS if primary["covered"] else DOES_NOT_HOLD, reason, label, effect, low, high,
                 finding, [("forecast_backtest", found)])


def _tokens(value: float) -> str:
    return short_tokens(value) if np.isfinite(value) else "no turn"
