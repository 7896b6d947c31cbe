"""The vocabulary of metrics: every metric a result row may carry, declared once.

A result row is {metric, value} plus context columns (checkpoint, lr, gamma, seed,
step, ...). Its `metric` is one of the names declared below or a member of one of
the families (`hessian_eig_3`, `bench_piqa_acc`, `bench_lm_eval_arc_easy_acc`,
`delta_bpb`, ...). Readers ask here for a metric's unit, direction and label (`unit`, `higher_is_better`,
`label`); `check_rows` rejects a row whose metric is not declared, so a new probe
cannot emit a name nobody can read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    higher_is_better: bool | None  # None: no better direction (counts, sizes, what the study sets out to measure)
    label: str                     # for axes, tables and sentences


class UndeclaredMetric(LookupError):
    """A metric name this module does not declare: a probe emitting it is a bug."""


NATS, BPB, FRACTION = "nats/token", "bits/byte", "fraction"
CURVATURE = "nats/weight^2"  # second derivative of a loss in nats/token by the weights

_DECLARED = [
    # held-out text: the default corpus, or the study's own
    Metric("loss_nats", NATS, False, "held-out loss"),
    Metric("bpb", BPB, False, "held-out bpb"),
    Metric("ppl", "perplexity", False, "held-out perplexity"),
    # fine-tuning: the task (ID) and the pre-training text (OOD), along and after a run
    # (id_*: the validation part of the task's held-out examples, which chooses LR and step;
    # id_test_*: the test part, which reports the chosen run)
    Metric("id_loss_nats", NATS, False, "task held-out loss"),
    Metric("id_bpb", BPB, False, "task held-out bpb"),
    Metric("id_acc", FRACTION, True, "task accuracy"),
    Metric("id_test_loss_nats", NATS, False, "task test loss"),
    Metric("id_test_bpb", BPB, False, "task test bpb"),
    Metric("id_test_acc", FRACTION, True, "task test accuracy"),
    Metric("ood_loss_nats", NATS, False, "pre-training-text loss"),
    Metric("ood_bpb", BPB, False, "pre-training-text bpb"),
    Metric("docstring_rate", FRACTION, None, "docstring rate of sampled functions"),
    # training runs
    Metric("train_loss_nats", NATS, False, "training loss (last step)"),
    Metric("tokens_per_second", "tokens/s", True, "training speed"),
    Metric("parameters", "count", None, "parameters"),
    Metric("diverged_at_step", "step", None, "diverged at step"),
    # curvature and sharpness of the held-out loss (what the study measures: no direction)
    Metric("hessian_top_eig", CURVATURE, None, "top Hessian eigenvalue"),
    Metric("hessian_eig_residual", CURVATURE, None, "residual ||Hv - lambda v|| of the top eigenpair"),
    Metric("hessian_eig_hvps", "count", None, "Hessian-vector products of the Lanczos solver"),
    Metric("hessian_trace", CURVATURE, None, "Hessian trace"),
    Metric("hessian_trace_se", CURVATURE, None, "standard error of the Hessian trace"),
    Metric("kl_sharpness", NATS, None, "KL sharpness"),
    Metric("kl_sharpness_se", NATS, None, "standard error of the KL sharpness"),
    Metric("kl_nats", NATS, None, "KL to the perturbed model (one seed)"),
    Metric("critical_sharpness", "1/lr", None, "critical sharpness"),
    Metric("critical_lr", "lr", None, "critical learning rate"),
    Metric("loss_evaluations", "count", None, "loss evaluations of the critical-sharpness search"),
    # the fine-tuning update u = theta_ft - theta_base: curvature along it, forgetting, drift
    Metric("curvature_along_u", CURVATURE, None, "curvature along the fine-tuning update"),
    Metric("u_norm", "weight", None, "norm of the fine-tuning update"),
    Metric("first_order_term_nats", NATS, None, "first-order term g.u"),
    Metric("predicted_forgetting_nats", NATS, False, "predicted forgetting (0.5 u.Hu)"),
    Metric("predicted_forgetting_total_nats", NATS, False, "predicted forgetting (g.u + 0.5 u.Hu)"),
    Metric("observed_forgetting_nats", NATS, False, "observed forgetting"),
    Metric("base_loss_nats", NATS, False, "held-out loss before fine-tuning"),
    Metric("finetuned_loss_nats", NATS, False, "held-out loss after fine-tuning"),
    Metric("param_drift_l2", "weight", None, "parameter drift ||theta_ft - theta_base||"),
    Metric("param_drift_relative", FRACTION, None, "relative parameter drift"),
    Metric("repr_angle_mean_deg", "degrees", None, "mean principal angle of hidden states"),
    Metric("repr_angle_max_deg", "degrees", None, "largest principal angle of hidden states"),
    Metric("repr_cos_mean", "cosine", None, "mean cosine of the principal angles"),
]
METRICS: dict[str, Metric] = {m.name: m for m in _DECLARED}

# The sharpness measures of a checkpoint, in the order reports show them.
SHARPNESS = ("hessian_top_eig", "hessian_trace", "kl_sharpness", "critical_sharpness")

NOISED = ("loss_nats", "bpb", "ppl")  # what Gaussian sensitivity measures under noise


def _hessian_eig(match: re.Match) -> Metric:
    return Metric(match[0], CURVATURE, None, f"Hessian eigenvalue {match[1]}")


def _benchmark(match: re.Match) -> Metric:
    norm = " per character" if match[2] else ""
    return Metric(match[0], FRACTION, True, f"{match[1]} accuracy{norm}")


def _lm_eval_benchmark(match: re.Match) -> Metric:
    norm = " per character" if match[2] else ""
    return Metric(match[0], FRACTION, True, f"{match[1]} accuracy{norm} (lm-eval)")


def _perturbed(match: re.Match) -> Metric:
    base = METRICS[match[2]]
    words = "under noise" if match[1] == "perturbed" else "change under noise"
    return Metric(match[0], base.unit, base.higher_is_better, f"{base.label}, {words}")


_FAMILIES: list[tuple[re.Pattern, Callable[[re.Match], Metric]]] = [
    (re.compile(r"hessian_eig_([2-9]|[1-9]\d+)"), _hessian_eig),  # eigenvalues 2..k, largest first
    (re.compile(r"bench_lm_eval_([a-z0-9_]+?)_acc(_norm)?"), _lm_eval_benchmark),  # `lm_eval:TASK` (probes/harness.py)
    (re.compile(r"bench_([a-z0-9_]+?)_acc(_norm)?"), _benchmark),
    (re.compile(rf"(perturbed|delta)_({'|'.join(NOISED)})"), _perturbed),  # delta = perturbed - unperturbed
]


def metric(name: str) -> Metric:
    """The declaration of `name`, a plain metric or a member of a family."""
    if name in METRICS:
        return METRICS[name]
    for pattern, make in _FAMILIES:
        if match := pattern.fullmatch(name):
            return make(match)
    raise UndeclaredMetric(f"metric {name!r} is not declared in overtrain/probes/metrics.py")


def is_declared(name: str) -> bool:
    try:
        metric(name)
    except UndeclaredMetric:
        return False
    return True


def label(name: str) -> str:
    return metric(name).label


def unit(name: str) -> str:
    return metric(name).unit


def higher_is_better(name: str) -> bool | None:
    return metric(name).higher_is_better


def direction(name: str) -> str:
    """"higher is better", "lower is better", or "" for a metric with no better direction."""
    better = higher_is_better(name)
    return "" if better is None else "higher is better" if better else "lower is better"


def check_rows(rows: Iterable[Mapping]) -> None:
    """Raise UndeclaredMetric for the first row whose metric is missing or not declared."""
    for row in rows:
        name = row.get("metric")
        if not isinstance(name, str) or not is_declared(name):
            raise UndeclaredMetric(f"metric {name!r} of the row {dict(row)} is not declared in overtrain/probes/metrics.py")
