"""The vocabulary of metrics: every row a real probe or fine-tune emits is declared, and a row that is not is refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from overtrain.data.examples import TokenizedTask, tokenize_examples
from overtrain.data.tasks import load_task
from overtrain.probes import metrics
from overtrain.probes.curvature import forgetting_prediction
from overtrain.probes.drift import parameter_drift, representation_drift
from overtrain.probes.hessian import hessian_eigenvalues, hessian_trace
from overtrain.probes.metrics import UndeclaredMetric, check_rows
from overtrain.probes.objective import causal_lm_objective
from overtrain.probes.residue import docstring_prompts
from overtrain.probes.sharpness import critical_sharpness, kl_sharpness
from overtrain.probes.suite import capability_metrics, finetune_metrics, probe_rows, update_rows
from overtrain.study import execute
from overtrain.study.execute import CellJob, run_job
from overtrain.study.plan import Cell
from overtrain.train.loop import TrainConfig, train
from overtrain.train.schedules import Schedule

SHARPNESS = {"top_k": 2, "tol": 1e-2, "trace_hvps": 4, "kl_gamma": 0.5, "kl_seeds": [0, 1]}


def test_every_row_of_a_tiny_probe_and_fine_tune_is_declared(tiny_model, byte_corpus):
    tokenizer = byte_corpus.tokenizer
    text = byte_corpus.heldout_batches(4, 64, 1024)
    base = copy.deepcopy(tiny_model)
    task = load_task("qa", seed=0)
    data = TokenizedTask(train=tokenize_examples(task.train[:32], tokenizer, 64),
                         heldout=tokenize_examples(task.heldout[:4], tokenizer, 64), pad_id=tokenizer.pad_token_id,
                         scored=task.heldout[:2], name=task.name, docstring_prompts=docstring_prompts(0, 2))
    train(tiny_model, data.batches(4, 0), TrainConfig(steps=3, schedule=Schedule("constant", 1e-2, 3)))
    objective = causal_lm_objective(tiny_model, text[:1])

    rows = probe_rows(tiny_model, text, byte_corpus.byte_lengths, {"gammas": [0.5], "seeds": [0]}, SHARPNESS, text[:1])
    rows += update_rows(base, tiny_model, text[:1])
    measured = finetune_metrics(tiny_model, data.heldout_batches(2), text, byte_corpus.byte_lengths)
    measured |= capability_metrics(tiny_model, tokenizer, data, ["arc_easy"], 2, seed=0)
    rows += [{"metric": name, "value": value} for name, value in measured.items()]
    # every result object's own rows too, with the extras a study does not store
    for result in (hessian_eigenvalues(objective, k=3, tol=1e-2), hessian_trace(objective, 4),
                   kl_sharpness(tiny_model, text[:1], 0.5), critical_sharpness(objective),
                   forgetting_prediction(base, tiny_model, text[:1]), parameter_drift(base, tiny_model),
                   representation_drift(base, tiny_model, text[:1], k=2)):
        rows += result.to_rows()

    check_rows(rows)
    names = {row["metric"] for row in rows}
    assert {"bpb", "delta_bpb", "perturbed_loss_nats", "hessian_eig_hvps", "hessian_eig_2", "hessian_eig_3",
            "kl_nats", "u_norm", "repr_cos_mean", "id_acc", "docstring_rate", "bench_arc_easy_acc_norm"} <= names


def test_families_resolve_with_units_directions_and_labels():
    assert metrics.label("hessian_eig_3") == "Hessian eigenvalue 3"
    assert metrics.label("bench_arc_easy_acc") == "arc_easy accuracy"
    assert metrics.higher_is_better("bench_piqa_acc_norm") is True
    assert metrics.unit("perturbed_loss_nats") == "nats/token" and metrics.higher_is_better("delta_bpb") is False
    assert metrics.higher_is_better("hessian_eig_hvps") is None and metrics.higher_is_better("id_acc") is True
    for name in ("hessian_eig_1", "hvp_count", "delta_kl_sharpness", "bench_acc", "ood_ppl"):
        assert not metrics.is_declared(name), name


def test_an_undeclared_metric_is_refused():
    check_rows([{"metric": "bpb", "value": 1.0}, {"metric": "hessian_eig_12", "value": 2.0}])
    with pytest.raises(UndeclaredMetric, match="'hvp_count'"):
        check_rows([{"metric": "bpb", "value": 1.0}, {"metric": "hvp_count", "value": 3}])
    with pytest.raises(UndeclaredMetric, match="None"):
        check_rows([{"value": 3}])
    with pytest.raises(UndeclaredMetric):
        metrics.label("sharpness")


def test_a_cell_emitting_an_undeclared_metric_fails_as_a_cell(monkeypatch, tmp_path):
    monkeypatch.setattr(execute, "_context", lambda job: None)
    monkeypatch.setitem(execute.RUNNERS, "probe", lambda cell, key, ctx: [{"metric": "top_eig", "value": 1.0}])
    job = CellJob("k", Cell("probe", "probe x", {}), tmp_path, Path("corpus"), "cpu", threads=1)
    [outcome] = run_job(job, capture_fds=False)
    assert outcome.rows is None and "UndeclaredMetric" in outcome.error and "'top_eig'" in outcome.error
