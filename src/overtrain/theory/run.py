"""Run the linear-network theory into a folder: tables, plots and summary.md."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from overtrain.analysis import page
from overtrain.analysis.page import Section, Table
from overtrain.errors import SpecError
from overtrain.theory.linear import TheoryConfig, TheoryResult, simulate
from overtrain.theory.plots import plot_theory

TITLE = "Theory: two-layer linear network"
SUMMARY_FILE = "summary.md"


def read_section(path: Path) -> dict:
    """The `theory:` section of a YAML file (a study file, or examples/theory.yaml); {} when it has none."""
    if not path.is_file():
        raise SpecError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: malformed YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("theory", {}), dict):
        raise SpecError(f"{path}: `theory` must be a mapping")
    return dict(data.get("theory") or {})


def run_theory(config: TheoryConfig, out_dir: str | Path) -> TheoryResult:
    """Simulate and write `<out_dir>/{learning,checkpoints,perturbation,finetune,inflection_points}.csv`,
    the four PNGs and `summary.md`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = simulate(config)
    for name in ("learning", "checkpoints", "perturbation", "finetune"):
        getattr(result, name).to_csv(out_dir / f"{name}.csv", index=False)
    result.inflection_points().to_csv(out_dir / "inflection_points.csv", index=False)
    plot_theory(result, out_dir)
    (out_dir / SUMMARY_FILE).write_text(summary_markdown(result))
    return result


def summary_markdown(result: TheoryResult) -> str:
    """Where each U-curve bottoms out, and what fine-tuning costs per (lr, lam), as a Markdown page."""
    section = Section("Minima and fine-tuning cost", text_tables=summary_tables(result.inflection_points(), result.finetune))
    return page.to_markdown(TITLE, [], [section])


def written_summary(out_dir: Path) -> list[Table]:
    """The summary tables of the simulation `run_theory` wrote into `out_dir`; [] when there is none."""
    points = out_dir / "inflection_points.csv"
    return summary_tables(pd.read_csv(points), pd.read_csv(out_dir / "finetune.csv")) if points.is_file() else []


def summary_tables(points: pd.DataFrame, finetune: pd.DataFrame) -> list[Table]:
    """Minima of the U-curves (`points`: `TheoryResult.inflection_points()`) and fine-tuning cost."""
    perturbation = points[points["probe"] == "perturbation"][["gamma", "time", "loss", "interior"]]
    at_minimum = points[points["probe"] == "finetune"][["lr", "lam", "time", "loss", "finetune_loss", "interior"]]
    cost = (finetune.sort_values("time").groupby(["lr", "lam"], as_index=False)["finetune_loss_after"]
            .agg(finetune_loss_mean="mean", finetune_loss_last="last"))
    return [Table("Perturbed pre-training loss: minimum per gamma (time = pre-training steps)", perturbation),
            Table("Pre-training loss after fine-tuning: minimum per (lr, lam); finetune_loss at that checkpoint",
                  at_minimum),
            Table("Fine-tuning loss: mean over checkpoints and at the last checkpoint", cost)]
