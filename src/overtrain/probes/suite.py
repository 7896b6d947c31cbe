"""The probe battery: a model in, tidy result rows out.

Each function measures one family and returns rows {metric, value[, gamma, seed]}
(or, for the measures taken along a fine-tuning run, a dict metric -> value) whose
metric names are declared in probes/metrics.py. A study's cells, `overtrain probe`
and `overtrain audit` all measure through here, so the three write the same metrics
the same way; the context columns (checkpoint, lr, step, ...) are the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import numpy as np
import torch

from overtrain.data.benchmarks import load_benchmark
from overtrain.data.examples import TokenizedTask
from overtrain.models.build import init_stds
from overtrain.models.stacked import StackedLlama, unsupported_reason
from overtrain.probes.curvature import forgetting_prediction
from overtrain.probes.drift import parameter_drift
from overtrain.probes.harness import is_lm_eval, lm_eval_scores
from overtrain.probes.hessian import hessian_eigenvalues, hessian_trace
from overtrain.probes.loss import heldout_metrics, stacked_heldout_metrics
from overtrain.probes.objective import Batch, Objective, causal_lm_objective
from overtrain.probes.perturb import InPlacePerturber, gaussian_sensitivity, sensitivity_entries
from overtrain.probes.residue import docstring_rate
from overtrain.probes.scoring import evaluate_mc, task_accuracy
from overtrain.probes.sharpness import critical_sharpness, kl_sharpness

# The draws of a checkpoint's sensitivity held at once as one ensemble: at most this many
# bytes of stacked weights and gradients (all the draws of the paper preset; one at a
# time for a model of 100M+ parameters).
STACKED_DRAW_BYTES = 1 << 30

# -- a checkpoint --------------------------------------------------------------------


def probe_rows(model: torch.nn.Module, text: Sequence[Batch], byte_lengths: np.ndarray, sensitivity: dict | None,
               sharpness: dict | None, sharpness_text: Sequence[Batch] = ()) -> list[dict]:
    """What a study measures of every checkpoint: held-out loss and bpb on `text`, Gaussian
    sensitivity (`sensitivity`: the study's `sensitivity:` keys) and sharpness on
    `sharpness_text` (`sharpness`: its `sharpness:` keys); None skips either."""
    rows = heldout_rows(model, text, byte_lengths)
    if sensitivity and unsupported_reason(model.config) is None:
        rows += _sensitivity_entry_rows(stacked_sensitivity(model, sensitivity["gammas"], sensitivity["seeds"],
                                                            text, byte_lengths))
    elif sensitivity:
        measure = partial(heldout_metrics, batches=text, byte_lengths=byte_lengths)
        rows += sensitivity_rows(model, sensitivity["gammas"], sensitivity["seeds"], measure)
    if sharpness:
        rows += sharpness_rows(model, sharpness_text, sharpness)
    return rows


def heldout_rows(model: torch.nn.Module, text: Sequence[Batch], byte_lengths: np.ndarray) -> list[dict]:
    """Held-out loss (nats per token), bits per byte and perplexity."""
    return [{"metric": name, "value": value} for name, value in heldout_metrics(model, text, byte_lengths).items()]


def sensitivity_rows(model: torch.nn.Module, gammas: Sequence[float], seeds: Sequence[int],
                     measure: Callable[[torch.nn.Module], dict[str, float]]) -> list[dict]:
    """Loss and bpb of the model under Gaussian noise of each size gamma (in init stds) and
    seed: `perturbed_*`, and `delta_*` = perturbed - unperturbed, one row per (gamma, seed)."""
    return _sensitivity_entry_rows(gaussian_sensitivity(model, init_stds(model), list(gammas), list(seeds), measure))


def stacked_sensitivity(model: torch.nn.Module, gammas: Sequence[float], seeds: Sequence[int],
                        text: Sequence[Batch], byte_lengths: np.ndarray) -> list[dict]:
    """`gaussian_sensitivity`'s entries with held-out loss and bpb as the measure, every draw
    (and the unperturbed model, the first member) a member of one ensemble: the text is read
    once per batch for all of them. The draws are `InPlacePerturber`'s, bit for bit; the
    numbers are `heldout_metrics`' to float32 rounding (tests/test_perturb.py)."""
    perturber = InPlacePerturber(model, init_stds(model))
    draws = [(gamma, seed) for gamma in gammas for seed in seeds]
    members = [None, *draws]  # None: the unperturbed model
    weights_and_grads = 8 * sum(p.numel() for p in model.parameters())
    per_stack = max(1, STACKED_DRAW_BYTES // weights_and_grads)
    found = []
    for first in range(0, len(members), per_stack):
        chunk = members[first:first + per_stack]
        stack = StackedLlama.from_models([model] * len(chunk))
        for row, draw in enumerate(chunk):
            if draw is not None:
                stack.load_member(row, perturber.perturbed_copies(*draw))
        found += stacked_heldout_metrics(stack, list(text), byte_lengths)
    base, *perturbed = found
    return sensitivity_entries(base, list(zip(draws, perturbed)))


def _sensitivity_entry_rows(entries: list[dict]) -> list[dict]:
    """Rows of `gaussian_sensitivity`'s entries, the unperturbed first one left out."""
    rows = []
    for entry in entries[1:]:
        for name in ("loss_nats", "bpb"):
            where = {"gamma": entry["gamma"], "seed": entry["seed"]}
            rows += [{**where, "metric": f"perturbed_{name}", "value": entry[name]},
                     {**where, "metric": f"delta_{name}", "value": entry[f"delta_{name}"]}]
    return rows


def sharpness_rows(model: torch.nn.Module, batches: Sequence[Batch], options: dict) -> list[dict]:
    """Top Hessian eigenvalues, trace, KL proxy and critical sharpness of the held-out loss
    (options: the study's `sharpness:` keys)."""
    objective = causal_lm_objective(model, batches)
    rows = hessian_rows(objective, options["top_k"], options["tol"])
    if options["trace_hvps"]:
        rows += hessian_trace(objective, n_hvps=options["trace_hvps"]).to_rows()
    rows += kl_rows(model, batches, options["kl_gamma"], options["kl_seeds"])
    return rows + [{"metric": "critical_sharpness", "value": critical_sharpness(objective).sharpness}]


def hessian_rows(objective: Objective, top_k: int = 1, tol: float = 1e-3) -> list[dict]:
    """The top Hessian eigenvalue, its residual and HVPs, and eigenvalues 2..top_k."""
    return hessian_eigenvalues(objective, k=top_k, tol=tol).to_rows()


def kl_rows(model: torch.nn.Module, batches: Sequence[Batch], gamma: float, seeds: Sequence[int]) -> list[dict]:
    """The KL sharpness proxy at noise `gamma` (init stds), mean and standard error over `seeds`."""
    kl = kl_sharpness(model, batches, gamma, seeds, stds=init_stds(model))
    return [{"metric": "kl_sharpness", "gamma": kl.gamma, "value": kl.mean},
            {"metric": "kl_sharpness_se", "gamma": kl.gamma, "value": kl.standard_error}]


# -- a fine-tuning run ---------------------------------------------------------------


def finetune_metrics(model: torch.nn.Module, task_batches: Sequence[Batch], text: Sequence[Batch],
                     byte_lengths: np.ndarray, test_batches: Sequence[Batch] = ()) -> dict[str, float]:
    """What a fine-tuning run is followed by: loss and bpb on the validation part of the task's
    held-out examples (`id_`), on their test part when given (`id_test_`), and on the held-out
    pre-training text (`ood_`)."""
    measured = {"id": task_batches, "id_test": test_batches, "ood": text}
    scores = {}
    for prefix, batches in measured.items():
        if batches:
            found = heldout_metrics(model, batches, byte_lengths)
            scores |= {f"{prefix}_loss_nats": found["loss_nats"], f"{prefix}_bpb": found["bpb"]}
    return scores


def stacked_finetune_metrics(stack: StackedLlama, tasks: Sequence[str],
                             task_batches: Mapping[str, tuple[Sequence[Batch], Sequence[Batch]]],
                             text: Sequence[Batch], byte_lengths: np.ndarray) -> list[dict[str, float]]:
    """`finetune_metrics` of every member of an ensemble whose member i trains on `tasks[i]`:
    the pre-training text in one pass for all, each task's (validation, test) batches in one
    pass for the members of that task."""
    scores = [{f"ood_{name}": value for name, value in found.items() if name in ("loss_nats", "bpb")}
              for found in stacked_heldout_metrics(stack, list(text), byte_lengths)] if text else [{} for _ in tasks]
    for task in dict.fromkeys(tasks):
        rows = [row for row, name in enumerate(tasks) if name == task]
        members = stack.select(rows)
        for prefix, batches in zip(("id", "id_test"), task_batches[task]):
            if batches:
                for row, found in zip(rows, stacked_heldout_metrics(members, list(batches), byte_lengths)):
                    scores[row] |= {f"{prefix}_loss_nats": found["loss_nats"], f"{prefix}_bpb": found["bpb"]}
    return [{name: row[name] for name in _FINETUNE_ORDER if name in row} for row in scores]


# The order `finetune_metrics` writes its metrics in, so that a member's rows read like a lone run's.
_FINETUNE_ORDER = ("id_loss_nats", "id_bpb", "id_test_loss_nats", "id_test_bpb", "ood_loss_nats", "ood_bpb")


def capability_metrics(model: torch.nn.Module, tokenizer, task: TokenizedTask, benchmarks: Sequence[str],
                       benchmark_limit: int | None, seed: int) -> dict[str, float]:
    """The slower measures, taken before and after fine-tuning: task accuracy where it means
    something, the docstring rate where the task has prompts for it, benchmark accuracies."""
    scores = task_accuracy(model, tokenizer, task)
    if task.docstring_prompts:
        scores["docstring_rate"] = docstring_rate(model, tokenizer, task.docstring_prompts, seed)
    return scores | benchmark_scores(model, tokenizer, benchmarks, benchmark_limit, seed)


def benchmark_scores(model: torch.nn.Module, tokenizer, benchmarks: Sequence[str], limit: int | None,
                     seed: int) -> dict[str, float]:
    """Accuracy and per-character accuracy on the first `limit` items of each benchmark: a built-in
    one (`bench_<name>_acc`, scored here) or `lm_eval:TASK` (`bench_lm_eval_<task>_acc`, scored by lm-eval)."""
    scores = {}
    for name in benchmarks:
        if is_lm_eval(name):
            scores |= lm_eval_scores(model, tokenizer, name, limit, seed)
            continue
        result = evaluate_mc(model, tokenizer, load_benchmark(name), limit=limit)
        scores |= {f"bench_{name}_acc": result["acc"], f"bench_{name}_acc_norm": result["acc_norm"]}
    return scores


def update_rows(base: torch.nn.Module, finetuned: torch.nn.Module, batches: Sequence[Batch]) -> list[dict]:
    """Forgetting predicted by the curvature along the fine-tuning update, beside the observed one, and drift."""
    prediction = forgetting_prediction(base, finetuned, batches)
    along = prediction.along_update
    drift = parameter_drift(base, finetuned)
    return [{"metric": "curvature_along_u", "value": along.curvature},
            {"metric": "predicted_forgetting_nats", "value": along.second_order_nats},
            {"metric": "first_order_term_nats", "value": along.first_order_nats},
            {"metric": "observed_forgetting_nats", "value": prediction.observed_forgetting_nats},
            {"metric": "param_drift_l2", "value": drift.distance},
            {"metric": "param_drift_relative", "value": drift.relative}]
