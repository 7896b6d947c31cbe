"""A series audit drawn as a study's report: `report/index.html` beside series.md.

Every audited checkpoint's rows already have a study's columns and metric names; here
they get what a study's rows also carry (schedule "series", a cell per probe and per LR,
one row per checkpoint with its source and weights hash, duplicates included), and
`analysis.report.write_report` draws them against tokens: held-out bpb, sensitivity per
gamma, KL sharpness, pre-training-text bpb and the task after fine-tuning at each LR,
the tuned LR, and the recommendation with its frontier. Checkpoints whose tokens are
unknown are listed but have no point on a tokens axis.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from overtrain.analysis.report import write_report
from overtrain.audit.result import AuditConfig, AuditResult
from overtrain.models.series import SeriesCheckpoint
from overtrain.study.plan import SERIES


def series_report(results: list[AuditResult], series: list[SeriesCheckpoint], parameters: dict[str, int],
                  config: AuditConfig, out: Path) -> Path | None:
    """Write the report of a series audit into `out` (index.html, summary.md, tables/, figures);
    None, and no page, when no checkpoint's tokens are known (nothing to draw against tokens).

    parameters: each audited checkpoint's parameter count, by label."""
    if all(checkpoint.tokens is None for checkpoint in series):
        return None
    study = {"name": f"audit of a series of {len(series)} checkpoints",
             "audit": {"sources": [checkpoint.source for checkpoint in series], "heldout_tokens": config.heldout_tokens},
             "sensitivity": {"gammas": list(config.gammas), "seeds": list(config.noise_seeds)},
             "finetune": {"tasks": [config.task], "lrs": list(config.lrs), "steps": config.steps, "seeds": [config.seed]}}
    return write_report(study_rows(results, series, parameters), study, out, seed=config.seed)


def study_rows(results: list[AuditResult], series: list[SeriesCheckpoint], parameters: dict[str, int]) -> pd.DataFrame:
    """The audits' rows as a study's results: a cell per probe and per (checkpoint, LR), and an
    "import" row per checkpoint naming its source, weights and the checkpoint it repeats."""
    measured = pd.concat([result.frame() for result in results], ignore_index=True)
    measured = measured[measured["tokens"].notna()]  # no place on a tokens axis
    per_lr = measured["checkpoint"] + "/lr=" + measured["lr"].map("{:g}".format)
    measured = measured.assign(cell=per_lr.where(measured["kind"] == "finetune", measured["checkpoint"] + "/probe"))
    checkpoints = pd.DataFrame([{
        "kind": "import", "cell": f"{c.label}/import", "checkpoint": c.label, "tokens": c.tokens,
        "weights": c.weights_sha256[:16], "duplicate_of": c.duplicate_of, "source": c.source, "metric": "parameters",
        "value": parameters[c.duplicate_of or c.label]} for c in series])
    return pd.concat([checkpoints, measured], ignore_index=True).assign(schedule=SERIES, decayed=0, pretrain_seed=0)
