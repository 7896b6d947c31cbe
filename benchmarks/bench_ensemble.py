"""A fine-tuning sweep as ensembles against the same sweep one cell at a time, on this machine.

1. The sweep through the engine: one pre-trained checkpoint of the paper preset
   (~48k parameters, byte vocabulary), 15 fine-tunes on the math task (5 LRs x 3
   seeds, 100 steps of 16 x 256 tokens, measured at steps 0, 50 and 100) as
   examples/paper.yaml fine-tunes. Run from copies of the same run folder:
   - cells: `--workers 2 --members 1` (two worker processes, one thread each, one
     model per cell: the engine before ensembles);
   - ensembles: `--workers 2 --members 8` (8 + 7 members, one job per core), twice:
     first with an empty compilation cache (every graph compiled in the run), then
     with the graphs that run left in the cache (as every job after a study's first).
   Wall time from the first fine-tune's start to the last one's end, in the store.
2. The training step alone, one thread: tokens/s of an ensemble of K members against
   `train.loop.train` on one model (the speed-up per member count K), compiled graphs warm.
3. Memory: peak resident memory of a process training an ensemble of 1 and of 64, per member.
4. Where an ensemble step's time goes: the profiler's operations, grouped.
5. Sensitivity draws (examples/paper.yaml's 4 gammas x 3 seeds on 32,768 held-out tokens):
   evaluated one by one (`gaussian_sensitivity` with `heldout_metrics`) against stacked as
   one ensemble (`stacked_sensitivity`), one thread.
6. Pre-training steps of examples/paper.yaml (32 x 128 tokens), one thread: `train` with
   the HF model compiled, as a pre-training cell alone runs, against ensembles of 1 and 2
   seeds, as the engine now runs them.

    python benchmarks/bench_ensemble.py [--steps 100] [--out /tmp/bench_ensemble]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

from overtrain.models.build import build_model, init_stds
from overtrain.models.stacked import StackedLlama
from overtrain.probes.loss import heldout_metrics
from overtrain.probes.perturb import gaussian_sensitivity
from overtrain.probes.suite import stacked_sensitivity
from overtrain.spec import PRESETS, parse_spec
from overtrain.study.runner import run_study
from overtrain.study.store import study_status
from overtrain.train.ensemble import train_ensemble
from overtrain.train.loop import TrainConfig, train
from overtrain.train.schedules import Schedule

LRS, SEEDS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], [0, 1, 2]
BATCH, SEQ_LEN = 16, 256


def study(steps: int, finetune: bool) -> dict:
    return {
        "name": "bench_ensemble", "seed": 0, "data": {"corpus": "default"}, "tokenizer": {"vocab_size": "bytes"},
        "model": {"preset": "paper"},
        "pretrain": {"budgets": [1048576], "schedules": ["constant"], "peak_lr": 4e-3, "warmup_tokens": 131072,
                     "batch_size": 32, "seq_len": 128},
        "eval": {"heldout_tokens": 65536, "batch_size": 64},
        "sensitivity": None,
        "finetune": {"tasks": ["math"], "lrs": LRS, "seeds": SEEDS, "steps": steps, "batch_size": BATCH,
                     "seq_len": SEQ_LEN, "warmup_steps": 10, "eval_every": steps // 2, "eval_examples": 64,
                     "accuracy_examples": 0} if finetune else None,
    }


def engine_sweeps(steps: int, out: Path) -> dict[str, float]:
    """Tokens/s of the 15 fine-tunes, run as cells and as ensembles from the same pre-trained folder."""
    shutil.rmtree(out, ignore_errors=True)
    run_study(parse_spec(study(steps, finetune=False)), out / "pretrained", workers=1)
    # An empty compilation cache of its own (workers inherit the variable), then the same one warm.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_ensemble_inductor_")
    speeds = {}
    runs = (("cells (--members 1)", "cells", 1), ("ensembles, compiling", "ensembles_cold", 8),
            ("ensembles, cache warm", "ensembles_warm", 8))
    for name, folder_name, members in runs:
        folder = out / folder_name
        shutil.copytree(out / "pretrained", folder)
        run_study(parse_spec(study(steps, finetune=True)), folder, workers=2, members=members)
        cells = study_status(folder)
        fine_tunes = cells[cells["kind"] == "finetune"]
        assert (fine_tunes["status"] == "done").all(), fine_tunes[["label", "status"]]
        wall = fine_tunes["finished"].max() - fine_tunes["started"].min()
        speeds[name] = len(fine_tunes) * steps * BATCH * SEQ_LEN / wall
    return speeds


def batches(seed: int, batch: int = BATCH, length: int = SEQ_LEN):
    generator = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, 258, (batch, length), generator=generator)
        yield {"input_ids": ids, "labels": ids}


def step_speeds(members: list[int], steps: int) -> dict[int, float]:
    """Training-step tokens/s, one thread: one model with `train`, and ensembles of K (after one
    short ensemble run that compiles the graphs every K shares: a pass is one member on a CPU)."""
    torch.set_num_threads(1)
    base = build_model(PRESETS["paper"], vocab_size=258, seed=0)
    config = TrainConfig(steps=steps, schedule=Schedule("linear", 1e-3, steps, 5))
    started = time.perf_counter()
    train(base, batches(0), config)
    speeds = {0: steps * BATCH * SEQ_LEN / (time.perf_counter() - started)}
    warm_up = TrainConfig(steps=2, schedule=Schedule("linear", 1e-3, 2, 0))
    train_ensemble(StackedLlama.from_models([base]), [warm_up], [batches(0)])
    for k in members:
        stack = StackedLlama.from_models([base] * k)
        started = time.perf_counter()
        train_ensemble(stack, [config] * k, [batches(i) for i in range(k)])
        speeds[k] = k * steps * BATCH * SEQ_LEN / (time.perf_counter() - started)
    return speeds


def peak_memory_gib(members: int) -> float:
    """Peak resident memory of training an ensemble of `members` for 5 steps, in a fresh process
    (the peak is reset after the imports, so it is the training's and its compilation's, the same
    for every K: the difference between two K is the members')."""
    script = (
        "import os; os.environ['TQDM_DISABLE'] = '1'; import sys, torch; sys.path.insert(0, sys.argv[2]);"
        "from bench_ensemble import batches; from overtrain.models.build import build_model;"
        "from overtrain.models.stacked import StackedLlama; from overtrain.spec import PRESETS;"
        "from overtrain.train.ensemble import train_ensemble; from overtrain.train.loop import TrainConfig;"
        "from overtrain.train.schedules import Schedule;"
        "from overtrain.runtime.memory import peak_resident_gib, reset_peak_resident;"
        "torch.set_num_threads(1); k = int(sys.argv[1]); base = build_model(PRESETS['paper'], vocab_size=258, seed=0);"
        "config = TrainConfig(steps=5, schedule=Schedule('linear', 1e-3, 5, 0)); data = [batches(i) for i in range(k)];"
        "assert reset_peak_resident(); train_ensemble(StackedLlama.from_models([base] * k), [config] * k, data);"
        "print(peak_resident_gib())")
    found = subprocess.run([sys.executable, "-c", script, str(members), str(Path(__file__).parent)],
                           capture_output=True, text=True, check=True)
    return float(found.stdout.strip().splitlines()[-1])


def profile(members: int) -> list[tuple[str, float]]:
    """Shares of an ensemble training step's time (forward, backward, optimizer), by kind of operation."""
    torch.set_num_threads(1)
    base = build_model(PRESETS["paper"], vocab_size=258, seed=0)
    stack = StackedLlama.from_models([base] * members)
    config = TrainConfig(steps=8, schedule=Schedule("linear", 1e-3, 8, 0))
    train_ensemble(stack, [config] * members, [batches(i) for i in range(members)])  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_ensemble(stack, [config] * members, [batches(i) for i in range(members)])
    groups = {"matrix products (bmm)": ("aten::bmm",), "attention (sdpa)": ("flash_attention",),
              "compiled element-wise kernels (norms, rotary, SwiGLU, cross-entropy)": ("CompiledFxGraph",),
              "softmax / cross-entropy": ("softmax",), "element-wise (norms, rotary, SwiGLU, AdamW)": (
                  "aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::silu", "aten::pow",
                  "aten::rsqrt", "aten::sqrt", "aten::lerp", "aten::addcmul", "aten::where", "aten::clamp"),
              "copies and layout (copy, cat, fill)": ("aten::copy_", "aten::cat", "aten::fill_", "aten::zero_",
                                                      "aten::index", "aten::embedding", "aten::gather")}
    events = [e for e in prof.key_averages()]
    total = sum(e.self_cpu_time_total for e in events)
    shares = {name: sum(e.self_cpu_time_total for e in events if any(p in e.key for p in patterns)) / total
              for name, patterns in groups.items()}
    shares["everything else"] = 1 - sum(shares.values())
    return sorted(shares.items(), key=lambda item: -item[1])


def sensitivity_speeds() -> dict[str, float]:
    """Held-out tokens/s of a checkpoint's 12 sensitivity draws, one by one and stacked."""
    torch.set_num_threads(1)
    model = build_model(PRESETS["paper"], vocab_size=258, seed=0)
    generator = torch.Generator().manual_seed(0)
    text = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 258, (4, 64, 128), generator=generator)]
    byte_lengths = np.ones(258)
    gammas, seeds = [0.25, 0.5, 0.75, 1.0], [0, 1, 2]
    tokens = (1 + len(gammas) * len(seeds)) * 4 * 64 * 128
    stacked_sensitivity(model, gammas[:1], seeds[:1], text, byte_lengths)  # compiles
    speeds = {}
    for name, measure in (
            ("one by one", lambda: gaussian_sensitivity(model, init_stds(model), gammas, seeds,
                                                        partial(heldout_metrics, batches=text, byte_lengths=byte_lengths))),
            ("stacked", lambda: stacked_sensitivity(model, gammas, seeds, text, byte_lengths))):
        started = time.perf_counter()
        measure()
        speeds[name] = tokens / (time.perf_counter() - started)
    return speeds


def pretraining_speeds(steps: int) -> dict[str, float]:
    """Tokens/s of pre-training steps (32 x 128), one thread, compiled graphs warm."""
    torch.set_num_threads(1)
    text = partial(batches, batch=32, length=128)
    config = TrainConfig(steps=steps, schedule=Schedule("constant", 4e-3, steps, 5), compile=True)
    warm_up = TrainConfig(steps=2, schedule=Schedule("constant", 4e-3, 2, 0), compile=True)
    models = [build_model(PRESETS["paper"], vocab_size=258, seed=seed) for seed in (0, 1)]
    train(build_model(PRESETS["paper"], vocab_size=258, seed=0), text(0), warm_up)
    started = time.perf_counter()
    train(models[0], text(0), config)
    speeds = {"alone, compiled HF model": steps * 32 * 128 / (time.perf_counter() - started)}
    train_ensemble(StackedLlama.from_models(models[:1]), [warm_up], [text(0)])
    for k in (1, 2):
        started = time.perf_counter()
        train_ensemble(StackedLlama.from_models(models[:k]), [config] * k, [text(seed) for seed in range(k)])
        speeds[f"ensemble of {k}"] = k * steps * 32 * 128 / (time.perf_counter() - started)
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_ensemble"))
    args = parser.parse_args()

    sweep = engine_sweeps(args.steps, args.out)
    cells = sweep["cells (--members 1)"]
    print(f"\n1. 15 fine-tunes (5 LRs x 3 seeds, {args.steps} steps of {BATCH} x {SEQ_LEN}) through the engine, "
          f"2 workers")
    print(f"{'layout':<28}{'tokens/s':>12}{'ratio':>8}")
    for name, speed in sweep.items():
        print(f"{name:<28}{speed:>12,.0f}{speed / cells:>8.2f}")

    members = [1, 2, 4, 8, 15]
    steps = step_speeds(members, steps=30)
    print("\n2. The training step alone, one thread (tokens/s of all members together)")
    print(f"{'K':<24}{'tokens/s':>12}{'ratio':>8}")
    print(f"{'one model, train()':<24}{steps[0]:>12,.0f}{1:>8.2f}")
    for k in members:
        print(f"{f'ensemble of {k}':<24}{steps[k]:>12,.0f}{steps[k] / steps[0]:>8.2f}")

    one, many = peak_memory_gib(1), peak_memory_gib(64)  # 64: enough members to rise above the noise
    print("\n3. Memory: peak resident set of a process training an ensemble")
    print(f"ensemble of 1: {one:.3f} GiB; of 64: {many:.3f} GiB; per member: {(many - one) / 63 * 1024:.1f} MiB")

    print("\n4. Where an ensemble step's time goes (8 members, one thread)")
    for name, share in profile(8):
        print(f"{name:<48}{share:>7.1%}")
    sensitivity = sensitivity_speeds()
    print("\n5. Sensitivity draws of one checkpoint (12 draws + the model, 32,768 held-out tokens each), one thread")
    for name, speed in sensitivity.items():
        print(f"{name:<24}{speed:>12,.0f} tokens/s{speed / sensitivity['one by one']:>8.2f}")
    pretraining = pretraining_speeds(steps=60)
    print("\n6. Pre-training steps (32 x 128 tokens), one thread")
    for name, speed in pretraining.items():
        print(f"{name:<28}{speed:>12,.0f} tokens/s{speed / pretraining['alone, compiled HF model']:>8.2f}")
    print(json.dumps({"sweep_tokens_per_second": sweep, "step_tokens_per_second": steps,
                      "peak_gib": {"1": one, "64": many}, "sensitivity_tokens_per_second": sensitivity,
                      "pretraining_tokens_per_second": pretraining}))


if __name__ == "__main__":
    main()
