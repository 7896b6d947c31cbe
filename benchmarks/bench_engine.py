"""The study engine, measured: resume overhead, --workers 2 vs --workers 1, fault injection.

    python benchmarks/bench_engine.py            # ~5 minutes on 2 cores

1. A fine-tuning sweep (16 cells on one checkpoint) runs with `--workers 1` (one
   process, all cores as torch threads) and `--workers 2` (two processes, cores/2
   threads each), from the same finished pre-training; wall-clock ratio.
2. Resume overhead: a second run over the finished folder, in-process (imports
   excluded): planning, corpus cache lookup, input checks and skipping every cell.
3. Fault injection: the tiny study is killed (SIGKILL of its process group) at each
   point of tests/tiny_study.KILL_POINTS in turn, then finished, and compared with an
   uninterrupted run: rows, checkpoint weight hashes, duplicates.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from tiny_study import KILL_POINTS, checkpoint_hashes, comparable, run_in_subprocess, tiny_study  # noqa: E402

from overtrain.spec import parse_spec  # noqa: E402
from overtrain.study.runner import run_study  # noqa: E402
from overtrain.study.store import load_results, study_status  # noqa: E402

SWEEP = {"pretrain": {"schedules": ["cosine"], "budgets": [2048]}, "sensitivity": None,
         "model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
         "finetune": {"lrs": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1], "seeds": [0, 1], "steps": 20,
                      "batch_size": 8, "eval_every": 0, "eval_examples": 16}}


def timed(function, *args, **kwargs) -> float:
    started = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - started


def sweep_speedup(root: Path) -> dict:
    spec = parse_spec(tiny_study(root, **SWEEP))
    base = root / "base"
    run_study(parse_spec(tiny_study(root, **{**SWEEP, "finetune": None})), base, workers=0)
    seconds = {}
    for workers in (1, 2):
        folder = shutil.copytree(base, root / f"workers{workers}")
        seconds[workers] = timed(run_study, spec, folder, workers=workers)
        assert set(study_status(folder)["status"]) == {"done"}
    cells = len(study_status(root / "workers2"))
    resume = timed(run_study, spec, root / "workers2", workers=2)
    return {"finetune cells": cells - 2, "workers1 s": seconds[1], "workers2 s": seconds[2],
            "speed-up": seconds[1] / seconds[2], "resume cells": cells, "resume s": resume}


def fault_injection(root: Path) -> dict:
    study = tiny_study(root)
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    killed = [run_in_subprocess(path, root / "killed", fault=f"kill:{point}").returncode == -9 for point in KILL_POINTS]
    finished = run_in_subprocess(path, root / "killed").returncode == 0
    torch.set_num_threads(os.cpu_count())  # the threads of a --workers 1 worker
    run_study(parse_spec(study), root / "reference", workers=0)
    results = load_results(root / "killed")
    return {"kill points": len(KILL_POINTS), "killed as planned": sum(killed), "finished": finished,
            "rows identical": comparable(results).equals(comparable(load_results(root / "reference"))),
            "checkpoints identical": checkpoint_hashes(root / "killed") == checkpoint_hashes(root / "reference"),
            "duplicated rows": int(results.duplicated(["cell", "metric", "step", "gamma", "seed"]).sum())}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)  # the tiny study names its task file relative to its folder
        sweep = sweep_speedup(root)
        faults = fault_injection(root)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"fine-tuning sweep of {sweep['finetune cells']} cells: --workers 1 {sweep['workers1 s']:.1f} s | "
          f"--workers 2 {sweep['workers2 s']:.1f} s | speed-up x{sweep['speed-up']:.2f}")
    print(f"resume of a finished run ({sweep['resume cells']} cells, in-process, imports excluded): "
          f"{sweep['resume s']:.2f} s ({1000 * sweep['resume s'] / sweep['resume cells']:.1f} ms per cell)")
    print(f"fault injection: {faults['kill points']} kill points, {faults['killed as planned']} killed as planned, "
          f"finished: {faults['finished']}, rows identical: {faults['rows identical']}, "
          f"checkpoints identical: {faults['checkpoints identical']}, duplicated rows: {faults['duplicated rows']}")


if __name__ == "__main__":
    main()
