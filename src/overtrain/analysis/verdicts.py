"""A claim's verdict, and the rules every claim shares (../shared/STATISTICS.md §2-3).

A `Claim` is one finding of the papers checked on one run: a verdict of three values
(**holds**, **does not hold**, **not testable**), a one-line reason for it, its effect
size with a 95% interval, a paragraph with the numbers, and the tables it was read from.

A claim read from several curves (one per schedule, task, LR or gamma) holds when at
least one curve passes its one-sided test at 2.5% after Holm's correction over all its
testable curves (`family`): the same rule, and so the same number of chances, for
every claim. `claims.py` (probes and fixed LRs), `tuned_claims.py` (the tuned LR) and
`forecast.py` (the forecast's backtest) build on these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from overtrain.analysis import curves, significance
from overtrain.analysis.page import short_tokens, sig
from overtrain.analysis.replicates import replicates
from overtrain.analysis.significance import ONE_SIDED

HOLDS, DOES_NOT_HOLD, NOT_TESTABLE = "holds", "does not hold", "not testable"
# Resamples of the bootstraps whose interval *is* a verdict (the gamma exponent, the forecast)
# when the caller skips the descriptive intervals (`overtrain power`'s many simulated studies).
VERDICT_BOOT = 200


@dataclass
class Claim:
    id: str                      # short id, as claims.json names it: sensitivity, perturbation_u, ...
    title: str
    verdict: str                 # holds | does not hold | not testable
    reason: str                  # one line: why it holds, does not hold, or cannot be tested
    effect_label: str            # what `effect` measures, with its unit
    effect: float = np.nan       # of the curve with the strongest evidence
    effect_low: float = np.nan   # its 95% interval
    effect_high: float = np.nan
    finding: str = ""
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)

    @property
    def effect_text(self) -> str:
        if not np.isfinite(self.effect):
            return "n/a"
        interval = (f" [{sig(self.effect_low)}, {sig(self.effect_high)}]"
                    if not (np.isnan(self.effect_low) and np.isnan(self.effect_high)) else "")
        return f"{sig(self.effect)}{interval}"

    def as_json(self) -> dict:
        """As claims.json lists it: numbers that are not finite (an unbounded end) are null."""
        interval = [_number(self.effect_low), _number(self.effect_high)]
        return {"claim": self.id, "verdict": self.verdict, "reason": self.reason, "effect": _number(self.effect),
                "interval": None if interval == [None, None] else interval}


def _number(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def not_testable(claim_id: str, title: str, label: str, reason: str, found: pd.DataFrame | None = None,
                 name: str = "") -> Claim:
    claim_tables = [(name, found)] if found is not None and len(found) else []
    return Claim(claim_id, title, NOT_TESTABLE, reason, label, finding=f"{reason[0].upper()}{reason[1:]}.",
                 tables=claim_tables)


def family(rows: list[dict]) -> pd.DataFrame:
    """Per-curve rows with `p_value` (NaN: untestable) -> with `p_holm` and `passes`."""
    table = pd.DataFrame(rows)
    table["p_holm"] = significance.holm(table["p_value"].to_numpy(dtype=float))
    table["passes"] = table["p_holm"] <= ONE_SIDED
    return table


def reasons(table: pd.DataFrame, noun: str = "curves") -> str:
    """The distinct reasons members of a family are untestable, each once, with how many."""
    counts = table.loc[table["untestable"] != "", "untestable"].value_counts()
    return "; ".join(f"{reason} ({n} of {len(table)} {noun})" for reason, n in counts.items())


def passing(table: pd.DataFrame, verb: str = "pass", noun: str = "curves") -> str:
    """'k of n testable <noun> <verb> after Holm's correction over n'."""
    tested = int((table["untestable"] == "").sum())
    return f"{int(table['passes'].sum())} of {tested} testable {noun} {verb} after Holm's correction over {tested}"


def u_row(points: pd.DataFrame, higher_is_better: bool = False, n_boot: int = 0, seed: int = 0) -> dict:
    """The U test of one curve, as a table row; with n_boot, the 95% interval of its lowest point."""
    curve = replicates(points)
    units = curve.units() * (-1 if higher_is_better else 1)
    why = significance.untestable(units, diverged=curve.diverged)
    row = {"budgets": len(curve.tokens), "replicates": len(units), "unit": curve.unit, "untestable": why}
    if why:
        return {**row, "p_value": np.nan}
    test = significance.u_shape(units)
    sign = -1 if higher_is_better else 1
    if n_boot:
        low, high = curves.lowest_interval(curves.badness(curve, higher_is_better), n_boot, seed)
        row |= {"lowest_ci_low": low, "lowest_ci_high": high}
    return {**row, "lowest_tokens": curve.tokens[test.lowest], "lowest_index": test.lowest,
            "rise": test.rise.value * sign, "rise_low": min(test.rise.low * sign, test.rise.high * sign),
            "rise_high": max(test.rise.low * sign, test.rise.high * sign), "p_value": test.p_value}


U_LABEL = "rise from the lowest budget to the last (bpb)"


def u_verdict(claim_id: str, title: str, table: pd.DataFrame, key, name: str, label: str = U_LABEL) -> Claim:
    """Holds if any curve's U passes after Holm; the effect is the rise of the most convincing curve.
    key(row) names a curve in the text."""
    tested = table[table["untestable"] == ""]
    if tested.empty:
        return not_testable(claim_id, title, label, reasons(table), table, name)
    best = tested.loc[tested["p_value"].idxmin()]
    verdict = HOLDS if table["passes"].any() else DOES_NOT_HOLD
    untested = reasons(table)
    reason = (f"{passing(table, 'show a U')}; strongest: {key(best)}, lowest at "
              f"{short_tokens(best['lowest_tokens'])} tokens, p = {sig(best['p_value'], 2)}")
    finding = (f"{passing(table, 'show a U')}. " + describe_u(tested, key)
               + (f" Not testable: {untested}." if untested else ""))
    return Claim(claim_id, title, verdict, reason, label, best["rise"], best["rise_low"], best["rise_high"], finding,
                 [(name, table)])


def describe_u(tested: pd.DataFrame, key) -> str:
    parts = []
    for row in tested.sort_values("p_value").itertuples():
        interval = (f" (95% {short_tokens(row.lowest_ci_low)}-{short_tokens(row.lowest_ci_high)})"
                    if np.isfinite(getattr(row, "lowest_ci_low", np.nan)) else "")
        where = (f"lowest at {short_tokens(row.lowest_tokens)} tokens{interval}, rise {sig(row.rise, plus=True)} "
                 f"[{sig(row.rise_low)}, {sig(row.rise_high)}] bpb to the last budget")
        parts.append(f"{key(row)}: {where}, p = {sig(row.p_value, 2)} (Holm {sig(row.p_holm, 2)})")
    return "; ".join(parts) + "."


def moves_earlier(group: pd.DataFrame, by: str) -> bool:
    """The lowest budget never moves later as `by` (gamma, LR) grows, and ends earlier than it starts."""
    lowest = group.sort_values(by)["lowest_index"].to_numpy(dtype=float) if "lowest_index" in group else np.array([])
    lowest = lowest[np.isfinite(lowest)]
    return len(lowest) >= 2 and bool((np.diff(lowest) <= 0).all() and lowest[-1] < lowest[0])
