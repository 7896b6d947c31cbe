"""The report of a run folder, rebuilt from its results store alone.

`build_report(run_dir)` writes `run_dir/report/`:

- `index.html`: one self-contained page (figures embedded), the recommendation first,
  then the base model, sensitivity, fine-tuning at fixed and at tuned LR, sharpness,
  theory and mitigations, each section only when the study measured it;
- `summary.md`: the same text with links to the PNGs beside it;
- `recommendation.json`: the recommendation, one object per task;
- `tables/*.csv`: every table behind a figure or a number on the page.

The statistics (inflection points, rank trends, tuned LR, matched-loss forgetting,
the recommendation) live in `curves.py` and `recommend.py`; this module only
chooses what to show and says it in words. docs/REPORT.md explains how to read it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from overtrain.analysis import curves, page, plots, tables
from overtrain.analysis.page import Figure, Section, Table, sig
from overtrain.analysis.page import short_tokens
from overtrain.analysis.recommend import Constraint, Recommendation, id_metric_for, recommend, reporting_metric
from overtrain.errors import SpecError, StoreError
from overtrain.probes import metrics
from overtrain.study.folder import ReportFolder, RunFolder
from overtrain.study.plan import MONITORED
from overtrain.study.store import load_results
from overtrain.theory.run import TITLE as THEORY_TITLE
from overtrain.theory.run import written_summary

RECOMMENDATION_ROWS = 8  # shown in the text: the recommendation, its runners-up and the next candidates by the rule


def build_report(run_dir: str | Path, task: str | None = None, max_bpb: float | None = None,
                 within_bpb: float | None = None, n_boot: int = curves.N_BOOT, seed: int = 0) -> Path:
    """Write `run_dir/report/` and return its path.

    task: the fine-tuning task to recommend for (default: every task of the study).
    max_bpb: the most pre-training-text bpb after fine-tuning the recommendation may have;
    within_bpb instead: at most this much above the best base checkpoint's held-out bpb
    (the default, recommend.DEFAULT_WITHIN_BPB). Give one of the two.
    n_boot, seed: bootstrap resamples behind every interval, and their seed.
    """
    Constraint.of(max_bpb, within_bpb)  # a bad option is named before the folder is read
    folder = RunFolder(run_dir)
    results = load_results(run_dir)  # first: it names the missing or damaged store of a folder that is not a run
    study = json.loads(read_settings(folder).read_text())
    return write_report(results, study, folder.report.path, task, max_bpb, within_bpb, n_boot, seed,
                        theory_dir=folder.theory)


def write_report(results: pd.DataFrame, study: dict, out: Path, task: str | None = None,
                 max_bpb: float | None = None, within_bpb: float | None = None, n_boot: int = curves.N_BOOT,
                 seed: int = 0, theory_dir: Path | None = None) -> Path:
    """The report of tidy `results` of a study (its study.json as a dict) into folder `out`.

    max_bpb, within_bpb: the recommendation's constraint (see `build_report`).
    theory_dir: where the study's theory simulation wrote its PNGs and tables, if it has one.
    """
    constraint = Constraint.of(max_bpb, within_bpb)
    report = Report(results, out, n_boot, seed, theory_dir)
    report.check_task(task)  # bad input is named before the previous build is removed
    files = ReportFolder(out)
    files.tables.mkdir(parents=True, exist_ok=True)
    remove_previous_build(out)
    sections = report.sections(task, constraint) if not results.empty else [
        Section("No results yet", ["The store has no finished cells; run the study first."])]
    title = f"overtrain report: {study['name']}"
    settings = study_settings(study)
    files.html.write_text(page.to_html(title, settings, sections))
    files.markdown.write_text(page.to_markdown(title, settings, sections))
    for section in sections:
        for name, table in section.tables:
            table.to_csv(files.table(name), index=False)
    return out


def read_settings(folder: RunFolder) -> Path:
    """The file that says what the run measured: a study's study.json, or a monitored training run's monitor.json."""
    for path in (folder.study, folder.monitor):
        if path.exists():
            return path
    raise StoreError(f"{folder}: has a results store but no study.json or monitor.json to say what it measured")


def remove_previous_build(out: Path) -> None:
    """Drop the figures, tables and answer of an earlier build, so nothing stale survives a rebuild."""
    for stale in [*out.glob("*.png"), *ReportFolder(out).tables.glob("*.csv")]:
        stale.unlink()
    ReportFolder(out).recommendation.unlink(missing_ok=True)


def study_settings(study: dict) -> list[tuple[str, str]]:
    """The settings a reader needs to interpret the numbers, as (label, value) pairs."""
    if study.get("monitor"):
        settings = monitored_settings(study["monitor"])
    elif study.get("audit"):
        settings = audited_settings(study["audit"])
    else:
        settings = own_checkpoint_settings(study) if study.get("pretrain") else existing_checkpoint_settings(study)
    if study.get("sensitivity"):
        sens = study["sensitivity"]
        settings.append(("perturbation", f"gamma {', '.join(f'{g:g}' for g in sens['gammas'])}; "
                                         f"{len(sens['seeds'])} noise seeds"))
    if study.get("finetune"):
        ft = study["finetune"]
        settings.append(("fine-tuning", f"tasks {', '.join(ft['tasks'])}; LRs {', '.join(f'{lr:g}' for lr in ft['lrs'])}; "
                                        f"{ft['steps']} steps; {len(ft['seeds'])} seeds"))
    return settings


def own_checkpoint_settings(study: dict) -> list[tuple[str, str]]:
    pre, model = study["pretrain"], study["model"]
    return [
        ("model", ", ".join([f"preset {model.get('preset')}"] +
                            [f"{k} {v}" for k, v in model.items() if k != "preset" and v is not None])),
        ("corpus, tokenizer", f"{study['data']['corpus']}, vocabulary {study['tokenizer']['vocab_size']}"),
        ("pre-training budgets", ", ".join(short_tokens(b) for b in pre["budgets"]) + " tokens"),
        ("schedules", f"{', '.join(pre['schedules'])}; peak LR {pre['peak_lr']:g}"),
    ]


def monitored_settings(monitor: dict) -> list[tuple[str, str]]:
    """A training run measured as it trained (overtrain.monitor): the model, the text, how tokens were counted."""
    return [("monitored training run", f"{monitor['model']}, measured by overtrain.monitor as it trained"),
            ("held-out text", f"{monitor['heldout_tokens']:,} tokens in windows of {monitor['seq_len']}; "
                              f"KL sharpness at gamma {monitor['kl_gamma']:g} on the first batch"),
            ("tokens seen", monitor["tokens_counted"])]


def audited_settings(audit: dict) -> list[tuple[str, str]]:
    """A series measured by `overtrain audit`: where the checkpoints come from, and the text."""
    return [("checkpoints", "; ".join(audit["sources"])),
            ("held-out text", f"the default corpus' held-out documents, the first {audit['heldout_tokens']:,} tokens "
                              "in each checkpoint's own tokenizer")]


def existing_checkpoint_settings(study: dict) -> list[tuple[str, str]]:
    """A study of checkpoints that are not ours: where they come from (the report lists each one)."""
    section = study["checkpoints"]
    folders = [section["folders"]] if isinstance(section["folders"], str) else section["folders"]
    sources = [*folders, *([f"{section['hub']} revisions {', '.join(section['revisions'])}"] if section["hub"] else []),
               *section["gguf"]]
    return [("checkpoints", "; ".join(sources)),
            ("corpus, tokenizer", f"{study['data']['corpus']}, the checkpoints' own tokenizer")]


class Report:
    """Builds the sections of one run's report; each method is one section."""

    def __init__(self, results: pd.DataFrame, out: Path, n_boot: int, seed: int, theory_dir: Path | None = None):
        # Every section but the mitigations one compares plain fine-tunes only.
        self.with_mitigations = results
        results = tables.plain(results)
        self.results, self.out, self.n_boot, self.seed, self.theory_dir = results, out, n_boot, seed, theory_dir
        final = tables.finetune_final(results)
        self.tasks = sorted(final["task"].dropna().unique())
        # The task metric is chosen per task: accuracy where it tells runs apart, else bpb.
        self.task_metrics = {task: id_metric_for(final[final["task"] == task]) for task in self.tasks}

    def sections(self, task: str | None, constraint: Constraint) -> list[Section]:
        lead, residue = self.recommendation([task] if task else self.tasks, constraint), self.residue()
        lead.paragraphs += residue.paragraphs  # a habit that survives fine-tuning belongs beside the answer
        series = tables.series_checkpoints(self.results)
        lead.paragraphs += duplicate_notes(series)  # one point fewer than the user gave: say so up front
        return [
            lead,
            self.checkpoints(series),
            self.base_model(),
            self.sensitivity(),
            *[self.fixed_lr(t) for t in self.tasks],
            *[self.tuned_lr(t) for t in self.tasks],
            residue,
            self.sharpness(),
            self.theory(),
            self.mitigations(),
            self.diverged(),
        ]

    # -- the answer -------------------------------------------------------------------

    def check_task(self, task: str | None) -> None:
        """A task asked for by name must be one the run fine-tuned on (once it has any)."""
        if task is not None and self.tasks and task not in self.tasks:
            raise SpecError(f"--task {task}: this run has no fine-tuning results for it "
                            f"(its tasks: {', '.join(self.tasks)})")

    def recommendation(self, tasks: list[str], constraint: Constraint) -> Section:
        """Per task: the candidate (checkpoint, LR, step) to fine-tune, its frontier figure and the
        candidate table; also written as recommendation.json."""
        section = Section("Recommendation", lead=True)
        if not tasks:
            section.paragraphs.append(MONITORED_LEAD if (self.results["schedule"] == MONITORED).any() else
                                      "No fine-tuning results yet: the recommendation needs the fine-tuning sweep.")
        answers = []
        for task in tasks:
            found = recommend(self.results, task, constraint, self.n_boot, self.seed)
            answers.append(found.to_json())
            section.paragraphs += describe_recommendation(found)
            if found.candidates.empty:
                continue
            section.text_tables.append(Table(f"{task}: the recommendation first, then its runners-up and the next "
                                             "candidates by the rule (seed means).", shown_candidates(found)))
            section.figures.append(self.frontier(found))
            section.tables.append((f"recommendation_{file_stem(task)}", found.candidates))
        if tasks:
            section.paragraphs.append(RECOMMENDATION_RULE)
        ReportFolder(self.out).recommendation.write_text(json.dumps(answers, indent=1) + "\n")
        return section

    def frontier(self, found: Recommendation) -> Figure:
        label = metrics.label(found.id_metric)
        png = plots.frontier_figure(found.candidates, found.best, found.runners_up,
                                    f"{label}, validation half ({metrics.direction(found.id_metric)})",
                                    found.limit_bpb, f"{found.task}: task result vs pre-training text after fine-tuning",
                                    self.out / f"recommendation_frontier_{file_stem(found.task)}.png")
        return Figure(png, f"Every candidate (checkpoint, LR, step; seed means) of {found.task}: {label} on the "
                           "validation half, which chooses, against pre-training-text bpb after fine-tuning "
                           "(absolute). Black line: the frontier, where nothing is better on both axes. Star: the "
                           f"recommendation; circles: its runners-up; dotted: the constraint ({found.constraint}). "
                           f"How often each wins: {found.resampling}.")

    # -- existing checkpoints -------------------------------------------------------------

    def checkpoints(self, series: pd.DataFrame) -> Section:
        """Where each existing checkpoint came from and its weights hash."""
        if series.empty:
            return Section("Checkpoints")
        return Section("Checkpoints", [
            f"{len(series)} existing checkpoints, each identified by the sha256 of its weights (first 16 hex digits; "
            "the whole hash is in its folder's overtrain.json, or in an audit's audit.json).", *duplicate_notes(series)],
            tables=[("checkpoints", series)])

    # -- the base model -----------------------------------------------------------------

    def base_model(self) -> Section:
        base = tables.base_metrics(self.results)
        if base.empty:
            return Section("Base model")
        curve = tables.mean_with_ci(base.rename(columns={"bpb": "value"}), ["schedule", "decayed", "tokens"])
        figure = plots.schedules_figure(curve, metrics.label("bpb"), "Base model on held-out pre-training text",
                                        self.out / "base_bpb.png")
        seeds = len(tables.pretrain_seeds(self.results))
        over = f" (mean over {seeds} pre-training seeds, bands: 95% intervals over them)" if seeds > 1 else ""
        changes = [f"{s}: {_first_last(c, 'mean')}" for s, c in curve.groupby("schedule")]
        caption = (f"Held-out bpb of each checkpoint before any change ({metrics.direction('bpb')}){over}. "
                   + "; ".join(changes) + ".")
        return Section("Base model", figures=[Figure(figure, caption)], tables=[("base_model", base)])

    # -- progressive sensitivity ----------------------------------------------------------

    def sensitivity(self) -> Section:
        delta = tables.probe_points(self.results, "delta_bpb")
        if delta.empty:
            return Section("Sensitivity to Gaussian perturbation")
        perturbed = tables.probe_points(self.results, "perturbed_bpb")
        trends = curves.rank_trends(delta, ["schedule", "gamma"], self.n_boot, self.seed)
        t_pre = curves.inflections(perturbed, ["schedule", "gamma"], n_boot=self.n_boot, seed=self.seed)
        delta_table = tables.mean_with_ci(delta, ["schedule", "decayed", "gamma", "tokens"])
        perturbed_table = tables.mean_with_ci(perturbed, ["schedule", "decayed", "gamma", "tokens"])
        delta_png = plots.panels_figure(delta_table, "gamma", "gamma", "bpb increase under noise",
                                        "Sensitivity: bpb increase from noise theta + gamma sigma_init eps",
                                        self.out / "sensitivity_delta_bpb.png")
        perturbed_png = plots.panels_figure(perturbed_table, "gamma", "gamma", "held-out bpb of perturbed model",
                                            "Perturbed model: a U-curve means more tokens start to hurt",
                                            self.out / "sensitivity_perturbed_bpb.png", t_pre)
        return Section(
            "Sensitivity to Gaussian perturbation",
            ["Each checkpoint is perturbed with Gaussian noise scaled by each tensor's initialization std; "
             "bands are 95% intervals over noise seeds. " + interval_scope(self.results, "noise seeds")],
            [Figure(delta_png, "How much the same noise hurts, by tokens. Rank correlation with tokens (Spearman, "
                    "95% bootstrap interval): " + describe_trends(trends, "gamma") + "."),
             Figure(perturbed_png, "Bpb after perturbation. Inflection T_pre (the budget after which more "
                    "pre-training makes the perturbed model worse): " + describe_inflections(t_pre, "gamma") + ".")],
            [("sensitivity_delta_bpb", delta_table), ("sensitivity_rank_trend", trends),
             ("perturbed_bpb", perturbed_table), ("inflection_T_pre_by_gamma", t_pre)],
        )

    # -- fine-tuning ------------------------------------------------------------------------

    def fixed_lr(self, task: str) -> Section:
        id_metric, higher_is_better = self.task_metrics[task]
        ood = _task(tables.final_points(self.results, "ood_bpb"), task)
        task_metric = _task(tables.final_points(self.results, id_metric), task)
        by = ["schedule", "decayed", "lr", "tokens"]
        ood_table, id_table = tables.mean_with_ci(ood, by), tables.mean_with_ci(task_metric, by)
        t_pre = curves.inflections(ood, ["schedule", "lr"], n_boot=self.n_boot, seed=self.seed)
        t_ft = curves.inflections(task_metric, ["schedule", "lr"], higher_is_better, self.n_boot, self.seed)
        id_label = metrics.label(id_metric)
        ood_png = plots.panels_figure(ood_table, "lr", "LR", "pre-training text bpb after fine-tuning",
                                      f"Forgetting on {task}: pre-training text after fine-tuning at a fixed LR",
                                      self.out / f"fixed_lr_ood_{file_stem(task)}.png", t_pre)
        id_png = plots.panels_figure(id_table, "lr", "LR", f"{id_label} after fine-tuning",
                                     f"Task performance on {task} after fine-tuning at a fixed LR",
                                     self.out / f"fixed_lr_id_{file_stem(task)}.png", t_ft)
        return Section(
            f"Fine-tuning on {task} at a fixed LR",
            ["Every checkpoint fine-tuned with the same hyper-parameters; values at the end of fine-tuning, "
             "bands are 95% intervals over fine-tuning seeds. " + interval_scope(self.results, "fine-tuning seeds")],
            [Figure(ood_png, f"Pre-training-text bpb after fine-tuning ({metrics.direction('ood_bpb')}). T_pre: "
                    + describe_inflections(t_pre, "lr", "LR") + "." + diverged_note(ood_table)),
             Figure(id_png, f"{id_label.capitalize()} after fine-tuning. T_ft (the budget after which task performance "
                    "after fine-tuning gets worse): " + describe_inflections(t_ft, "lr", "LR") + "."
                    + diverged_note(id_table))],
            [(f"fixed_lr_ood_{file_stem(task)}", ood_table), (f"fixed_lr_id_{file_stem(task)}", id_table),
             (f"inflection_T_pre_by_lr_{file_stem(task)}", t_pre), (f"inflection_T_ft_by_lr_{file_stem(task)}", t_ft)],
        )

    def tuned_lr(self, task: str) -> Section:
        id_metric, higher_is_better = self.task_metrics[task]
        # Each run stops at its best validation step; the validation part chooses the LR, the test part reports it.
        task_results = self.results[self.results["task"] == task]
        stopped = tables.early_stopped(task_results, id_metric, higher_is_better)
        choose = tables.final_points(task_results, id_metric, stopped)
        shown_metric = reporting_metric(id_metric, tables.finetune_metrics_present(self.results))
        task_metric = tables.final_points(task_results, shown_metric, stopped)
        ood = tables.final_points(task_results, "ood_bpb", stopped)
        tuned = curves.tuned_lr(choose, higher_is_better)
        id_at, ood_at = curves.tuned_points(task_metric, tuned), curves.tuned_points(ood, tuned)
        by = ["schedule", "decayed", "tokens"]
        id_table, ood_table = tables.mean_with_ci(id_at, by), tables.mean_with_ci(ood_at, by)
        found = {"id": curves.inflections(id_at, ["schedule"], higher_is_better, self.n_boot, self.seed),
                 "ood": curves.inflections(ood_at, ["schedule"], n_boot=self.n_boot, seed=self.seed)}
        trends = pd.DataFrame([{"schedule": s, **curves.lr_trend(rows).__dict__} for s, rows in tuned.groupby("schedule")])
        grid = sorted(tables.finetune_final(self.results)["lr"].dropna().unique())
        figures = [
            Figure(plots.tuned_figure(id_table, ood_table, f"{metrics.label(shown_metric)} after fine-tuning", found,
                                      f"{task} at the tuned LR (best task result per checkpoint)",
                                      self.out / f"tuned_lr_{file_stem(task)}.png"),
                   f"At each checkpoint's ID-optimal LR. T_ft: {describe_inflections(found['id'])}. "
                   f"T_pre: {describe_inflections(found['ood'])}." + diverged_note(id_table)),
            Figure(plots.lr_trend_figure(tuned, grid, f"ID-optimal LR on {task}", self.out / f"tuned_lr_trend_{file_stem(task)}.png"),
                   "The LR with the best task result, by tokens (grey lines: the LR grid). Trend of log LR* against "
                   "log tokens: " + "; ".join(f"{r.schedule}: {r.trend} (slope {sig(r.slope, 2, plus=True)})"
                                              for r in trends.itertuples()) + "." + grid_edge_note(tuned, grid)),
        ]
        section_tables = [(f"tuned_lr_{file_stem(task)}", tuned), (f"tuned_lr_id_{file_stem(task)}", id_table),
                          (f"tuned_lr_ood_{file_stem(task)}", ood_table), (f"tuned_lr_trend_{file_stem(task)}", trends),
                          (f"inflection_T_ft_tuned_{file_stem(task)}", found["id"]), (f"inflection_T_pre_tuned_{file_stem(task)}", found["ood"])]
        figures += self.matched_loss(task, section_tables)
        figures += self.benchmarks(task, tuned, section_tables)
        return Section(f"Fine-tuning on {task} at the tuned LR", [
            f"In practice the LR is tuned per checkpoint for the task. The LR is picked on the mean over seeds of "
            f"{metrics.label(id_metric)} (the validation part of the task's held-out examples) and the task result is "
            f"shown on the test part ({metrics.label(shown_metric)}); bands are 95% intervals over seeds at that LR. Trend rule: |slope| < 0.1 constant, "
            "slope between -0.5 and -0.1 slowly decreasing, steeper quickly decreasing. "
            + interval_scope(self.results, "fine-tuning seeds")], figures, section_tables)

    def matched_loss(self, task: str, section_tables: list) -> list[Figure]:
        """Forgetting compared at equal task loss rather than at equal steps."""
        paths = _task(tables.trajectories(self.results), task)
        across_checkpoints = curves.matched_loss_across_checkpoints(paths)
        across_lrs = curves.matched_loss_across_lrs(paths)
        # A diverged run's evaluations before it diverged are in the seed means; its curve ends early.
        partial = " Diverged runs enter with their evaluations before they diverged." if paths["diverged"].any() else ""
        figures = []
        if not across_checkpoints.empty:
            tau = across_checkpoints["tau_id_loss_nats"].iloc[0]
            png = plots.schedules_figure(across_checkpoints.rename(columns={"ood_loss_nats": "mean"}),
                                         "lowest pre-training text loss (nats)",
                                         f"Forgetting at matched task loss <= {sig(tau)} nats",
                                         self.out / f"matched_loss_checkpoints_{file_stem(task)}.png")
            figures.append(Figure(png, f"Each checkpoint's lowest pre-training-text loss among evaluations "
                                       f"(any LR, any step, seed means) whose task loss reached {sig(tau)} nats, the "
                                       "worst of the checkpoints' best task losses. " +
                                       "; ".join(f"{s}: {_first_last(c, 'ood_loss_nats')}"
                                                 for s, c in across_checkpoints.groupby("schedule")) + "." + partial))
            section_tables.append((f"matched_loss_checkpoints_{file_stem(task)}", across_checkpoints))
        if not across_lrs.empty:
            png = plots.matched_lr_figure(across_lrs, f"Large vs small LR at the same task loss ({task})",
                                          self.out / f"matched_loss_lrs_{file_stem(task)}.png")
            largest = across_lrs.loc[across_lrs.groupby("checkpoint")["lr"].idxmax()]
            figures.append(Figure(png, "Per checkpoint, each LR's pre-training-text loss where its (seed-mean) "
                                       "trajectory first reaches the task loss that all learning LRs reach, "
                                       "interpolated linearly between evaluations. The largest LR forgets "
                                       f"{sig(largest['extra_vs_smallest_lr'].median(), plus=True)} nats vs the "
                                       "smallest (median over checkpoints)." + partial))
            section_tables.append((f"matched_loss_lrs_{file_stem(task)}", across_lrs))
        return figures

    def benchmarks(self, task: str, tuned: pd.DataFrame, section_tables: list) -> list[Figure]:
        """Benchmark accuracies (`bench_<name>_acc`) after fine-tuning at the tuned LR, where measured."""
        figures = []
        for metric in sorted(m for m in tables.finetune_metrics_present(self.results) if m.startswith("bench_")):
            points = curves.tuned_points(_task(tables.final_points(self.results, metric), task), tuned)
            table = tables.mean_with_ci(points, ["schedule", "decayed", "tokens"])
            name = metric.removeprefix("bench_").removesuffix("_acc")
            png = plots.schedules_figure(table, f"{name} accuracy", f"{name} after fine-tuning on {task} (tuned LR)",
                                         self.out / f"{metric}_{file_stem(task)}.png")
            changes = "; ".join(f"{s}: {_first_last(c, 'mean')}" for s, c in table.groupby("schedule"))
            figures.append(Figure(png, f"Benchmark {name} ({metrics.direction(metric)}) at the tuned LR. {changes}."
                                       + diverged_note(table)))
            section_tables.append((f"{metric}_{file_stem(task)}", table))
        return figures

    # -- sections that appear once their data exist ----------------------------------------

    def residue(self) -> Section:
        """The docstring habit of pre-training, before and after fine-tuning on code without it."""
        section = Section("Behavioural residue: docstrings")
        start, final = tables.finetune_start(self.results), tables.finetune_final(self.results)
        by_checkpoint = ["schedule", "decayed", "tokens"]
        for task in sorted(final.loc[final["metric"] == "docstring_rate", "task"].unique()):
            # Every fine-tune of a checkpoint measures it before training: one row per sampling seed is enough.
            before = _task(start.query("metric == 'docstring_rate'"), task).drop_duplicates(["checkpoint", "seed"])
            after = _task(final.query("metric == 'docstring_rate'"), task)
            before_table = tables.mean_with_ci(before, by_checkpoint)
            after_table = tables.mean_with_ci(after, [*by_checkpoint, "lr"])
            png = plots.before_after_figure(before_table, after_table, "docstring rate of sampled function bodies",
                                            f"Docstrings after fine-tuning on {task}",
                                            self.out / f"residue_{file_stem(task)}.png")
            habit, after_by_lr = before_table["mean"].mean(), after_table.groupby("lr")["mean"].mean()
            section.paragraphs.append(
                f"Behavioural residue on {task}: sampled function bodies open with a docstring {habit:.1%} of the "
                "time before fine-tuning, " + ", ".join(f"{rate:.1%} after it at LR {lr:g}" for lr, rate in after_by_lr.items())
                + " (means over checkpoints and seeds).")
            left = ("no docstrings were sampled before fine-tuning, so there is no habit to lose" if habit == 0 else
                    "share of the habit left (mean over checkpoints, after / before): " + "; ".join(
                        f"LR {lr:g}: {rate / habit:.0%}" for lr, rate in after_by_lr.items()))
            section.figures.append(Figure(png, (
                f"Held-out function headers, 4 sampled bodies each: how often the model opens the body with a "
                f"docstring, before fine-tuning (grey) and after fine-tuning on {task} (bands: 95% intervals over "
                f"seeds). Before: " + "; ".join(f"{s}: {_first_last(c, 'mean')}" for s, c in before_table.groupby("schedule"))
                + f". The {left}." + diverged_note(after_table) + " " + interval_scope(self.results, "sampling seeds"))))
            section.tables += [(f"residue_before_{file_stem(task)}", before_table),
                               (f"residue_after_{file_stem(task)}", after_table)]
        return section

    def sharpness(self) -> Section:
        section = Section("Sharpness")
        with_intervals = False
        for metric in tables.probe_metrics_present(self.results, list(metrics.SHARPNESS)):
            points = tables.probe_points(self.results, metric)
            has_gamma = points["gamma"].notna().any()
            by = ["schedule", "decayed", *(["gamma"] if has_gamma else []), "tokens"]
            table = tables.mean_with_ci(points, by)
            label, path = metrics.label(metric), self.out / f"sharpness_{metric}.png"
            png = plots.panels_figure(table, "gamma", "gamma", label, label, path) if has_gamma \
                else plots.schedules_figure(table, label, f"{label} of the pre-trained model", path)
            trends = curves.rank_trends(points, ["schedule", *(["gamma"] if has_gamma else [])], self.n_boot, self.seed)
            with_intervals |= bool(trends["ci_low"].notna().any())
            section.figures.append(Figure(png, f"{label} by tokens. Rank correlation with tokens: "
                                               + describe_trends(trends, "gamma" if has_gamma else None) + "."))
            section.tables += [(f"sharpness_{metric}", table), (f"sharpness_{metric}_rank_trend", trends)]
            section.figures += self.sharpness_and_forgetting(metric, label, section.tables)
        section.figures += self.forgetting_prediction(section.tables)
        if with_intervals:
            section.paragraphs.append(interval_scope(self.results, "noise seeds"))
        return section

    def sharpness_and_forgetting(self, metric: str, label: str, section_tables: list) -> list[Figure]:
        """Do sharper checkpoints forget more? Counted as STATISTICS.md says: one point per checkpoint
        (per pre-training seed) within each task and LR, one Spearman rho per (task, LR); the
        fine-tuning seeds of a checkpoint share its sharpness, so they are one point, not several."""
        points = tables.sharpness_vs_forgetting(self.results, metric)
        found = tables.rank_correlations(points, metric, "forgetting_bpb", ["task", "lr"])
        if found.empty or found["n"].max() < 3:
            return []
        png = plots.scatter_by_panel_figure(points, metric, "forgetting_bpb", "task", "lr", "LR", label,
                                            "forgetting: rise in held-out bpb", f"{label} vs forgetting after fine-tuning",
                                            self.out / f"sharpness_vs_forgetting_{metric}.png")
        section_tables += [(f"sharpness_vs_forgetting_{metric}", points), (f"sharpness_vs_forgetting_{metric}_rho", found)]
        return [Figure(png, "Each point: one checkpoint fine-tuned on one task (panel) at one LR (color), its "
                            "forgetting averaged over the fine-tuning seeds. " + describe_correlations(found, label)
                            + diverged_note(points))]

    def forgetting_prediction(self, section_tables: list) -> list[Figure]:
        """The quadratic model along the update against the loss rise it predicts."""
        points = tables.predicted_vs_observed(self.results)
        if len(points) < 2:
            return []
        png = plots.scatter_figure(points, "predicted_total_nats", "observed_forgetting_nats",
                                   "predicted rise g.u + 0.5 u'Hu (nats/token)", "observed rise (nats/token)",
                                   "Forgetting predicted by curvature along the update", self.out / "forgetting_predicted.png",
                                   diagonal=True)
        section_tables.append(("forgetting_predicted", points))
        rho = stats.spearmanr(points["predicted_total_nats"], points["observed_forgetting_nats"])[0]
        return [Figure(png, f"One point per fine-tuning run: the second-order Taylor model of the held-out loss at the "
                            f"base weights, evaluated at the fine-tuned weights, against the measured rise. "
                            f"Spearman correlation {sig(rho, 2)} over {len(points)} runs.")]

    def theory(self) -> Section:
        """The linear-network theory's figures and summary tables, from the files `run_theory` wrote."""
        folder = self.theory_dir
        summary = written_summary(folder) if folder is not None else []
        if not summary:
            return Section(THEORY_TITLE)
        figures = [Figure(png, png.stem.replace("_", " ")) for png in sorted(folder.glob("*.png"))]
        return Section(THEORY_TITLE, figures=figures, text_tables=summary)

    def mitigations(self) -> Section:
        """Per mitigation, at each checkpoint's tuned LR: task result against forgetting, and where T_pre lands."""
        variants = tables.mitigations_present(self.with_mitigations)
        if len(variants) < 2:
            return Section("Mitigations")
        section = Section("Mitigations", ["Each mitigation at each checkpoint's ID-optimal LR (mean over seeds). "
                                          "A curve that sits lower and further left keeps more of pre-training for "
                                          "the same task result; T_pre is where forgetting starts to grow with tokens. "
                                          + interval_scope(self.results, "fine-tuning seeds")])
        for task in self.tasks:
            id_metric, higher_is_better = self.task_metrics[task]
            tuned_rows, found, diverged = [], [], []
            for variant in variants:
                results = tables.only_mitigation(self.with_mitigations, variant)
                task_metric = _task(tables.final_points(results, id_metric), task)
                ood = _task(tables.final_points(results, "ood_bpb"), task)
                if task_metric.empty:
                    continue
                tuned = curves.tuned_lr(task_metric, higher_is_better)
                id_table = tables.mean_with_ci(curves.tuned_points(task_metric, tuned), ["schedule", "tokens"])
                ood_at = curves.tuned_points(ood, tuned)
                ood_table = tables.mean_with_ci(ood_at, ["schedule", "tokens"])
                merged = id_table.merge(ood_table, on=["schedule", "tokens"], suffixes=("_id", "_ood"))
                tuned_rows.append(merged.assign(mitigation=variant))
                found.append(curves.inflections(ood_at, ["schedule"], n_boot=self.n_boot, seed=self.seed).assign(mitigation=variant))
                if id_table["diverged"].sum():
                    diverged.append(f"{_variant_name(variant)}: {int(id_table['diverged'].sum())}")
            if not tuned_rows:
                continue
            trade_off, inflections = pd.concat(tuned_rows), pd.concat(found)
            png = plots.trade_off_figure(trade_off, metrics.label(id_metric), f"Mitigations on {task}: task result vs forgetting",
                                         self.out / f"mitigations_{file_stem(task)}.png")
            moved = "; ".join(f"{_variant_name(r.mitigation)} ({r.schedule}): "
                              + (f"{short_tokens(r.tokens)} [{short_tokens(r.ci_low)}, {short_tokens(r.ci_high)}]" if r.found else "no inflection within the budgets")
                              for r in inflections.itertuples())
            unstable = (f" Diverged runs at the tuned LR, left out of the means: {'; '.join(diverged)}."
                        if diverged else "")
            section.figures.append(Figure(png, f"One curve per mitigation, points in token order (larger markers: more "
                                               f"tokens). T_pre at the tuned LR: {moved}.{unstable}"))
            section.tables += [(f"mitigations_{file_stem(task)}", trade_off), (f"mitigations_T_pre_{file_stem(task)}", inflections)]
        return section

    def diverged(self) -> Section:
        """Every run that diverged, of any kind and any mitigation, with the step it diverged at."""
        rows = tables.diverged_runs(self.with_mitigations)
        if rows.empty:
            return Section("Diverged runs")
        kinds = ", ".join(f"{count} {KIND_WORDS.get(kind, (kind, kind))[count > 1]}"
                          for kind, count in rows["kind"].value_counts().items())
        return Section("Diverged runs", [(
            f"{len(rows)} run{'s' if len(rows) > 1 else ''} diverged ({kinds}), each listed below with the step it "
            "diverged at. A fine-tune that diverged has no final evaluation: it stays in every table, flagged "
            "diverged, with no final value (never its last evaluation before it diverged); a figure whose curves "
            "contain one says so, and a (checkpoint, LR) with a diverged seed is never recommended.")],
            tables=[("diverged_runs", rows)], text_tables=[Table("", rows.dropna(axis=1, how="all"))])


# -- words ---------------------------------------------------------------------------------

RECOMMENDATION_RULE = (
    "How the recommendation is chosen: every evaluation step after step 0 of every plain fine-tune is a candidate "
    "(checkpoint, LR, step), valued by its seed mean (fine-tuning seeds within each pre-training seed, then over "
    "pre-training seeds). The validation half of the task's held-out examples chooses the candidate and its step; "
    "the test half reports it. Among candidates that meet the constraint on pre-training-text bpb after fine-tuning "
    "(absolute), the best validation task result wins: it is on the frontier, so no candidate is better on both. "
    "When none meets it, the frontier candidate with the lowest pre-training-text bpb is shown instead. A "
    "(checkpoint, LR) with a diverged seed is never recommended. Forgetting (after minus the checkpoint's own bpb "
    "before fine-tuning) is shown, not used: it would penalize a checkpoint for having been better to begin with. "
    "'Chosen in x%' is how often a candidate wins when the seeds are redrawn and the whole choice is made again.")

MONITORED_LEAD = (
    "A training run measured as it trained (overtrain.monitor): held-out bpb, the bpb rise under Gaussian noise and "
    "the KL sharpness of its iterates, against tokens, below. A rise under noise that grows with tokens is the early "
    "sign of a model getting harder to fine-tune. Nothing was fine-tuned, so there is no recommendation: "
    "`overtrain audit` on saved checkpoints finds the fine-tuning LRs that keep forgetting within a bound.")


def describe_recommendation(found: Recommendation) -> list[str]:
    """The answer for one task in a sentence or three: what to run, what it gives, how sure."""
    best = found.best
    if best is None:
        why = ("every (checkpoint, LR) had a diverged seed" if len(found.candidates)
               else "no fine-tune of this task has an evaluation yet")
        return [f"{found.task}: nothing to recommend: {why}."]
    reported = metrics.label(found.reported_metric)
    outcome = (f"{reported} {sig(best['value'])}" + ("" if found.reported_metric == found.id_metric
                                                    else f" (validation {sig(best['validation_value'])})")
               + f"; pre-training-text bpb after fine-tuning {sig(best['ood_bpb'])} "
                 f"({sig(best['forgetting_bpb'], 2, plus=True)} from the checkpoint's own start)")
    if found.constraint_met:
        lines = [f"{found.task}: fine-tune {_choice(best)} and stop at step {best['step']:.0f}: {outcome}. "
                 f"Constraint met: {found.constraint}. {_how_sure(best)}"]
    else:
        lines = [f"{found.task}: no candidate meets the constraint ({found.constraint}). The closest is "
                 f"{_choice(best)} stopped at step {best['step']:.0f}, the lowest pre-training-text bpb after "
                 f"fine-tuning on the frontier: {outcome}. {_how_sure(best)}"]
    if found.reported_metric == found.id_metric:
        lines.append("This run has no test half of the task's examples (written before the split): the task value "
                     "shown is the validation one that made the choice, so it is optimistic.")
    runners = found.runners_up
    if len(runners):
        lines.append("Runners-up: " + "; ".join(
            f"{_choice(r)}, step {r['step']:.0f} ({reported} {sig(r['value'])}, pre-training-text bpb "
            f"{sig(r['ood_bpb'])}" + ("" if np.isnan(r["p_best"]) else f", chosen in {r['p_best']:.0%}") + ")"
            for _, r in runners.iterrows()) + ".")
    diverged = found.candidates[found.candidates["diverged"]].drop_duplicates(["checkpoint", "lr"])
    if len(diverged):
        lines.append("Never recommended, a seed diverged: " + "; ".join(
            f"{r['checkpoint']} at LR {r['lr']:g}" for _, r in diverged.iterrows()) + ".")
    return lines


def _how_sure(best: pd.Series) -> str:
    if np.isnan(best["p_best"]):
        return "How often it wins when seeds are redrawn is not known: one seed."
    return f"Chosen in {best['p_best']:.0%} of seed resamples."


def shown_candidates(found: Recommendation) -> pd.DataFrame:
    """The first candidates by the rule, the columns a reader compares."""
    return found.candidates.head(RECOMMENDATION_ROWS)[
        ["checkpoint", "lr", "step", "validation_value", "value", "ood_bpb", "forgetting_bpb", "p_best", "feasible",
         "frontier"]]


def duplicate_notes(series: pd.DataFrame) -> list[str]:
    """One sentence per checkpoint whose weights repeat an earlier one's."""
    repeats = series[series["duplicate_of"].notna()]
    return [f"Duplicate weights: {row.checkpoint} ({short_tokens(row.tokens)} tokens) holds exactly the weights of "
            f"{row.duplicate_of} (sha256 {row.weights}...); it was measured once, as {row.duplicate_of}, and is not "
            "a separate point in the curves." for row in repeats.itertuples()]


def _choice(row: pd.Series) -> str:
    seeds = row["pretrain_seeds"]
    across = f", pre-training seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""
    return (f"the {row['schedule']} checkpoint at {short_tokens(row['tokens'])} tokens ({row['checkpoint']}{across}) "
            f"at LR {row['lr']:g}")


def describe_inflections(found: pd.DataFrame, column: str | None = None, label: str | None = None) -> str:
    """'cosine, LR 0.001: after ~41k tokens (95% 30k-60k); constant, LR 0.001: still improving at 131k tokens'."""
    if found.empty:
        return "not enough data"
    found_parts, missing = [], {}
    for row in found.itertuples():
        name = row.schedule + (f", {label or column} {getattr(row, column):g}" if column else "")
        if row.found:
            found_parts.append(f"{name}: after ~{short_tokens(row.tokens)} tokens (between the budgets "
                               f"{short_tokens(row.bracket_low)} and {short_tokens(row.bracket_high)}; 95% "
                               f"{short_tokens(row.ci_low)}-{short_tokens(row.ci_high)}; U test p = {sig(row.p_value, 2)})")
        else:
            missing.setdefault(row.note.split(": ", 1)[-1], []).append(name)
    # Curves without an inflection share a few reasons: say each reason once.
    missing_parts = [f"{reason} ({'all curves' if len(names) == len(found) else '; '.join(names)})"
                     for reason, names in missing.items()]
    return "; ".join(found_parts + missing_parts)


def describe_trends(trends: pd.DataFrame, hue: str | None) -> str:
    parts = []
    for row in trends.itertuples():
        name = row.schedule + (f", {hue} {getattr(row, hue):g}" if hue else "")
        interval = "" if np.isnan(row.ci_low) else f" [{sig(row.ci_low, 2)}, {sig(row.ci_high, 2)}]"
        parts.append(f"{name}: rho {sig(row.rho, 2)}{interval}")
    return "; ".join(parts)


def _first_last(curve: pd.DataFrame, column: str) -> str:
    curve = curve.sort_values("tokens")
    first, last = curve.iloc[0], curve.iloc[-1]
    return (f"{sig(first[column])} at {short_tokens(first['tokens'])} to {sig(last[column])} "
            f"at {short_tokens(last['tokens'])} tokens")


MAX_LISTED = 6  # points or pairs named in a sentence; the tables hold them all
KIND_WORDS = {"pretrain": ("pre-training run", "pre-training runs"), "finetune": ("fine-tune", "fine-tunes")}


def interval_scope(results: pd.DataFrame, second_level: str = "fine-tuning/noise seeds") -> str:
    """What the intervals of a section cover, said in every section that shows intervals.

    With one pre-training seed, every checkpoint of a schedule comes from one run: the
    intervals cannot include that run's own luck, the largest source of noise.
    """
    seeds = tables.pretrain_seeds(results)
    if len(seeds) >= 2:
        return (f"Intervals count the {len(seeds)} pre-training seeds as the replicates, with the {second_level} "
                "within each one level below.")
    why = ("the checkpoints of one existing run" if (results["kind"] == "import").any()
           else "the iterates of one monitored run" if (results["schedule"] == MONITORED).any()
           else "one pre-training seed; add pretrain.seeds")
    return f"Intervals cover {second_level} only, not the pre-training run's own luck ({why})."


def grid_edge_note(tuned: pd.DataFrame, grid: list[float]) -> str:
    """A tuned LR at an end of the grid is a bound, not an optimum (STATISTICS §6): say where."""
    edge = curves.at_grid_edge(tuned, grid)
    if edge.empty:
        return ""
    return (f" At {len(edge)} of {len(tuned)} budgets the tuned LR is at an end of the grid: the best LR may lie "
            "outside it, so there the trend is bounded by the grid, not measured.")


def diverged_note(summary: pd.DataFrame) -> str:
    """' Contains 2 diverged runs (cosine at 4.1k tokens, LR 0.001: 1; ...): ...' for a figure's
    summary table (its `diverged` column counts them per point), or '' when none diverged."""
    counts = summary["diverged"].fillna(0).astype(int) if "diverged" in summary else pd.Series(dtype=int)
    hit = summary[counts > 0]
    if hit.empty:
        return ""
    named = "; ".join(f"{_point_name(row)}: {int(row['diverged'])}" for _, row in hit.head(MAX_LISTED).iterrows())
    more = f"; {len(hit) - MAX_LISTED} more points" if len(hit) > MAX_LISTED else ""
    total = int(hit["diverged"].sum())
    return (f" Contains {total} diverged run{'s' if total > 1 else ''} ({named}{more}): no final value, so those "
            "points average the seeds that finished (the table's diverged column counts them).")


def _point_name(row: pd.Series) -> str:
    parts = [str(row["schedule"])] if "schedule" in row else []
    parts += [f"{short_tokens(row['tokens'])} tokens"] if "tokens" in row else []
    parts += [f"{name} {row[column]:g}" for column, name in (("gamma", "gamma"), ("lr", "LR")) if column in row]
    return ", ".join(parts)


def describe_correlations(found: pd.DataFrame, label: str) -> str:
    """Spearman rho per (task, LR) over its checkpoints, then what they say together."""
    tested = found[found["rho"].notna()]
    if tested.empty:
        return f"Too few checkpoints, or no spread, to correlate {label} with forgetting in any (task, LR)."
    named = "; ".join(f"{r.task}, LR {r.lr:g}: {sig(r.rho, 2)} (n = {r.n}, p = {sig(r.p_value, 2)})"
                      for r in tested.head(MAX_LISTED).itertuples())
    more = f"; {len(tested) - MAX_LISTED} more in the table" if len(tested) > MAX_LISTED else ""
    words = f"Spearman rho of {label} with forgetting within each (task, LR), over its checkpoints: {named}{more}."
    if len(tested) < 2:
        return words
    positive = int((tested["rho"] > 0).sum())
    return (words + f" Median rho {sig(tested['rho'].median(), 2)}; positive in {positive} of {len(tested)} "
            "(task, LR) pairs (they share their checkpoints, so they are not independent tests).")


def _variant_name(variant: str) -> str:
    return "plain fine-tuning" if variant == "none" else variant


def file_stem(task: str) -> str:
    """A task name made safe for a file name (user tasks are paths)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(task).stem if task.endswith(".jsonl") else task).strip("_")


def _task(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    return frame[frame["task"] == task]
