"""Figures of a linear-network simulation: one PNG per effect, log time axes throughout.

`plot_theory(result, out_dir)` writes
  incremental_learning.png  learned fraction of each singular direction, pre-training
                            loss and weight norm vs time
  perturbation.png          expected loss increase (sensitivity) and perturbed loss per
                            gamma, minima marked
  finetune_lr.png           pre-training loss after fine-tuning per LR (no penalty),
                            minima marked
  regularization.png        per LR: pre-training loss after fine-tuning and the
                            fine-tuning loss, one line per lambda
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from overtrain.theory.linear import TheoryResult  # noqa: E402

TIME_LABEL = "pre-training steps (log)"


def plot_theory(result: TheoryResult, out_dir: str | Path) -> list[Path]:
    """Write the four figures into out_dir (created if missing); return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _save(_incremental_learning(result), out_dir / "incremental_learning.png"),
        _save(_perturbation(result), out_dir / "perturbation.png"),
        _save(_finetune_lr(result), out_dir / "finetune_lr.png"),
        _save(_regularization(result), out_dir / "regularization.png"),
    ]


def _incremental_learning(result: TheoryResult):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for direction, curve in result.learning.groupby("direction"):
        target = curve["target_value"].iloc[0]
        left.plot(curve["time"], curve["learned_value"] / target, label=f"direction {direction} (s = {target:.3g})")
    _axes(left, "learned / target singular value", "Incremental learning: one direction after another")
    left.legend(fontsize=7)

    checkpoints = result.checkpoints
    right.plot(checkpoints["time"], checkpoints["pretrain_loss"], color="tab:blue", label="pre-training loss")
    right.set_yscale("log")
    _axes(right, "pre-training loss (log)", "Loss falls while the weights grow")
    norm_axis = right.twinx()
    norm_axis.plot(checkpoints["time"], checkpoints["weight_norm_sq"], color="tab:red", linestyle="--",
                   label="||W1||² + ||W2||²")
    norm_axis.set_ylabel("weight norm²")
    _merged_legend(right, norm_axis)
    return fig


def _perturbation(result: TheoryResult):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    minima = _minima(result, "perturbation")
    for gamma, curve in result.perturbation.groupby("gamma"):
        label = f"γ = {gamma:g}"
        left.plot(curve["time"], curve["expected_increase"], label=label)
        line, = right.plot(curve["time"], curve["perturbed_loss"], label=label)
        best = minima[minima["gamma"] == gamma].iloc[0]
        right.plot(best["time"], best["loss"], marker="*", markersize=13, color=line.get_color(), linestyle="none")
    left.set_yscale("log")
    right.set_yscale("log")
    _axes(left, "expected loss increase (log)", "Sensitivity grows with pre-training")
    _axes(right, "perturbed pre-training loss (log)", "Perturbed loss is U-shaped (★ = minimum)")
    left.legend()
    right.legend()
    return fig


def _finetune_lr(result: TheoryResult):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    unregularized = result.finetune[result.finetune["lam"] == result.config.lams[0]]
    minima = _minima(result, "finetune")
    for lr, curve in unregularized.groupby("lr"):
        line, = ax.plot(curve["time"], curve["pretrain_loss_after"], label=f"fine-tuning lr = {lr:g}")
        best = minima[(minima["lr"] == lr) & (minima["lam"] == result.config.lams[0])].iloc[0]
        ax.plot(best["time"], best["loss"], marker="*", markersize=13, color=line.get_color(), linestyle="none")
    ax.set_yscale("log")
    _axes(ax, "pre-training loss after fine-tuning (log)",
          f"Fine-tuning {result.config.finetune_steps} steps, λ = {result.config.lams[0]:g} (★ = minimum)")
    ax.legend()
    return fig


def _regularization(result: TheoryResult):
    lrs = result.config.finetune_lrs
    fig, axes = plt.subplots(2, len(lrs), figsize=(4.2 * len(lrs), 7.5), squeeze=False)
    minima = _minima(result, "finetune")
    for column, lr in enumerate(lrs):
        top, bottom = axes[0, column], axes[1, column]
        for lam, curve in result.finetune[result.finetune["lr"] == lr].groupby("lam"):
            label = f"λ = {lam:g}"
            line, = top.plot(curve["time"], curve["pretrain_loss_after"], label=label)
            best = minima[(minima["lr"] == lr) & (minima["lam"] == lam)].iloc[0]
            top.plot(best["time"], best["loss"], marker="*", markersize=13, color=line.get_color(), linestyle="none")
            bottom.plot(curve["time"], curve["finetune_loss_after"], label=label)
        for ax in (top, bottom):
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        _axes(top, "pre-training loss after fine-tuning (log)", f"lr = {lr:g}: penalty delays the minimum (★)")
        _axes(bottom, "fine-tuning loss after fine-tuning (log)", f"lr = {lr:g}: ... at a cost on the task")
    return fig


def _minima(result: TheoryResult, probe: str) -> pd.DataFrame:
    points = result.inflection_points()
    return points[points["probe"] == probe]


def _axes(ax, ylabel: str, title: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel(TIME_LABEL)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)


def _merged_legend(ax, twin) -> None:
    lines, labels = ax.get_legend_handles_labels()
    twin_lines, twin_labels = twin.get_legend_handles_labels()
    ax.legend(lines + twin_lines, labels + twin_labels, fontsize=8, loc="center left")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
