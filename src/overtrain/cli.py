"""The `overtrain` command: a thin layer over the Python API.

Bad input (a study file, a run folder, a data file) ends with one line naming the
problem and exit code 2.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import typer

from overtrain.api import load_spec, report, run, status
from overtrain.checkpoints import CheckpointError
from overtrain.spec import SpecError

app = typer.Typer(
    help="Measure, explain and help avoid catastrophic overtraining: pre-train under controlled budgets and "
         "schedules, probe every checkpoint, fine-tune over LR grids, and report where fine-tuning starts to hurt.",
    no_args_is_help=True,
    add_completion=False,
)

BAD_INPUT = (SpecError, CheckpointError, FileNotFoundError, ValueError)


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="Run folder to write (resumes if it exists).")) -> None:
    """Run the default study (examples/quick.yaml) on the built-in real corpus: about 10 minutes on 2 CPU cores."""
    study = resources.files("overtrain") / "examples" / "quick.yaml"
    _run(Path(str(study)), out, retry_failed=False)


@app.command("run")
def run_command(
    study: Path = typer.Argument(..., help="Study file (YAML); see docs/STUDY.md for every key."),
    out: Path = typer.Option(None, help="Run folder; default runs/<study name>. An existing folder is resumed."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run again the cells that failed before."),
) -> None:
    """Run a study: pre-train, probe, fine-tune, report. Finished cells are never recomputed."""
    _run(study, out, retry_failed)


def _run(study: Path, out: Path | None, retry_failed: bool) -> None:
    try:
        spec = load_spec(study)
        run_dir = run(spec, out or Path("runs") / spec.name, retry_failed=retry_failed)
    except BAD_INPUT as err:
        _fail(err)
    typer.echo(f"results: {run_dir / 'results.csv'}\nreport:  {run_dir / 'report' / 'summary.md'}")


@app.command("status")
def status_command(run_dir: Path = typer.Argument(..., help="A run folder.")) -> None:
    """Cells of a run by status, and the errors of failed cells."""
    try:
        cells = status(run_dir)
    except BAD_INPUT as err:
        _fail(err)
    counts = cells.groupby(["kind", "status"]).size().unstack(fill_value=0)
    typer.echo(counts.to_string())
    for _, failed in cells[cells["status"] == "failed"].iterrows():
        last_line = (failed["error"] or "").strip().splitlines()[-1:] or [""]
        typer.echo(f"failed: {failed['label']}: {last_line[0]}")


@app.command("report")
def report_command(run_dir: Path = typer.Argument(..., help="A run folder.")) -> None:
    """Rebuild the report of a run folder from its results store alone."""
    try:
        folder = report(run_dir)
    except BAD_INPUT as err:
        _fail(err)
    typer.echo(f"report: {folder / 'summary.md'}")


@app.command("keys")
def keys_command() -> None:
    """Print the reference of every study-file key (the text of docs/STUDY.md)."""
    from overtrain.spec import reference_markdown

    typer.echo(reference_markdown())


def main() -> None:  # pragma: no cover - `python -m overtrain`
    sys.exit(app())
