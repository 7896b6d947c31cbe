"""The report's figures: metrics against pre-training tokens, drawn the same way everywhere.

- x is pre-training tokens on a log axis;
- decayed schedules (cosine, wsd) are solid, the undecayed constant run dashed, each
  schedule with its own marker;
- bands are 95% intervals over seeds;
- an inflection point is a star on the curve with a shaded span for its 95% interval.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

from overtrain.analysis.page import short_tokens  # noqa: E402

# schedule -> (color, line style, marker, legend label)
SCHEDULE_STYLE = {
    "cosine": ("tab:blue", "-", "o", "cosine to zero (decayed)"),
    "wsd": ("tab:green", "-", "s", "WSD branch (decayed)"),
    "constant": ("tab:gray", "--", "^", "constant LR (undecayed)"),
    "monitored": ("tab:purple", "-", "o", "monitored run (its iterates)"),
}
UNKNOWN_STYLE = ("black", "-.", "D", None)
PANEL_SIZE = (4.6, 3.4)  # inches per panel
DPI = 100


def schedule_style(schedule: str) -> tuple[str, str, str, str]:
    color, line, marker, label = SCHEDULE_STYLE.get(schedule, UNKNOWN_STYLE)
    return color, line, marker, label or schedule


def token_axis(ax, ylabel: str, title: str) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=2))
    ax.xaxis.set_major_formatter(FuncFormatter(short_tokens))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
    ax.set_xlabel("pre-training tokens (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="major")


def draw_curve(ax, curve: pd.DataFrame, schedule: str, color: str | None = None, label: str | None = None) -> None:
    """One mean curve (tokens, mean, ci_low, ci_high) with its band, in the schedule's style."""
    own_color, line, marker, own_label = schedule_style(schedule)
    color = own_color if color is None else color
    curve = curve.sort_values("tokens")
    ax.plot(curve["tokens"], curve["mean"], line, marker=marker, ms=5, color=color, label=label or own_label)
    if "ci_low" in curve and (curve["ci_high"] > curve["ci_low"]).any():
        ax.fill_between(curve["tokens"], curve["ci_low"], curve["ci_high"], color=color, alpha=0.18, lw=0)


def mark_inflection(ax, curve: pd.DataFrame, inflection: pd.Series, color: str) -> None:
    """A star at the inflection on the (interpolated) curve and a span for its interval."""
    curve = curve.sort_values("tokens")
    y = np.interp(np.log(inflection["tokens"]), np.log(curve["tokens"]), curve["mean"])
    ax.axvspan(inflection["ci_low"], inflection["ci_high"], color=color, alpha=0.12, lw=0)
    ax.plot([inflection["tokens"]], [y], "*", ms=15, color=color, markeredgecolor="black", zorder=5)


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _legend(ax, extra_handles: list | None = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if extra_handles:
        handles, labels = handles + extra_handles, labels + [h.get_label() for h in extra_handles]
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="best")


def _inflection_handle():
    return plt.Line2D([], [], marker="*", ms=12, ls="", color="white", markeredgecolor="black",
                      label="inflection (span: 95% interval)")


def schedules_figure(table: pd.DataFrame, ylabel: str, title: str, path: Path) -> Path:
    """One panel, one line per schedule: e.g. the base model's held-out bpb."""
    fig, ax = plt.subplots(figsize=(PANEL_SIZE[0] * 1.3, PANEL_SIZE[1] * 1.1))
    for schedule, curve in table.groupby("schedule"):
        draw_curve(ax, curve, schedule)
    token_axis(ax, ylabel, title)
    _legend(ax)
    return save(fig, path)


def panels_figure(table: pd.DataFrame, hue: str, hue_label: str, ylabel: str, title: str, path: Path,
                  inflections: pd.DataFrame | None = None) -> Path:
    """A panel per schedule, a colored line per value of `hue` (gamma, LR), inflections marked."""
    schedules = sorted(table["schedule"].unique())
    hues = sorted(table[hue].unique())
    colors = dict(zip(hues, plt.cm.plasma(np.linspace(0.05, 0.8, len(hues)))))
    fig, axes = plt.subplots(1, len(schedules), figsize=(PANEL_SIZE[0] * len(schedules), PANEL_SIZE[1]),
                             squeeze=False, sharey=True)
    for ax, schedule in zip(axes[0], schedules):
        marked = False
        for value in hues:
            curve = table[(table["schedule"] == schedule) & (table[hue] == value)]
            if curve.empty:
                continue
            draw_curve(ax, curve, schedule, colors[value], f"{hue_label} {value:g}")
            found = _found_inflection(inflections, schedule, hue, value)
            if found is not None:
                mark_inflection(ax, curve, found, colors[value])
                marked = True
        token_axis(ax, ylabel if ax is axes[0][0] else "", f"{schedule_style(schedule)[3]}")
        _legend(ax, [_inflection_handle()] if marked else None)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def before_after_figure(before: pd.DataFrame, after: pd.DataFrame, ylabel: str, title: str, path: Path) -> Path:
    """A panel per schedule: the checkpoints before fine-tuning (grey) and after it, a line per LR."""
    schedules = sorted(set(before["schedule"]) | set(after["schedule"]))
    lrs = sorted(after["lr"].unique())
    colors = dict(zip(lrs, plt.cm.plasma(np.linspace(0.05, 0.8, len(lrs)))))
    fig, axes = plt.subplots(1, len(schedules), figsize=(PANEL_SIZE[0] * len(schedules), PANEL_SIZE[1]),
                             squeeze=False, sharey=True)
    for ax, schedule in zip(axes[0], schedules):
        draw_curve(ax, before[before["schedule"] == schedule], schedule, "grey", "before fine-tuning")
        for lr in lrs:
            curve = after[(after["schedule"] == schedule) & (after["lr"] == lr)]
            if not curve.empty:
                draw_curve(ax, curve, schedule, colors[lr], f"after, LR {lr:g}")
        token_axis(ax, ylabel if ax is axes[0][0] else "", f"{schedule_style(schedule)[3]}")
        _legend(ax)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def _found_inflection(inflections: pd.DataFrame | None, schedule: str, hue: str, value) -> pd.Series | None:
    if inflections is None or inflections.empty:
        return None
    match = inflections[(inflections["schedule"] == schedule) & (inflections[hue] == value) & inflections["found"]]
    return match.iloc[0] if len(match) else None


def tuned_figure(id_table: pd.DataFrame, ood_table: pd.DataFrame, id_label: str, inflections: dict[str, pd.DataFrame],
                 title: str, path: Path) -> Path:
    """Two panels at each checkpoint's tuned LR: task metric and pre-training-text bpb, by schedule."""
    fig, axes = plt.subplots(1, 2, figsize=(PANEL_SIZE[0] * 2.2, PANEL_SIZE[1] * 1.1))
    for ax, table, ylabel, key in ((axes[0], id_table, id_label, "id"),
                                   (axes[1], ood_table, "pre-training text bpb after fine-tuning", "ood")):
        marked = False
        for schedule, curve in table.groupby("schedule"):
            draw_curve(ax, curve, schedule)
            found = inflections[key]
            found = found[(found["schedule"] == schedule) & found["found"]] if not found.empty else found
            if len(found):
                mark_inflection(ax, curve, found.iloc[0], schedule_style(schedule)[0])
                marked = True
        token_axis(ax, ylabel, ylabel)
        _legend(ax, [_inflection_handle()] if marked else None)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def lr_trend_figure(tuned: pd.DataFrame, grid: list[float], title: str, path: Path) -> Path:
    """The tuned LR against tokens on log-log axes, the LR grid as horizontal guides."""
    fig, ax = plt.subplots(figsize=(PANEL_SIZE[0] * 1.3, PANEL_SIZE[1] * 1.1))
    for lr in grid:
        ax.axhline(lr, color="0.85", lw=0.8, zorder=0)
    for schedule, curve in tuned.groupby("schedule"):
        draw_curve(ax, curve.rename(columns={"lr": "mean"}), schedule)
    token_axis(ax, "ID-optimal fine-tuning LR", title)
    ax.set_yscale("log")
    ax.set_ylim(min(grid) / 2, max(grid) * 2)
    _legend(ax)
    return save(fig, path)


def matched_lr_figure(table: pd.DataFrame, title: str, path: Path) -> Path:
    """OOD loss at a shared ID loss against tokens, a panel per schedule, a line per LR."""
    return panels_figure(table.rename(columns={"ood_loss_nats": "mean"}), "lr", "LR",
                         "pre-training text loss (nats)\nat matched task loss", title, path)


def scatter_figure(points: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, title: str, path: Path,
                   diagonal: bool = False) -> Path:
    """One point per row, in its schedule's color and marker; `diagonal` draws y = x."""
    fig, ax = plt.subplots(figsize=(PANEL_SIZE[0] * 1.3, PANEL_SIZE[1] * 1.1))
    for schedule, group in points.groupby("schedule"):
        color, _, marker, label = schedule_style(schedule)
        ax.scatter(group[x], group[y], color=color, marker=marker, s=28, alpha=0.8, label=label)
    if diagonal:
        low, high = np.nanmin(points[[x, y]].to_numpy()), np.nanmax(points[[x, y]].to_numpy())
        ax.plot([low, high], [low, high], ":", color="black", lw=1, label="predicted = observed")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax)
    return save(fig, path)


def scatter_by_panel_figure(points: pd.DataFrame, x: str, y: str, panel: str, hue: str, hue_label: str,
                            xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """A panel per value of `panel` (e.g. the task), a color per value of `hue` (e.g. the LR), the
    schedule's marker; each hue's points joined in x order, so a trend within it shows."""
    panels = sorted(points[panel].unique())
    hues = sorted(points[hue].unique())
    colors = dict(zip(hues, plt.cm.plasma(np.linspace(0.05, 0.8, len(hues)))))
    fig, axes = plt.subplots(1, len(panels), figsize=(PANEL_SIZE[0] * 1.2 * len(panels), PANEL_SIZE[1] * 1.1),
                             squeeze=False)
    for ax, value in zip(axes[0], panels):
        for level in hues:
            group = points[(points[panel] == value) & (points[hue] == level)].sort_values(x)
            if group.empty:
                continue
            ax.plot(group[x], group[y], "-", color=colors[level], lw=0.8, alpha=0.5,
                    label=f"{hue_label} {level:g}" if isinstance(level, float) else f"{hue_label} {level}")
            for schedule, by_schedule in group.groupby("schedule"):
                ax.scatter(by_schedule[x], by_schedule[y], color=colors[level], marker=schedule_style(schedule)[2], s=28)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel if ax is axes[0][0] else "")
        ax.set_title(str(value), fontsize=10)
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def trade_off_figure(table: pd.DataFrame, id_label: str, title: str, path: Path) -> Path:
    """A panel per schedule: ID (y) against OOD bpb (x), one curve per mitigation through the checkpoints."""
    schedules = sorted(table["schedule"].unique())
    variants = list(dict.fromkeys(table["mitigation"]))
    colors = dict(zip(variants, plt.cm.tab10(np.arange(len(variants)) % 10)))
    fig, axes = plt.subplots(1, len(schedules), figsize=(PANEL_SIZE[0] * 1.3 * len(schedules), PANEL_SIZE[1] * 1.2),
                             squeeze=False)
    for ax, schedule in zip(axes[0], schedules):
        for variant, curve in table[table["schedule"] == schedule].groupby("mitigation", sort=False):
            curve = curve.sort_values("tokens")
            sizes = 12 + 50 * np.linspace(0, 1, len(curve))
            ax.plot(curve["mean_ood"], curve["mean_id"], "-", color=colors[variant], lw=1.2, label=variant)
            ax.scatter(curve["mean_ood"], curve["mean_id"], s=sizes, color=colors[variant], zorder=3)
        ax.set_xlabel("pre-training text bpb after fine-tuning (lower: less forgetting)")
        ax.set_ylabel(id_label)
        ax.set_title(f"{title} ({schedule})", fontsize=10)
        ax.grid(alpha=0.3)
        _legend(ax)
    return save(fig, path)


def frontier_figure(candidates: pd.DataFrame, best: pd.Series | None, runners_up: pd.DataFrame, ylabel: str,
                    limit: float, title: str, path: Path) -> Path:
    """Task metric (y) against pre-training-text bpb after fine-tuning (x), one point per candidate
    (`recommend.Recommendation.candidates`): all faint in their schedule's style, pairs with a diverged
    seed as grey crosses, the frontier as a line, the constraint's limit dotted, the recommendation a
    star and the runners-up circled."""
    fig, ax = plt.subplots(figsize=(PANEL_SIZE[0] * 1.5, PANEL_SIZE[1] * 1.3))
    usable = candidates[candidates["eligible"]]
    for schedule, group in usable.groupby("schedule"):
        color, _, marker, label = schedule_style(schedule)
        ax.scatter(group["ood_bpb"], group["validation_value"], color=color, marker=marker, s=18, alpha=0.3, label=label)
    diverged = candidates[candidates["diverged"]]
    if len(diverged):
        ax.scatter(diverged["ood_bpb"], diverged["validation_value"], color="grey", marker="x", s=18, alpha=0.5,
                   label="a seed diverged (never recommended)")
    front = usable[usable["frontier"]].sort_values("ood_bpb")
    ax.plot(front["ood_bpb"], front["validation_value"], "-", color="black", lw=1.2,
            label="frontier (nothing beats it on both axes)")
    if np.isfinite(limit):
        ax.axvline(limit, color="tab:red", ls=":", lw=1.2, label=f"constraint: at most {limit:.3g} bpb")
    if len(runners_up):
        ax.scatter(runners_up["ood_bpb"], runners_up["validation_value"], s=110, facecolors="none",
                   edgecolors="black", lw=1.2, label="runners-up", zorder=4)
    if best is not None:
        ax.plot([best["ood_bpb"]], [best["validation_value"]], "*", ms=17, color="gold", markeredgecolor="black",
                label="recommended", zorder=5)
    ax.set_xlabel("pre-training-text bpb after fine-tuning (lower: keeps more)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax)
    return save(fig, path)
