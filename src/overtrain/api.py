"""The Python API; the CLI is a thin layer over these functions.

    import overtrain
    spec = overtrain.load_spec("examples/quick.yaml")
    run_dir = overtrain.run(spec, "runs/quick")
    frame = overtrain.load_results(run_dir)   # tidy pandas DataFrame
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from overtrain.analysis.report import build_report
from overtrain.spec import StudySpec, load_spec, parse_spec
from overtrain.study.runner import load_results, run_study, study_status

__all__ = ["load_spec", "parse_spec", "run", "load_results", "status", "report"]


def run(spec: StudySpec | dict | str | Path, run_dir: str | Path, retry_failed: bool = False, workers: int = 1,
        executor: str = "local", address: str | None = None) -> Path:
    """Run (or resume) a study; `spec` may be a StudySpec, a dict or a YAML path.

    workers: cells at once (0: one by one in this process); executor: "local" or
    "ray" (address: a Ray cluster's, or None for a local Ray instance). See docs/ENGINE.md.
    """
    if isinstance(spec, (str, Path)):
        spec = load_spec(spec)
    elif isinstance(spec, dict):
        spec = parse_spec(spec)
    return run_study(spec, run_dir, retry_failed=retry_failed, workers=workers, executor=executor, address=address)


def status(run_dir: str | Path) -> pd.DataFrame:
    """One row per cell of the run's current plan: kind, label, key, status, error.

    Status is pending, running, interrupted (its run died), done, diverged or failed.
    """
    return study_status(run_dir)


def report(run_dir: str | Path, task: str | None = None, tolerance_bpb: float = 0.05) -> Path:
    """Rebuild `run_dir/report/` from the store; the recommendation is for `task` within
    `tolerance_bpb` of forgetting (rise in held-out pre-training bpb)."""
    return build_report(run_dir, task=task, tolerance_bpb=tolerance_bpb)
