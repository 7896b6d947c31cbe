"""Pre-training speed on the paper preset: overtrain's loop against a plain eager transformers loop.

Same model (the `paper` preset, ~48k parameters, byte vocabulary), same initial
weights, same real byte batches (32 x 128, as examples/paper.yaml), same AdamW
settings, same machine, one run. Prints tokens/s side by side and their ratios:

1. one process, same torch threads: the training step itself
   - plain: `LlamaForCausalLM`, `torch.optim.AdamW` defaults, `loss.backward()`, clip, step;
   - overtrain: `overtrain.train.loop.train` (torch.compile'd model, fused AdamW);
2. the whole machine, as a study uses it: the plain loop with every core as torch
   threads, against overtrain's engine layout (`--workers N`: N processes, one thread
   each, each training its own model), counting the tokens of all of them.

Warm-up steps (compilation, allocator) are excluded from every timing.

    python benchmarks/bench_paper_step.py [--steps 200]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of the loops would interleave with the table

from pydoc_data.topics import topics

import torch

from overtrain.data.corpus import prepare_corpus
from overtrain.models.build import build_model, parameter_count
from overtrain.spec import PRESETS
from overtrain.train.loop import TrainConfig, train
from overtrain.train.schedules import Schedule

WARMUP_STEPS = 10
BATCH, SEQ_LEN, LR = 32, 128, 4e-3


def real_batches(steps: int) -> list[dict]:
    docs = [text for _, text in sorted(topics.items())]
    stream = prepare_corpus(docs[4:], docs[:4], "bytes").train_batches(BATCH, SEQ_LEN, seed=0)
    return [next(stream) for _ in range(steps)]


def fresh_model():
    return build_model(PRESETS["paper"], vocab_size=258, seed=0)


def plain_loop(batches: list[dict]) -> float:
    """What one writes with transformers and torch defaults; tokens/s after warm-up."""
    model = fresh_model()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    for step, batch in enumerate(batches):
        if step == WARMUP_STEPS:
            started = time.perf_counter()
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (len(batches) - WARMUP_STEPS) * BATCH * SEQ_LEN / (time.perf_counter() - started)


def overtrain_loop(batches: list[dict]) -> float:
    ticks = {}
    config = TrainConfig(steps=len(batches), schedule=Schedule("constant", LR, len(batches), 0), compile=True)
    train(fresh_model(), iter(batches), config, on_step_end=lambda done, _: ticks.setdefault(done, time.perf_counter()),
          description="overtrain loop")
    return (len(batches) - WARMUP_STEPS) * BATCH * SEQ_LEN / (ticks[len(batches)] - ticks[WARMUP_STEPS])


LOOPS = {"plain": plain_loop, "overtrain": overtrain_loop}


def _worker(loop: str, threads: int, steps: int, queue) -> None:
    torch.set_num_threads(threads)
    queue.put(LOOPS[loop](real_batches(steps)))


def in_processes(loop: str, processes: int, threads: int, steps: int) -> float:
    """Total tokens/s of `processes` concurrent runs of `loop`, each with `threads` torch threads."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_worker, args=(loop, threads, steps, queue)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    speeds = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    return sum(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="steps per run, the first 10 untimed")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"paper preset: {parameter_count(fresh_model()):,} parameters, batch {BATCH}x{SEQ_LEN} bytes, "
          f"{args.steps} steps, {cores} cores")

    # Each measurement twice, interleaved, keeping the better: absorbs one-off noise.
    one_thread = {name: max(in_processes(name, 1, 1, args.steps) for _ in range(2)) for name in LOOPS}
    print("\n1. the training step, one process, 1 torch thread")
    for name, speed in one_thread.items():
        print(f"   {name:>10}: {speed:>9,.0f} tokens/s")
    print(f"   ratio overtrain / plain: {one_thread['overtrain'] / one_thread['plain']:.2f}x")

    plain_all = max(in_processes("plain", 1, cores, args.steps) for _ in range(2))
    engine = max(in_processes("overtrain", cores, 1, args.steps) for _ in range(2))
    print(f"\n2. the machine: {cores} cores")
    print(f"   {'plain, one process, ' + str(cores) + ' threads':>38}: {plain_all:>9,.0f} tokens/s")
    print(f"   {'overtrain engine, ' + str(cores) + ' workers x 1 thread':>38}: {engine:>9,.0f} tokens/s")
    print(f"   ratio overtrain engine / plain: {engine / plain_all:.2f}x")


if __name__ == "__main__":
    main()
