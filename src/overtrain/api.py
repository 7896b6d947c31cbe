"""The Python API; the CLI is a thin layer over these functions.

    import overtrain
    spec = overtrain.load_spec("examples/quick.yaml")
    run_dir = overtrain.run(spec, "runs/quick")
    frame = overtrain.load_results(run_dir)   # tidy pandas DataFrame

Each function calls into the layer that does the work, imported when it is called:
importing this module (and so `overtrain --help` and `overtrain keys`) loads no torch.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from overtrain.errors import SpecError
from overtrain.spec import StudySpec, key_reference, load_spec, parse_spec

if TYPE_CHECKING:
    import pandas as pd

    from overtrain.study.folder import RunFolder

__all__ = ["load_spec", "parse_spec", "run", "load_results", "status", "report", "reproduction", "power", "forecast",
           "theory", "audit", "probe", "keys", "run_folder", "save_traceback"]


def run(spec: StudySpec | dict | str | Path, run_dir: str | Path, retry_failed: bool = False, workers: int = 1,
        executor: str = "local", address: str | None = None, members: int | None = None) -> Path:
    """Run (or resume) a study, then its theory simulation (if it has a `theory:` section), then its report;
    `spec` may be a StudySpec, a dict or a YAML path.

    workers: jobs at once (0: one by one in this process); executor: "local" or
    "ray" (address: a Ray cluster's, or None for a local Ray instance); members: at most
    this many fine-tunes of one checkpoint trained as one ensemble job (None: the device's
    default; 1: every cell alone). See docs/ENGINE.md.
    """
    from overtrain.analysis.report import build_report
    from overtrain.study.folder import RunFolder
    from overtrain.study.runner import run_study
    from overtrain.theory.linear import config_from_dict
    from overtrain.theory.run import run_theory

    if isinstance(spec, (str, Path)):
        spec = load_spec(spec)
    elif isinstance(spec, dict):
        spec = parse_spec(spec)
    run_dir = run_study(spec, run_dir, retry_failed=retry_failed, workers=workers, executor=executor, address=address,
                        members=members)
    if spec.theory is not None:  # seconds of NumPy: recomputed, not cached
        run_theory(config_from_dict(spec.theory), RunFolder(run_dir).theory)
    build_report(run_dir)
    return run_dir


def load_results(run_dir: str | Path) -> pd.DataFrame:
    """Tidy results of the run's current plan: one row per cell and metric."""
    from overtrain.study.store import load_results as load

    return load(run_dir)


def status(run_dir: str | Path) -> pd.DataFrame:
    """One row per cell of the run's current plan: kind, label, key, status, error, note.

    Status is pending, blocked (the checkpoint it reads was not made; `note` names the diverged or
    failed cell that did not make it), running, interrupted (its run died), done, diverged or failed.
    """
    from overtrain.study.store import study_status

    return study_status(run_dir)


def run_folder(run_dir: str | Path) -> RunFolder:
    """The paths inside a run folder (results.csv, report/, logs/<key>.log, ...)."""
    from overtrain.study.folder import RunFolder

    return RunFolder(run_dir)


def report(run_dir: str | Path, task: str | None = None, max_bpb: float | None = None,
           within_bpb: float | None = None) -> Path:
    """Rebuild `run_dir/report/` from the store. The recommendation (for `task`, default every task) keeps
    pre-training-text bpb after fine-tuning at most `max_bpb`, or at most `within_bpb` above the best base
    checkpoint's held-out bpb (default 0.1); give one of the two."""
    from overtrain.analysis.report import build_report

    return build_report(run_dir, task=task, max_bpb=max_bpb, within_bpb=within_bpb)


def reproduction(run_dir: str | Path, out: str | Path = "docs/REPRODUCTION.md") -> Path:
    """Check the papers' claims on a run and write the page to `out`; its figures and claims.json (the
    verdicts for a program) go in a folder beside it (docs/reproduction/ for docs/REPRODUCTION.md)."""
    from overtrain.analysis.reproduction import write_reproduction

    return write_reproduction(run_dir, out)


def power(study: str | Path, noise_from: str | Path | None = None, simulations: int = 400, seed: int = 0):
    """Simulate `simulations` studies of the design of `study` (a study file or a run folder) without any
    effect and as many with the papers' effects, and return each claim's false-positive rate and power
    (a `PowerReport`: `.as_dict()`, `.to_text()`). The noise is measured in `noise_from` (or in `study`
    when it is a run folder), else the documented defaults; see docs/POWER.md."""
    from overtrain.analysis.power import power as estimate

    return estimate(study, noise_from, simulations, seed)


def forecast(run_dir: str | Path, first: int | None = None, n_boot: int = 1000, seed: int = 0):
    """Per fine-tuning curve of a run (schedule, task, LR), the budget after which pre-training-text bpb
    after fine-tuning turns, forecast from power laws fitted on the first `first` budgets (default: all),
    with a bootstrap interval; with fewer than all, beside the turn measured on every budget (a
    `ForecastReport`: `.table`, `.as_dict()`, `.to_text()`). See docs/REPORT.md, Forecast."""
    from overtrain.analysis.forecast import forecast_run

    return forecast_run(run_dir, first, n_boot, seed)


def theory(study: str | Path | None = None, out: str | Path = "runs/theory", overrides: dict | None = None) -> Path:
    """Simulate the two-layer linear network with the `theory:` section of `study` (defaults without one),
    `overrides` on top; write its tables, plots and summary into `out` and return the summary's path."""
    from overtrain.theory.linear import config_from_dict
    from overtrain.theory.run import SUMMARY_FILE, read_section, run_theory

    section = read_section(Path(study)) if study is not None else {}
    run_theory(config_from_dict({**section, **(overrides or {})}), out)
    return Path(out) / SUMMARY_FILE


def audit(models: Sequence[str], out: str | Path = "runs/audit", revisions: Sequence[str] = (), tokens: int | None = None,
          device: str = "auto", tokens_per_step: int | None = None, **options) -> Path:
    """Audit one model or a series (folders, a glob, .gguf files, a hub id with `revisions`, or 'smollm2')
    into `out`; `options` are `AuditConfig` fields (task, lrs, steps, gammas, benchmarks, ...). Returns the
    page written: audit.md for one model, series.md for a series. `tokens_per_step` turns the steps of
    checkpoints (trainer_state.json, or names such as checkpoint-N) into pre-training tokens."""
    from overtrain.audit.result import AuditConfig
    from overtrain.audit.run import audit as audit_one
    from overtrain.audit.run import audit_series
    from overtrain.models.series import resolve_series
    from overtrain.probes.harness import check_benchmarks

    config, out = AuditConfig(**options), Path(out)
    check_benchmarks(config.benchmarks, "benchmarks")
    series = resolve_series(list(models), list(revisions), tokens_per_step)
    if len(series) > 1:
        if tokens is not None:
            raise SpecError(f"tokens={tokens}: gives one checkpoint's pre-training tokens; "
                            "a series takes them from names or manifests")
        audit_series(series, config, out, device)
        return out / "series.md"
    if tokens is not None:
        series[0].tokens = tokens
    audit_one(series[0], config, out, device)
    return out / "audit.md"


def probe(model: str, revision: str | None = None, base: str | None = None, tokens: int = 1024, top_k: int = 1,
          trace_hvps: int = 20, kl_gamma: float = 0.5) -> pd.DataFrame:
    """Sharpness of one model's held-out loss (the first `tokens` of the default corpus): top Hessian
    eigenvalues, Hutchinson trace (0 HVPs skips it), KL proxy, critical sharpness; with `base` (the model
    it was fine-tuned from), also the curvature along the update and the drift. Tidy rows {metric, value, model}."""
    from overtrain.audit.probe import probe_model
    from overtrain.models.series import resolve_model

    options = {"top_k": top_k, "tol": 1e-3, "trace_hvps": trace_hvps, "kl_gamma": kl_gamma, "kl_seeds": [0, 1, 2]}
    return probe_model(resolve_model(model, revision), options, tokens,
                       base=resolve_model(base) if base is not None else None)


def keys() -> str:
    """The reference of every study-file key, as Markdown (the text of docs/STUDY.md)."""
    import pandas as pd

    from overtrain.analysis.page import Section, Table, to_markdown

    sections = [Section(f"`{group.key}`" if group.key else "Top level", paragraphs=[group.description] if group.description else [],
                        text_tables=[Table("", pd.DataFrame(group.rows, columns=["key", "type", "default", "meaning"]))])
                for group in key_reference()]
    intro = ("Generated from `overtrain/spec.py` by `overtrain keys`; every key below is all there is: "
             "an unknown key is an error.")
    return to_markdown("Study file reference", [], sections, intro=[intro]).rstrip("\n")


def save_traceback(error: BaseException, run_dir: str | Path | None = None) -> Path:
    """Write `error`'s traceback to a new log file and return its path: in the run folder's logs/
    when `run_dir` is an existing folder, else in overtrain's cache folder, else in the temp folder."""
    from overtrain.data.packages import cache_dir

    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    text = "".join(traceback.format_exception(error))
    candidates = [run_folder(run_dir).log(name)] if run_dir is not None and Path(run_dir).is_dir() else []
    candidates += [cache_dir() / "logs" / f"{name}.log", Path(tempfile.gettempdir()) / f"overtrain-{name}.log"]
    for path in candidates[:-1]:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path
        except OSError:
            continue
    candidates[-1].write_text(text)
    return candidates[-1]
