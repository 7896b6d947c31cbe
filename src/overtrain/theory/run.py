"""Run the linear-network theory into a folder: tables, plots and a summary."""

from __future__ import annotations

from pathlib import Path

from overtrain.theory.linear import TheoryConfig, TheoryResult, simulate
from overtrain.theory.plots import plot_theory


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
    (out_dir / "summary.md").write_text(result.summary() + "\n")
    return result
