"""The audit of a real model, or of a series of them: how fragile is it, and which fine-tuning LRs are safe?

For a model we did not train (an HF folder, a hub id with a revision, a GGUF file),
measured with a study's probes (probes.suite) and fine-tuning loop (train.loop):
1. held-out bits-per-byte on the default corpus' held-out documents, in its own tokenizer;
2. Gaussian sensitivity over gamma (noise in units of the config's initializer_range);
3. the KL sharpness proxy, and the top Hessian eigenvalue on a small subset if asked;
4. a short fine-tuning LR sweep on a task, measuring the task (ID) and forgetting
   (held-out bpb and benchmark accuracy) after each LR, from the same start;
5. audit.csv (the rows, with a study's columns), audit.json (config and costs) and
   audit.md in plain words (audit/words.py).

The model is restored bit for bit between LRs from one copy of its weights. A series
is audited checkpoint by checkpoint (once per distinct weights), and `series.md` puts
their figures side by side with each one's verdict, and `report/index.html` draws them
against tokens as a study's report (audit/report.py). One progress line follows the phases.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from overtrain.audit.progress import AuditProgress
from overtrain.audit.report import series_report
from overtrain.audit.result import AuditConfig, AuditResult, Costs
from overtrain.audit.words import audit_page, series_page, side_by_side
from overtrain.data.corpus import default_heldout_batches
from overtrain.data.examples import TEST, VALIDATION, TokenizedTask
from overtrain.data.tasks import load_task
from overtrain.data.tokenizer import token_byte_lengths
from overtrain.models.build import parameter_count
from overtrain.models.series import SeriesCheckpoint, hash_and_flag_duplicates, load_series_model
from overtrain.probes.loss import heldout_metrics
from overtrain.probes.metrics import check_rows
from overtrain.probes.objective import causal_lm_objective
from overtrain.probes.suite import capability_metrics, finetune_metrics, heldout_rows, hessian_rows, kl_rows, sensitivity_rows
from overtrain.runtime.device import pick_device
from overtrain.runtime.hashing import weights_sha256
from overtrain.runtime.memory import peak_gpu_gib
from overtrain.train.loop import TrainConfig, train
from overtrain.train.schedules import Schedule


def audit(checkpoint: SeriesCheckpoint, config: AuditConfig, out_dir: str | Path, device: str = "auto") -> AuditResult:
    """Audit one model into `out_dir`: audit.md (plain words), audit.csv (every figure), audit.json."""
    progress = AuditProgress(1, config)
    model, tokenizer, costs = _load_and_hash(checkpoint, pick_device(device), progress)
    try:
        return _audit_loaded(model, tokenizer, checkpoint, config, Path(out_dir), costs, progress)
    finally:
        progress.close()


def audit_series(series: list[SeriesCheckpoint], config: AuditConfig, out_dir: str | Path,
                 device: str = "auto") -> list[AuditResult]:
    """Audit each checkpoint into `out_dir/<label>/`, then `series.md` and `series.csv` side by side,
    and `report/index.html`, the series drawn against tokens.

    A checkpoint whose weights repeat an earlier one's is flagged and not audited again.
    """
    out_dir, on = Path(out_dir), pick_device(device)
    results, parameters = [], {}
    progress = AuditProgress(len(series), config)
    try:
        for index, checkpoint in enumerate(series):
            model, tokenizer, costs = _load_and_hash(checkpoint, on, progress)
            hash_and_flag_duplicates(series[: index + 1])  # against the checkpoints before it; loads nothing
            if checkpoint.duplicate_of is None:
                parameters[checkpoint.label] = parameter_count(model)
                folder = out_dir / re.sub(r"[^A-Za-z0-9_.@-]+", "_", checkpoint.label)
                results.append(_audit_loaded(model, tokenizer, checkpoint, config, folder, costs, progress))
            else:
                progress.skipped(f"the weights of {checkpoint.duplicate_of}; not audited again")
            del model  # one model in memory at a time
    finally:
        progress.close()
    table = side_by_side(results)
    table.to_csv(out_dir / "series.csv")
    (out_dir / "series.md").write_text(series_page(results, series, table))
    if series_report(results, series, parameters, config, out_dir / "report") is None:
        print(f"no report against tokens in {out_dir / 'report'}: no checkpoint's pre-training tokens are known "
              "(give --tokens-per-step)")
    return results


def _load_and_hash(checkpoint: SeriesCheckpoint, device: torch.device, progress: AuditProgress):
    """(model on `device`, tokenizer, the audit's costs with the load timed); the weights hashed."""
    costs = Costs(device=str(device))
    with progress.phase(costs, "load", checkpoint.label):
        model, tokenizer = load_series_model(checkpoint, str(device))
        checkpoint.weights_sha256 = weights_sha256(model)
    return model, tokenizer, costs


def _audit_loaded(model, tokenizer, checkpoint: SeriesCheckpoint, config: AuditConfig, out_dir: Path,
                  costs: Costs, progress: AuditProgress) -> AuditResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = default_heldout_batches(tokenizer, config.heldout_tokens, config.seq_len, config.batch_size, config.seed)
    byte_lengths = token_byte_lengths(tokenizer)
    rows = [{"kind": "probe", **row} for row in _probe(model, text, byte_lengths, config, costs, progress)]
    with progress.phase(costs, "lr_sweep"):
        rows += [{"kind": "finetune", "task": config.task, "seed": config.seed, **row}
                 for row in _lr_sweep(model, tokenizer, config, text, byte_lengths, costs, progress)]
    costs.peak_gpu_gib = peak_gpu_gib(next(model.parameters()).device)
    columns = {"checkpoint": checkpoint.label, "tokens": checkpoint.tokens, "weights": checkpoint.weights_sha256[:16]}
    result = AuditResult(checkpoint, config, [{**columns, **row} for row in rows], costs)
    check_rows(result.rows)
    result.frame().to_csv(out_dir / "audit.csv", index=False)
    (out_dir / "audit.json").write_text(json.dumps({"model": result.model, "config": asdict(config),
                                                     "weights_sha256": checkpoint.weights_sha256,
                                                     "costs": asdict(costs)}, indent=1))
    (out_dir / "audit.md").write_text(audit_page(result))
    return result


def _probe(model, text: list[dict], byte_lengths, config: AuditConfig, costs: Costs,
           progress: AuditProgress) -> list[dict]:
    """The model as it is: held-out loss and bpb, Gaussian sensitivity, KL sharpness, top Hessian eigenvalue."""
    with progress.phase(costs, "base"):
        rows = heldout_rows(model, text, byte_lengths)
    costs.eval_tokens_per_second = sum(b["input_ids"].numel() for b in text) / costs.seconds["base"]
    with progress.phase(costs, "sensitivity"):
        measure = partial(heldout_metrics, batches=text, byte_lengths=byte_lengths)
        rows += sensitivity_rows(model, config.gammas, config.noise_seeds, measure)
    with progress.phase(costs, "kl_sharpness"):
        rows += kl_rows(model, text[:1], config.kl_gamma, config.noise_seeds)
    if config.hessian_tokens:
        with progress.phase(costs, "hessian"):
            subset = [{k: v[:1, : config.hessian_tokens] for k, v in text[0].items()}]
            rows += hessian_rows(causal_lm_objective(model, subset), top_k=1, tol=1e-2)
    return rows


def _lr_sweep(model, tokenizer, config: AuditConfig, text: list[dict], byte_lengths, costs: Costs,
              progress: AuditProgress) -> list[dict]:
    """Fine-tune from the same start at each LR: rows at step 0 (measured once) and at each run's last step."""
    data = TokenizedTask.from_task(load_task(config.task, seed=config.seed), tokenizer, config.finetune_seq_len,
                                   config.eval_examples)
    evaluate = partial(finetune_metrics, task_batches=data.heldout_batches(config.batch_size, VALIDATION),
                       test_batches=data.heldout_batches(config.batch_size, TEST), text=text, byte_lengths=byte_lengths)
    capabilities = partial(capability_metrics, tokenizer=tokenizer, task=data, benchmarks=config.benchmarks,
                           benchmark_limit=config.benchmark_limit, seed=config.seed)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = evaluate(model) | capabilities(model)
    rows, tokens_trained, seconds_training = [], 0, 0.0
    for lr in config.lrs:
        progress.show(f"lr_sweep, LR {lr:g}")
        torch.manual_seed(config.seed)
        schedule = Schedule("linear", lr, config.steps, max(1, config.steps // 10))
        result = train(model, data.batches(config.batch_size, config.seed), TrainConfig(steps=config.steps, schedule=schedule,
                       weight_decay=0.0), description=f"audit lr={lr:g}")
        tokens_trained, seconds_training = tokens_trained + result.tokens_seen, seconds_training + result.seconds
        after = evaluate(model) | capabilities(model)
        rows += [{"lr": lr, "step": 0, "metric": k, "value": v} for k, v in before.items()]
        rows += [{"lr": lr, "step": result.steps_done, "metric": k, "value": v} for k, v in after.items()]
        rows.append({"lr": lr, "step": result.steps_done, "metric": "train_loss_nats", "value": result.last_loss})
        if result.diverged:
            rows.append({"lr": lr, "metric": "diverged_at_step", "value": result.diverged_at_step})
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(start[name])
    if seconds_training:
        costs.train_tokens_per_second = tokens_trained / seconds_training
    return rows
