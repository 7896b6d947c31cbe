"""The report of a run folder, built from the results store alone.

`report/` gets one PNG per question and `summary.md` with the tables behind them.
Decayed checkpoints (cosine, wsd) are drawn solid, undecayed ones (constant) dashed;
token axes are logarithmic; bands are 95% intervals over seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from overtrain.analysis import tables  # noqa: E402

# (color, line style, marker): decayed schedules solid, the undecayed constant run dashed.
SCHEDULE_STYLE = {"cosine": ("tab:blue", "-", "o"), "wsd": ("tab:green", "-", "s"), "constant": ("tab:gray", "--", "^")}
SCHEDULE_LABEL = {"cosine": "cosine to zero (decayed)", "wsd": "WSD branch (decayed)", "constant": "constant LR (undecayed)"}


def build_report(run_dir: str | Path) -> Path:
    from overtrain.study.runner import load_results

    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    results = load_results(run_dir)
    study = json.loads((run_dir / "study.json").read_text())
    sections = [f"# Study `{study['name']}`\n", _settings(study)]
    if results.empty:
        sections.append("No finished results yet.\n")
    else:
        sections += _base_section(results, out)
        sections += _sensitivity_section(results, out)
        sections += _finetune_section(results, out)
        diverged = tables.diverged_runs(results)
        if not diverged.empty:
            sections += ["## Diverged runs\n", diverged.to_markdown(index=False), ""]
    (out / "summary.md").write_text("\n".join(sections) + "\n")
    return out


def _settings(study: dict) -> str:
    pre, model = study["pretrain"], study["model"]
    return (f"Model preset `{model['preset']}`, tokenizer `{study['tokenizer']['vocab_size']}`, corpus `{study['data']['corpus']}`; "
            f"budgets {', '.join(f'{b:,}' for b in pre['budgets'])} tokens; schedules {', '.join(pre['schedules'])}; "
            f"peak LR {pre['peak_lr']:g}.\n")


def _base_section(results: pd.DataFrame, out: Path) -> list[str]:
    base = tables.base_metrics(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for schedule, rows in base.groupby("schedule"):
        _line(ax, rows["tokens"], rows["bpb"], schedule)
    _axes(ax, "held-out bits per byte", "(a) Base model on held-out pre-training text")
    _save(fig, out / "a_base_bpb.png")
    return ["## (a) Base model\n", "![base bpb](a_base_bpb.png)\n", _table(base), ""]


def _sensitivity_section(results: pd.DataFrame, out: Path) -> list[str]:
    delta = tables.sensitivity(results, "delta_bpb")
    if delta.empty:
        return []
    perturbed = tables.sensitivity(results, "perturbed_bpb")
    lines = ["## (b, c) Gaussian perturbation\n",
             "Noise theta + gamma * sigma_init * eps; bands: 95% interval over noise seeds.\n"]
    for table, name, ylabel, title in ((delta, "b_sensitivity.png", "bpb increase under noise", "(b) Sensitivity"),
                                       (perturbed, "c_perturbed_bpb.png", "perturbed held-out bpb", "(c) Perturbed model")):
        gammas = sorted(table["gamma"].unique())
        fig, axes = plt.subplots(1, len(gammas), figsize=(5 * len(gammas), 4), squeeze=False)
        for ax, gamma in zip(axes[0], gammas):
            for schedule, rows in table[table["gamma"] == gamma].groupby("schedule"):
                _line(ax, rows["tokens"], rows["mean"], schedule, rows["ci_low"], rows["ci_high"])
            _axes(ax, ylabel, f"{title}, gamma = {gamma:g}")
        _save(fig, out / name)
        lines += [f"![{title}]({name})\n", _table(table), ""]
    return lines


def _finetune_section(results: pd.DataFrame, out: Path) -> list[str]:
    lines = []
    for metric, name, ylabel, title in (
        ("ood_bpb", "d_ood_after_finetune.png", "pre-training text bpb after fine-tuning", "(d) Forgetting (OOD)"),
        ("id_bpb", "e_id_after_finetune.png", "task held-out bpb after fine-tuning", "(e) Task performance (ID)"),
    ):
        table = tables.finetune_curves(results, metric)
        if table.empty:
            continue
        tasks = sorted(table["task"].unique())
        fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            rows = table[table["task"] == task]
            lrs = sorted(rows["lr"].unique())
            colors = plt.cm.viridis([i / max(1, len(lrs) - 1) for i in range(len(lrs))])
            for color, lr in zip(colors, lrs):
                for schedule, curve in rows[rows["lr"] == lr].groupby("schedule"):
                    _, style, marker = SCHEDULE_STYLE.get(schedule, ("k", "-", "o"))
                    curve = curve.sort_values("tokens")
                    ax.plot(curve["tokens"], curve["mean"], style, marker=marker, ms=4, color=color,
                            label=f"lr {lr:g}, {schedule}")
                    ax.fill_between(curve["tokens"], curve["ci_low"], curve["ci_high"], color=color, alpha=0.15)
            _axes(ax, ylabel, f"{title}: {task}")
        _save(fig, out / name)
        lines += [f"## {title}\n", f"![{title}]({name})\n", _table(table), ""]
    return lines


def _line(ax, x, y, schedule, low=None, high=None) -> None:
    color, style, marker = SCHEDULE_STYLE.get(schedule, ("k", "-", "o"))
    order = x.argsort()
    ax.plot(x.iloc[order], y.iloc[order], style, marker=marker, ms=4, color=color, label=SCHEDULE_LABEL.get(schedule, schedule))
    if low is not None:
        ax.fill_between(x.iloc[order], low.iloc[order], high.iloc[order], color=color, alpha=0.2)


def _axes(ax, ylabel: str, title: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("pre-training tokens (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, floatfmt=".4g")
