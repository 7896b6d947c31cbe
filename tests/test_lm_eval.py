"""lm-evaluation-harness as a backend: lm-eval and overtrain score the same items alike.

lm-eval's own tasks fetch their data from the hub, which this machine cannot reach, so
each test writes a local lm-eval task (a YAML over a JSON-lines file) holding items of a
benchmark overtrain ships, and runs it through `lm_eval.simple_evaluate` on the model in
memory, as `finetune.benchmarks: [lm_eval:TASK]` and `overtrain audit --benchmarks` do.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from overtrain.cli import app
from overtrain.data.benchmarks import BENCHMARKS, load_benchmark
from overtrain.data.tokenizer import train_tokenizer
from overtrain.errors import DataError, SpecError
from overtrain.probes.harness import check_benchmarks, run_lm_eval
from overtrain.probes.metrics import check_rows, label
from overtrain.probes.scoring import evaluate_mc, loglikelihoods
from overtrain.probes.suite import benchmark_scores
from overtrain.spec import BUILTIN_BENCHMARKS, parse_spec

pytest.importorskip("lm_eval", reason="lm-evaluation-harness: pip install -e '.[test]' installs it")


@pytest.fixture(scope="module")
def tokenizer(python_docs):
    # A real BPE, so that where the context's tokens end and the choice's begin is tested.
    return train_tokenizer(python_docs[:300], 400)


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def local_task(folder, name: str, items) -> str:
    """An lm-eval task over `items` of a shipped benchmark, formatted as lm-eval's own tasks are.

    Partial scoring (Winogrande) is lm-eval's "multiple input" form: `doc_to_text` gives the
    gold index, the choices are the alternative contexts, the target the shared continuation.
    """
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"context": item.context, "choices": item.choices, "gold": item.gold,
                                        "continuation": item.continuation}) + "\n" for item in items))
    partial = items[0].continuation is not None
    config = {"task": name, "dataset_path": "json", "output_type": "multiple_choice", "test_split": "test",
              "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "datasets")},
              "doc_to_text": "gold" if partial else "context", "doc_to_choice": "choices",
              "doc_to_target": "continuation" if partial else "gold",
              "target_delimiter": " ",  # lm-eval's default, spelled out: overtrain's TARGET_DELIMITER
              "metric_list": [{"metric": metric, "aggregation": "mean", "higher_is_better": True}
                              for metric in ("acc", "acc_norm")]}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("name", ["arc_easy", "sciq", "winogrande"])
def test_lm_eval_and_overtrain_agree_request_by_request(tmp_path, model, tokenizer, name):
    items = load_benchmark(name)[:16]
    task = local_task(tmp_path, f"shipped_{name}", items)

    output = run_lm_eval(model, tokenizer, task, limit=None, seed=0, log_samples=True)
    samples = sorted(output["samples"][f"shipped_{name}"], key=lambda sample: sample["doc_id"])
    theirs = [float(response[0]) for sample in samples for response in sample["filtered_resps"]]
    ours = loglikelihoods(model, tokenizer, [request for item in items for request in item.requests()])
    assert len(theirs) == len(ours) == sum(len(item.choices) for item in items)
    assert max(abs(a - b) for a, b in zip(theirs, ours)) <= 1e-6

    results, scored = output["results"][f"shipped_{name}"], evaluate_mc(model, tokenizer, items)
    assert (results["acc,none"], results["acc_norm,none"]) == (scored["acc"], scored["acc_norm"])
    assert not model.training


def test_lm_eval_benchmarks_become_declared_metrics_beside_the_built_in_ones(tmp_path, model, tokenizer):
    items = load_benchmark("arc_easy")[:12]
    task = local_task(tmp_path, "Shipped-ARC.easy", items)
    model.train()  # as in the middle of a fine-tuning run: left as found, global RNG untouched
    torch.manual_seed(7)
    expected_draw = torch.rand(1)
    torch.manual_seed(7)

    scores = benchmark_scores(model, tokenizer, ["arc_easy", f"lm_eval:{task}"], limit=12, seed=0)

    assert model.training and torch.equal(torch.rand(1), expected_draw)
    model.eval()
    assert set(scores) == {"bench_arc_easy_acc", "bench_arc_easy_acc_norm",
                           "bench_lm_eval_shipped_arc_easy_acc", "bench_lm_eval_shipped_arc_easy_acc_norm"}
    assert scores["bench_lm_eval_shipped_arc_easy_acc"] == scores["bench_arc_easy_acc"]
    assert scores["bench_lm_eval_shipped_arc_easy_acc_norm"] == scores["bench_arc_easy_acc_norm"]
    check_rows({"metric": name, "value": value} for name, value in scores.items())
    assert label("bench_lm_eval_shipped_arc_easy_acc_norm") == "shipped_arc_easy accuracy per character (lm-eval)"


def test_audit_scores_an_lm_eval_task_before_and_after_fine_tuning(tmp_path, model, tokenizer):
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    items = load_benchmark("piqa")[:6]
    task = local_task(tmp_path, "shipped_piqa", items)
    result = CliRunner().invoke(app, ["audit", str(tmp_path / "model"), "--benchmarks", f"lm_eval:{task}",
                                      "--benchmark-limit", "6", "--lrs", "1e-3", "--steps", "1", "--gammas", "1",
                                      "--heldout-tokens", "256", "--out", str(tmp_path / "audit")])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(tmp_path / "audit" / "audit.csv")
    accuracy = rows[rows["metric"] == "bench_lm_eval_shipped_piqa_acc"].set_index("step")["value"]
    assert list(accuracy.index) == [0, 1]  # before fine-tuning, and after its one step
    assert math.isclose(accuracy[0], evaluate_mc(model, tokenizer, items)["acc"], abs_tol=0)


def test_benchmark_names_are_checked_before_any_work(tmp_path):
    assert set(BUILTIN_BENCHMARKS) == set(BENCHMARKS)
    with pytest.raises(SpecError, match=r"finetune\.benchmarks: 'arc' is unknown; give arc_easy, .* or lm_eval:TASK"):
        parse_spec({"pretrain": {"budgets": [4096]}, "finetune": {"benchmarks": ["arc"]}})
    assert parse_spec({"pretrain": {"budgets": [4096]}, "finetune": {"benchmarks": ["lm_eval:hellaswag"]}})

    check_benchmarks(["arc_easy", "lm_eval:hellaswag", f"lm_eval:{local_task(tmp_path, 't', load_benchmark('piqa')[:2])}"],
                     "finetune.benchmarks")
    with pytest.raises(DataError) as refused:
        check_benchmarks(["lm_eval:no_such_task"], "finetune.benchmarks")
    assert str(refused.value) == ("finetune.benchmarks: lm_eval:no_such_task: neither a task lm-eval knows "
                                  "nor a task YAML file")
