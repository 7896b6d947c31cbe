"""lm-evaluation-harness as a benchmark backend: `lm_eval:TASK` beside the built-in benchmarks.

TASK is a task lm-eval knows by name (its data then comes from the hub) or the path of
a task YAML file (over local data, for machines without the hub). It runs through
`lm_eval.simple_evaluate` on the model in memory, wrapped by lm-eval's `HFLM`, so the
numbers are lm-eval's own: `bench_lm_eval_<task>_acc` and `_acc_norm` for every task
(and group) that reports them.

How lm-eval's multiple-choice scoring maps onto overtrain's (`probes.scoring.evaluate_mc`),
checked request by request in tests/test_lm_eval.py:
- each choice follows the context after the task's `target_delimiter`, " " by default,
  as `data.benchmarks.TARGET_DELIMITER`;
- trailing spaces of the context move to the continuation; the pair is encoded whole and
  split after the context's tokens;
- `acc` picks the highest summed log-likelihood, `acc_norm` the highest per character of
  the choice (without the delimiter);
- special tokens: overtrain adds none; lm-eval adds what the tokenizer adds by default
  (a BOS for Llama-2-style tokenizers; nothing for GPT-2, Pythia, SmolLM2 or ours), and
  conditions an empty context on the BOS token where there is one, on end-of-text
  otherwise. lm-eval's defaults are kept, so the numbers are those of `lm_eval --model hf`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from overtrain.data.benchmarks import BENCHMARKS
from overtrain.errors import DataError
from overtrain.probes.scoring import full_precision
from overtrain.spec import LM_EVAL_PREFIX as PREFIX

METRICS = ("acc", "acc_norm")  # what overtrain reads of a task's results: multiple-choice accuracy


def is_lm_eval(benchmark: str) -> bool:
    return benchmark.startswith(PREFIX)


def metric_prefix(task_name: str) -> str:
    """`bench_lm_eval_<task>`: lm-eval task names, lower-cased, with anything but letters and digits as `_`."""
    return "bench_lm_eval_" + re.sub(r"[^a-z0-9]+", "_", task_name.lower()).strip("_")


def check_benchmarks(benchmarks: Sequence[str], key: str) -> None:
    """Before any work: each of `benchmarks` is a built-in benchmark, or `lm_eval:TASK` with lm-eval
    installed and TASK a task it knows or a task YAML file; `key` names where they were given."""
    for benchmark in benchmarks:
        if not is_lm_eval(benchmark):
            if benchmark not in BENCHMARKS:
                raise DataError(f"{key}: {benchmark!r}: unknown benchmark (built in: {', '.join(BENCHMARKS)}; "
                                f"or {PREFIX}TASK for an lm-eval task)")
            continue
        task = benchmark.removeprefix(PREFIX)
        known = _task_manager(task, key)
        if not Path(task).is_file() and task not in known.all_tasks:
            raise DataError(f"{key}: {benchmark}: neither a task lm-eval knows nor a task YAML file")


def lm_eval_scores(model, tokenizer, benchmark: str, limit: int | None, seed: int,
                   batch_size: int = 16) -> dict[str, float]:
    """{`bench_lm_eval_<task>_acc`: ..., `..._acc_norm`: ...} of `lm_eval:TASK` on its first `limit` items."""
    output = run_lm_eval(model, tokenizer, benchmark.removeprefix(PREFIX), limit, seed, batch_size)
    scores = {f"{metric_prefix(task)}_{metric}": float(values[f"{metric},none"])
              for task, values in output["results"].items() for metric in METRICS if f"{metric},none" in values}
    if not scores:
        found = sorted({name for values in output["results"].values() for name in values if "," in name})
        raise DataError(f"{benchmark}: reports neither acc nor acc_norm (it reports {', '.join(found) or 'nothing'}); "
                        "overtrain reads multiple-choice tasks")
    return scores


def run_lm_eval(model, tokenizer, task: str, limit: int | None, seed: int, batch_size: int = 16,
                log_samples: bool = False) -> dict:
    """`lm_eval.simple_evaluate`'s output for one task (a name or a YAML path) on the model in memory.

    lm-eval reseeds Python's, NumPy's and torch's global generators unless told not to: it is
    told not to, so that measuring in the middle of a fine-tuning run leaves its data order
    alone; `seed` seeds only lm-eval's few-shot sampler. Like every score overtrain takes, it runs
    with autocast off (`full_precision`); the model's train/eval mode is restored.
    """
    task_manager = _task_manager(task, PREFIX + task)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    try:
        with full_precision(next(model.parameters()).device):
            return simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                                   tasks=[task], task_manager=task_manager, limit=limit, log_samples=log_samples,
                                   bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
                                   torch_random_seed=None, fewshot_random_seed=seed)
    finally:
        model.train(was_training)


def _task_manager(task: str, key: str):
    """The task index lm-eval resolves `task` in: a YAML file's task alone, else lm-eval's own tasks."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DataError(f"{key}: lm-eval tasks need lm-evaluation-harness: pip install 'overtrain[lm-eval]'") from None
    return TaskManager(include_defaults=False) if Path(task).is_file() else _lm_eval_own_tasks()


@cache
def _lm_eval_own_tasks():
    """lm-eval's own ~15,000 tasks, indexed in some seconds: once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()
