"""An audit's findings in plain words: the verdict, the pages audit.md and series.md (written
through analysis.page), and the side-by-side table of a series."""

from __future__ import annotations

import numpy as np
import pandas as pd

from overtrain.analysis.page import Section, Table, to_markdown
from overtrain.audit.result import AuditResult
from overtrain.models.series import SeriesCheckpoint
from overtrain.probes import metrics


def sweep(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """The LR sweep, one row per LR at the end of its run and a first row, LR 0, for the model
    before fine-tuning; and each LR's forgetting (rise in held-out pre-training-text bpb)."""
    runs = frame[(frame["kind"] == "finetune") & frame["step"].notna()]
    before = runs[runs["step"] == 0].drop_duplicates("metric").assign(lr=0.0)  # the same start for every LR
    after = runs[(runs["step"] > 0) & (runs["step"] == runs.groupby("lr")["step"].transform("max"))]
    table = pd.concat([before, after]).pivot_table(index="lr", columns="metric", values="value")
    return table, table["ood_bpb"] - table.loc[0.0, "ood_bpb"]


def safe_up_to(result: AuditResult) -> float | None:
    """The largest LR such that it and every smaller LR tried keep forgetting within the bound."""
    _, forgetting = sweep(result.frame())
    safe = None
    for lr in sorted(result.config.lrs):
        if not forgetting.get(lr, np.inf) <= result.config.tolerance_bpb:  # a diverged run has NaN: not safe
            break
        safe = lr
    return safe


def verdict(result: AuditResult) -> str:
    """How fragile the model is under fine-tuning, in one sentence."""
    config = result.config
    _, forgetting = sweep(result.frame())
    lrs, bound, safe = sorted(config.lrs), f"+{config.tolerance_bpb:g} bpb", safe_up_to(result)
    doing = f"fine-tuning on `{config.task}` for {config.steps} steps"
    if safe == lrs[-1]:
        return f"**robust at these LRs**: {doing} keeps forgetting within {bound} at every LR tried, up to {safe:g}."
    first_bad = lrs[0] if safe is None else lrs[lrs.index(safe) + 1]
    at_bad = f"at LR {first_bad:g} it forgets {forgetting.get(first_bad, np.nan):+.3f} bpb"
    if safe is None:
        return f"**fragile at every LR tried**: {doing}, even {at_bad}, more than {bound}; try smaller LRs."
    return f"**fragile above LR {safe:g}**: {doing} keeps forgetting within {bound} up to LR {safe:g}; {at_bad}."


def _probe_value(frame: pd.DataFrame, metric: str) -> float | None:
    values = frame.loc[(frame["kind"] == "probe") & (frame["metric"] == metric), "value"]
    return values.iloc[0] if len(values) else None


def _noise_rises(frame: pd.DataFrame) -> pd.Series:
    """Mean rise in held-out bpb over the noise seeds, by noise size gamma."""
    return frame[frame["metric"] == "delta_bpb"].groupby("gamma")["value"].mean()


# -- one model: audit.md -------------------------------------------------------------

def audit_page(result: AuditResult) -> str:
    """The audit's findings as sentences, the verdict first, then the tables behind them."""
    frame, config, checkpoint = result.frame(), result.config, result.checkpoint
    base_bpb = _probe_value(frame, "bpb")
    findings = [f"Verdict: {verdict(result)}", f"Held-out bits per byte on the default corpus: **{base_bpb:.3f}**."]
    findings += [f"Noise of {gamma:g} x the init std on every matrix raises it by **{rise:+.3f} bpb** "
                 f"({100 * rise / base_bpb:+.1f}%)." for gamma, rise in _noise_rises(frame).items()]
    if (kl := _probe_value(frame, "kl_sharpness")) is not None:
        findings.append(f"KL sharpness (gamma {config.kl_gamma:g}): {kl:.4f} nats per token.")
    if (top_eig := _probe_value(frame, "hessian_top_eig")) is not None:
        findings.append(f"Top Hessian eigenvalue of the held-out loss (first {config.hessian_tokens} tokens): "
                        f"{top_eig:.4g}; a plain gradient step larger than 2 / that = {2 / top_eig:.2g} "
                        "would overshoot along its direction.")
    table, forgetting = sweep(frame)
    tokens = checkpoint.tokens if checkpoint.tokens is not None else "unknown"
    sections = [Section("In plain words", bullets=findings),
                Section("Fine-tuning sweep (lr 0 = before fine-tuning)",
                        text_tables=[Table("", table.assign(forgetting_bpb=forgetting), index=True)]),
                Section("Cost", paragraphs=[cost_words(result)],
                        text_tables=[Table("", result.costs.table().round(2), index=True)])]
    intro = [f"Weights sha256 `{checkpoint.weights_sha256}`; tokens seen in pre-training: {tokens}."]
    return to_markdown(f"Audit of `{result.model}`", [], sections, intro=intro)


def cost_words(result: AuditResult) -> str:
    """Time, memory and speed of the audit in one paragraph."""
    costs, config = result.costs, result.config
    gpu = f", {costs.peak_gpu_gib:.2f} GiB on the GPU" if costs.peak_gpu_gib is not None else ""
    return (f"On `{costs.device}`: {sum(costs.seconds.values()) / 60:.1f} minutes; peak resident memory "
            f"**{max(costs.peak_resident_gib.values()):.2f} GiB**{gpu}. Evaluation ran at "
            f"**{costs.eval_tokens_per_second:,.0f} tokens/s** (windows of {config.batch_size} x {config.seq_len}), "
            f"fine-tuning at **{costs.train_tokens_per_second:,.0f} tokens/s** (AdamW, batches of "
            f"{config.batch_size} sequences of up to {config.finetune_seq_len} tokens, padding included).")


# -- a series: series.md and series.csv -------------------------------------------------

def side_by_side(results: list[AuditResult]) -> pd.DataFrame:
    """Every audited checkpoint's figures, one column each, in token order."""
    return pd.concat([_figures(result) for result in results], axis=1) if results else pd.DataFrame()


def _figures(result: AuditResult) -> pd.Series:
    frame, checkpoint = result.frame(), result.checkpoint
    table, forgetting = sweep(frame)
    figures = {"tokens": checkpoint.tokens, "weights sha256": checkpoint.weights_sha256[:16],
               metrics.label("bpb"): _probe_value(frame, "bpb")}
    for gamma, rise in _noise_rises(frame).items():
        figures[f"bpb rise, noise {gamma:g} x init std"] = rise
    for metric in ("kl_sharpness", "hessian_top_eig"):
        if (value := _probe_value(frame, metric)) is not None:
            figures[metrics.label(metric)] = value
    benchmarks = [column for column in table.columns if column.startswith("bench_") and column.endswith("_acc")]
    for lr in table.index:
        when = "before fine-tuning" if lr == 0 else f"after LR {lr:g}"
        if lr:
            figures[f"forgetting (bpb) {when}"] = forgetting[lr]
        figures[f"task bpb {when}"] = table.loc[lr, "id_bpb"]
        for column in benchmarks:
            figures[f"{column.removeprefix('bench_').removesuffix('_acc')} accuracy {when}"] = table.loc[lr, column]
    figures["safe up to LR"] = safe_up_to(result)
    figures["minutes"] = sum(result.costs.seconds.values()) / 60
    figures["peak resident GiB"] = max(result.costs.peak_resident_gib.values())
    return pd.Series(figures, name=checkpoint.label)


def series_page(results: list[AuditResult], series: list[SeriesCheckpoint], table: pd.DataFrame) -> str:
    """The series page: each checkpoint's verdict, repeats of earlier weights, then the figures side by side."""
    by_label = {result.model: result for result in results}
    verdicts = []
    for checkpoint in series:
        tokens = f"{checkpoint.tokens:,} tokens" if checkpoint.tokens is not None else "tokens unknown"
        if checkpoint.duplicate_of:
            verdicts.append(f"`{checkpoint.label}` ({tokens}): **duplicate weights**, identical to "
                            f"`{checkpoint.duplicate_of}` (sha256 `{checkpoint.weights_sha256[:16]}...`); "
                            f"audited once, as `{checkpoint.duplicate_of}`.")
        else:
            verdicts.append(f"`{checkpoint.label}` ({tokens}): {verdict(by_label[checkpoint.label])}")
    sections = [Section("Verdicts", bullets=verdicts),
                Section("Side by side", paragraphs=["Each checkpoint's own report, with its sweep and timings: "
                                                    "`<checkpoint>/audit.md`. The series drawn against tokens, as a "
                                                    "study's report (sensitivity, forgetting at each LR, the "
                                                    "frontier): `report/index.html` (checkpoints whose tokens are "
                                                    "unknown have no point there)."],
                        text_tables=[Table("", table.map(_readable), index=True)])]
    return to_markdown(f"Audit of a series of {len(series)} checkpoints", [], sections)


def _readable(value) -> str:
    """A cell of the side-by-side table: whole numbers with separators, others to 4 digits, '-' for none."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)
