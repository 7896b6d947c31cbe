"""The audit of a real model, or of a series of them: how fragile is it, and which fine-tuning LRs are safe?

For a model we did not train (an HF folder, a hub id with a revision, a GGUF file):
1. held-out bits-per-byte on the default corpus' held-out documents, in its own tokenizer;
2. Gaussian sensitivity over gamma (noise in units of the config's initializer_range);
3. the KL sharpness proxy, and the top Hessian eigenvalue on a small subset if asked;
4. a short fine-tuning LR sweep on a task, measuring the task (ID) and forgetting
   (held-out bpb and benchmark accuracy) after each LR, from the same start;
5. `audit.md` in plain words: a fragility verdict, the LR range that keeps
   forgetting within the user's bound, and what the audit cost (time per phase, peak
   memory, evaluation and training tokens/s).

The model is restored bit for bit between LRs from one copy of its weights. A series
is audited checkpoint by checkpoint (once per distinct weights), and `series.md` puts
their figures side by side with each one's verdict.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from overtrain.data.benchmarks import evaluate_mc, load_benchmark
from overtrain.data.corpus import default_heldout_batches
from overtrain.data.tasks import load_task, tokenize_examples
from overtrain.data.tokenizer import token_byte_lengths
from overtrain.runtime.device import pick_device
from overtrain.runtime.hashing import weights_sha256
from overtrain.models.build import init_stds
from overtrain.probes.curvature import causal_lm_objective, hessian_eigenvalues
from overtrain.probes.loss import heldout_metrics
from overtrain.probes.perturb import gaussian_sensitivity
from overtrain.probes.sharpness import kl_sharpness
from overtrain.runtime.memory import peak_gpu_gib, peak_resident_gib
from overtrain.train.schedules import Schedule
from overtrain.models.series import SeriesCheckpoint, hash_and_flag_duplicates, load_series_model
from overtrain.study.cells import TokenizedTask
from overtrain.train.loop import TrainConfig, train


@dataclass(frozen=True)
class AuditConfig:
    gammas: tuple[float, ...] = (0.25, 0.5, 1.0)
    noise_seeds: tuple[int, ...] = (0, 1)
    heldout_tokens: int = 4096
    seq_len: int = 256
    batch_size: int = 4
    kl_gamma: float = 0.5
    hessian_tokens: int = 0  # 0 skips the top eigenvalue (minutes on a 100M+ model on CPU)
    task: str = "qa"
    lrs: tuple[float, ...] = (1e-5, 1e-4, 1e-3)
    steps: int = 10
    finetune_seq_len: int = 256
    eval_examples: int = 32
    benchmarks: tuple[str, ...] = ("arc_easy", "piqa")
    benchmark_limit: int = 50
    tolerance_bpb: float = 0.05
    seed: int = 0


@dataclass
class Costs:
    """What an audit took: wall time and the process's peak memory at the end of each phase,
    and the speed of its evaluation and of its fine-tuning."""
    device: str = "cpu"
    seconds: dict[str, float] = field(default_factory=dict)
    peak_resident_gib: dict[str, float] = field(default_factory=dict)  # peak so far, read after each phase
    peak_gpu_gib: float | None = None
    eval_tokens_per_second: float = float("nan")
    train_tokens_per_second: float = float("nan")  # padding included, as the model computes it

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            self.peak_resident_gib[name] = peak_resident_gib()

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"seconds": self.seconds, "peak resident GiB so far": self.peak_resident_gib})


@dataclass
class AuditResult:
    checkpoint: SeriesCheckpoint
    config: AuditConfig
    rows: list[dict] = field(default_factory=list)
    costs: Costs = field(default_factory=Costs)

    @property
    def model(self) -> str:
        return self.checkpoint.label

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def audit(checkpoint: SeriesCheckpoint, config: AuditConfig, out_dir: str | Path, device: str = "auto") -> AuditResult:
    """Audit one model into `out_dir`: audit.md (plain words), audit.csv (every figure), audit.json."""
    model, tokenizer, costs = _load_and_hash(checkpoint, pick_device(device))
    return _audit_loaded(model, tokenizer, checkpoint, config, Path(out_dir), costs)


def audit_series(series: list[SeriesCheckpoint], config: AuditConfig, out_dir: str | Path,
                 device: str = "auto") -> list[AuditResult]:
    """Audit each checkpoint into `out_dir/<label>/`, then `series.md` and `series.csv` side by side.

    A checkpoint whose weights repeat an earlier one's is flagged and not audited again.
    """
    out_dir, on = Path(out_dir), pick_device(device)
    results = []
    for index, checkpoint in enumerate(series):
        model, tokenizer, costs = _load_and_hash(checkpoint, on)
        hash_and_flag_duplicates(series[: index + 1])  # against the checkpoints before it; loads nothing
        if checkpoint.duplicate_of is None:
            folder = out_dir / re.sub(r"[^A-Za-z0-9_.@-]+", "_", checkpoint.label)
            results.append(_audit_loaded(model, tokenizer, checkpoint, config, folder, costs))
        del model  # one model in memory at a time
    table = side_by_side(results)
    table.to_csv(out_dir / "series.csv")
    (out_dir / "series.md").write_text(series_words(results, series, table))
    return results


def _load_and_hash(checkpoint: SeriesCheckpoint, device: torch.device):
    """(model on `device`, tokenizer, the audit's costs with the load timed); the weights hashed."""
    costs = Costs(device=str(device))
    with costs.phase("load"):
        model, tokenizer = load_series_model(checkpoint, str(device))
        checkpoint.weights_sha256 = weights_sha256(model)
    return model, tokenizer, costs


def _audit_loaded(model, tokenizer, checkpoint: SeriesCheckpoint, config: AuditConfig, out_dir: Path,
                  costs: Costs) -> AuditResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    result = AuditResult(checkpoint, config, costs=costs)
    clock = costs.phase

    batches = default_heldout_batches(tokenizer, config.heldout_tokens, config.seq_len, config.batch_size, config.seed)
    byte_lengths = token_byte_lengths(tokenizer)

    def text_metrics(m: torch.nn.Module) -> dict[str, float]:
        return heldout_metrics(m, batches, byte_lengths)

    with clock("base"):
        base = text_metrics(model)
        result.rows += [{"probe": "base", "metric": k, "value": v} for k, v in base.items()]
    costs.eval_tokens_per_second = sum(b["input_ids"].numel() for b in batches) / costs.seconds["base"]
    with clock("sensitivity"):
        stds = init_stds(model)
        for entry in gaussian_sensitivity(model, stds, list(config.gammas), list(config.noise_seeds), text_metrics)[1:]:
            result.rows.append({"probe": "sensitivity", "gamma": entry["gamma"], "seed": entry["seed"],
                                "metric": "delta_bpb", "value": entry["delta_bpb"]})
    with clock("kl_sharpness"):
        kl = kl_sharpness(model, batches[:1], config.kl_gamma, config.noise_seeds, stds=stds)
        result.rows.append({"probe": "sharpness", "gamma": kl.gamma, "metric": "kl_sharpness", "value": kl.mean})
    if config.hessian_tokens:
        with clock("hessian"):
            subset = [{k: v[:1, : config.hessian_tokens] for k, v in batches[0].items()}]
            eigen = hessian_eigenvalues(causal_lm_objective(model, subset), tol=1e-2)
            result.rows.append({"probe": "sharpness", "metric": "hessian_top_eig", "value": eigen.eigenvalues[0]})
    with clock("lr_sweep"):
        result.rows += _lr_sweep(model, tokenizer, config, text_metrics, byte_lengths, costs)
    costs.peak_gpu_gib = peak_gpu_gib(next(model.parameters()).device)
    frame = result.frame()
    frame.to_csv(out_dir / "audit.csv", index=False)
    (out_dir / "audit.json").write_text(json.dumps({"model": result.model, "config": asdict(config),
                                                     "weights_sha256": checkpoint.weights_sha256,
                                                     "costs": asdict(costs)}, indent=1))
    (out_dir / "audit.md").write_text(plain_words(result))
    return result


def _lr_sweep(model, tokenizer, config: AuditConfig, text_metrics, byte_lengths, costs: Costs) -> list[dict]:
    task = load_task(config.task, seed=config.seed)
    data = TokenizedTask(train=tokenize_examples(task.train, tokenizer, config.finetune_seq_len),
                         heldout=tokenize_examples(task.heldout[: config.eval_examples], tokenizer, config.finetune_seq_len),
                         pad_id=tokenizer.pad_token_id, scored=[], name=task.name)
    id_batches = data.heldout_batches(config.batch_size)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows, tokens_trained, seconds_training = [], 0, 0.0

    def measure(lr: float) -> None:
        metrics = {f"id_{k}": v for k, v in heldout_metrics(model, id_batches, byte_lengths).items() if k != "ppl"}
        metrics |= {f"ood_{k}": v for k, v in text_metrics(model).items() if k != "ppl"}
        for name in config.benchmarks:
            metrics[f"bench_{name}_acc"] = evaluate_mc(model, tokenizer, load_benchmark(name), limit=config.benchmark_limit)["acc"]
        rows.extend({"probe": "finetune", "lr": lr, "metric": k, "value": v} for k, v in metrics.items())

    measure(0.0)  # the model as it is: the reference every LR is compared with
    for lr in config.lrs:
        torch.manual_seed(config.seed)
        schedule = Schedule("linear", lr, config.steps, max(1, config.steps // 10))
        result = train(model, data.batches(config.batch_size, config.seed), TrainConfig(steps=config.steps, schedule=schedule,
                       weight_decay=0.0), description=f"audit lr={lr:g}")
        tokens_trained, seconds_training = tokens_trained + result.tokens_seen, seconds_training + result.seconds
        if result.diverged:
            rows.append({"probe": "finetune", "lr": lr, "metric": "diverged_at_step", "value": result.diverged_at_step})
        measure(lr)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(start[name])
    if seconds_training:
        costs.train_tokens_per_second = tokens_trained / seconds_training
    return rows


def plain_words(result: AuditResult) -> str:
    """The audit's findings as sentences, the verdict first, then the tables behind them."""
    frame, config, checkpoint = result.frame(), result.config, result.checkpoint
    base_bpb = frame.query("probe == 'base' and metric == 'bpb'")["value"].iloc[0]
    sensitivity = frame.query("probe == 'sensitivity'").groupby("gamma")["value"].mean()
    sweep, forgetting = _sweep(frame)
    lines = [f"# Audit of `{result.model}`", "",
             f"Weights sha256 `{checkpoint.weights_sha256}`; tokens seen in pre-training: "
             f"{checkpoint.tokens if checkpoint.tokens is not None else 'unknown'}.", "",
             "## In plain words", "",
             f"- Verdict: {verdict(result)}",
             f"- Held-out bits per byte on the default corpus: **{base_bpb:.3f}**."]
    for gamma, rise in sensitivity.items():
        lines.append(f"- Noise of {gamma:g} x the init std on every matrix raises it by **{rise:+.3f} bpb** "
                     f"({100 * rise / base_bpb:+.1f}%).")
    kl = frame.query("metric == 'kl_sharpness'")["value"]
    if len(kl):
        lines.append(f"- KL sharpness (gamma {config.kl_gamma:g}): {kl.iloc[0]:.4f} nats per token.")
    top_eig = frame.query("metric == 'hessian_top_eig'")["value"]
    if len(top_eig):
        lines.append(f"- Top Hessian eigenvalue of the held-out loss (first {config.hessian_tokens} tokens): "
                     f"{top_eig.iloc[0]:.4g}; a plain gradient step larger than 2 / that = {2 / top_eig.iloc[0]:.2g} "
                     "would overshoot along its direction.")
    lines += ["", "## Fine-tuning sweep (lr 0 = before fine-tuning)", "",
              sweep.assign(forgetting_bpb=forgetting).to_markdown(floatfmt=".4g"), "",
              "## Cost", "", cost_words(result), "", result.costs.table().round(2).to_markdown(), ""]
    return "\n".join(lines)


def cost_words(result: AuditResult) -> str:
    """Time, memory and speed of the audit in one paragraph."""
    costs, config = result.costs, result.config
    gpu = f", {costs.peak_gpu_gib:.2f} GiB on the GPU" if costs.peak_gpu_gib is not None else ""
    return (f"On `{costs.device}`: {sum(costs.seconds.values()) / 60:.1f} minutes; peak resident memory "
            f"**{max(costs.peak_resident_gib.values()):.2f} GiB**{gpu}. Evaluation ran at "
            f"**{costs.eval_tokens_per_second:,.0f} tokens/s** (windows of {config.batch_size} x {config.seq_len}), "
            f"fine-tuning at **{costs.train_tokens_per_second:,.0f} tokens/s** (AdamW, batches of "
            f"{config.batch_size} sequences of up to {config.finetune_seq_len} tokens, padding included).")


def _sweep(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """The LR sweep (one row per LR, 0 = before fine-tuning) and each LR's forgetting in bpb."""
    sweep = frame.query("probe == 'finetune'").pivot_table(index="lr", columns="metric", values="value")
    return sweep, sweep["ood_bpb"] - sweep.loc[0.0, "ood_bpb"]


def safe_up_to(result: AuditResult) -> float | None:
    """The largest LR such that it and every smaller LR tried keep forgetting within the bound."""
    _, forgetting = _sweep(result.frame())
    safe = None
    for lr in sorted(result.config.lrs):
        if not forgetting.get(lr, np.inf) <= result.config.tolerance_bpb:  # a diverged run has NaN: not safe
            break
        safe = lr
    return safe


def verdict(result: AuditResult) -> str:
    """How fragile the model is under fine-tuning, in one sentence."""
    config = result.config
    _, forgetting = _sweep(result.frame())
    lrs, bound, safe = sorted(config.lrs), f"+{config.tolerance_bpb:g} bpb", safe_up_to(result)
    doing = f"fine-tuning on `{config.task}` for {config.steps} steps"
    if safe == lrs[-1]:
        return f"**robust at these LRs**: {doing} keeps forgetting within {bound} at every LR tried, up to {safe:g}."
    first_bad = lrs[0] if safe is None else lrs[lrs.index(safe) + 1]
    at_bad = f"at LR {first_bad:g} it forgets {forgetting.get(first_bad, np.nan):+.3f} bpb"
    if safe is None:
        return f"**fragile at every LR tried**: {doing}, even {at_bad}, more than {bound}; try smaller LRs."
    return f"**fragile above LR {safe:g}**: {doing} keeps forgetting within {bound} up to LR {safe:g}; {at_bad}."


def side_by_side(results: list[AuditResult]) -> pd.DataFrame:
    """Every audited checkpoint's figures, one column each, in token order."""
    return pd.concat([_figures(result) for result in results], axis=1) if results else pd.DataFrame()


def _figures(result: AuditResult) -> pd.Series:
    frame, config, checkpoint = result.frame(), result.config, result.checkpoint
    sweep, forgetting = _sweep(frame)
    figures = {"tokens": checkpoint.tokens, "weights sha256": checkpoint.weights_sha256[:16],
               "held-out bpb": frame.query("probe == 'base' and metric == 'bpb'")["value"].iloc[0]}
    for gamma, rise in frame.query("probe == 'sensitivity'").groupby("gamma")["value"].mean().items():
        figures[f"bpb rise, noise {gamma:g} x init std"] = rise
    for metric, name in (("kl_sharpness", "KL sharpness"), ("hessian_top_eig", "top Hessian eigenvalue")):
        values = frame.loc[frame["metric"] == metric, "value"]
        if len(values):
            figures[name] = values.iloc[0]
    for lr in sweep.index:
        when = "before fine-tuning" if lr == 0 else f"after LR {lr:g}"
        if lr:
            figures[f"forgetting (bpb) {when}"] = forgetting[lr]
        figures[f"task bpb {when}"] = sweep.loc[lr, "id_bpb"]
        for name in (column for column in sweep.columns if column.startswith("bench_")):
            figures[f"{name.removeprefix('bench_').removesuffix('_acc')} accuracy {when}"] = sweep.loc[lr, name]
    figures["safe up to LR"] = safe_up_to(result)
    figures["minutes"] = sum(result.costs.seconds.values()) / 60
    figures["peak resident GiB"] = max(result.costs.peak_resident_gib.values())
    return pd.Series(figures, name=checkpoint.label)


def series_words(results: list[AuditResult], series: list[SeriesCheckpoint], table: pd.DataFrame) -> str:
    """The series page: each checkpoint's verdict, repeats of earlier weights, then the figures side by side."""
    by_label = {result.model: result for result in results}
    lines = [f"# Audit of a series of {len(series)} checkpoints", "", "## Verdicts", ""]
    for checkpoint in series:
        tokens = f"{checkpoint.tokens:,} tokens" if checkpoint.tokens is not None else "tokens unknown"
        if checkpoint.duplicate_of:
            lines.append(f"- `{checkpoint.label}` ({tokens}): **duplicate weights**, identical to "
                         f"`{checkpoint.duplicate_of}` (sha256 `{checkpoint.weights_sha256[:16]}...`); "
                         f"audited once, as `{checkpoint.duplicate_of}`.")
        else:
            lines.append(f"- `{checkpoint.label}` ({tokens}): {verdict(by_label[checkpoint.label])}")
    lines += ["", "## Side by side", "", table.map(_readable).to_markdown(), "",
              "Each checkpoint's own report, with its sweep and timings: `<checkpoint>/audit.md`.", ""]
    return "\n".join(lines)


def _readable(value) -> str:
    """A cell of the side-by-side table: whole numbers with separators, others to 4 digits, '-' for none."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)
