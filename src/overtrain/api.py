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
from overtrain.study.runner import STORE_FILE, load_results, run_study
from overtrain.study.store import Store

__all__ = ["load_spec", "parse_spec", "run", "load_results", "status", "report"]


def run(spec: StudySpec | dict | str | Path, run_dir: str | Path, retry_failed: bool = False) -> Path:
    """Run (or resume) a study; `spec` may be a StudySpec, a dict or a YAML path."""
    if isinstance(spec, (str, Path)):
        spec = load_spec(spec)
    elif isinstance(spec, dict):
        spec = parse_spec(spec)
    return run_study(spec, run_dir, retry_failed=retry_failed)


def status(run_dir: str | Path) -> pd.DataFrame:
    """One row per cell: kind, label, status, error."""
    path = Path(run_dir) / STORE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no {STORE_FILE} (not a run folder)")
    store = Store(path)
    try:
        return store.cells()
    finally:
        store.close()


def report(run_dir: str | Path) -> Path:
    """Rebuild `run_dir/report/` from the store."""
    return build_report(run_dir)
