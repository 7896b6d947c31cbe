"""A real study small enough for tests: a Python-docs corpus, a jsonl task, a 2-layer model.

It has every kind of cell and every dependency: cosine runs, the constant run with
its wsd branches, probes of every checkpoint and a two-LR fine-tuning sweep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml


def write_inputs(folder: Path) -> tuple[Path, Path]:
    """corpus.txt (documents separated by blank lines) and task.jsonl, from the Python docs."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    corpus, task = folder / "corpus.txt", folder / "task.jsonl"
    corpus.write_text("\n\n".join(" ".join(text.split()) for _, text in sorted(topics.items())))
    with open(task, "w") as f:
        for name, text in sorted(topics.items()):
            f.write(json.dumps({"prompt": f"Topic: {name}\n", "completion": " ".join(text.split()[:12])}) + "\n")
    return corpus, task


# A chain of crashes for the fault tests: each run of the study dies at the next point
# (visits counted from the start of that run): mid pre-training, at the start of a probe,
# inside a result's transaction, at the start of a fine-tune, at the first result write.
KILL_POINTS = ["checkpoint-saved#3", "cell-probe#2", "store-write#3", "cell-finetune#4", "store-write#1"]


def tiny_study(folder: Path, **overrides) -> dict:
    """The study as a dict; its task file is named relative to `folder`, so run it from there."""
    corpus, task = write_inputs(folder)
    study = {
        "name": "tiny",
        "data": {"corpus": str(corpus)},
        "tokenizer": {"vocab_size": "bytes"},
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
        "pretrain": {"budgets": [1024, 2048], "schedules": ["cosine", "constant", "wsd"], "warmup_tokens": 128,
                     "batch_size": 4, "seq_len": 32, "compile": False},
        "eval": {"heldout_tokens": 512},
        "sensitivity": {"gammas": [1.0], "seeds": [0]},
        "finetune": {"tasks": [task.name], "lrs": [1e-3, 1e-2], "steps": 2, "batch_size": 4, "seq_len": 64,
                     "eval_every": 1, "eval_examples": 4},
    }
    for section, values in overrides.items():
        study[section] = {**study.get(section, {}), **values} if isinstance(values, dict) else values
    return study


def write_study(folder: Path, **overrides) -> Path:
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(tiny_study(folder, **overrides)))
    return path


def comparable(frame):
    """Results without wall-clock metrics, in a fixed order: equal frames mean equal results."""
    frame = frame[frame["metric"] != "tokens_per_second"].drop(columns=["cell"])
    return frame.sort_values(list(frame.columns)).reset_index(drop=True)


def run_in_subprocess(study: Path, run_dir: Path, workers: int = 1, fault: str | None = None) -> subprocess.CompletedProcess:
    """Run the study in a new process group (a fault kills the whole group, as a crash would)."""
    env = {k: v for k, v in os.environ.items() if k != "OVERTRAIN_FAULT"}
    if fault:
        env["OVERTRAIN_FAULT"] = fault
    script = ("import sys; from overtrain.spec import load_spec; from overtrain.study.runner import run_study; "
              "run_study(load_spec(sys.argv[1]), sys.argv[2], workers=int(sys.argv[3]))")
    return subprocess.run([sys.executable, "-c", script, str(study), str(run_dir), str(workers)], cwd=study.parent,
                          env=env, start_new_session=True, capture_output=True, text=True, timeout=600)


def checkpoint_hashes(run_dir: Path) -> dict[str, str]:
    return {folder.name: json.loads((folder / "overtrain.json").read_text())["weights_sha256"]
            for folder in sorted((run_dir / "checkpoints").iterdir())}
