"""Pre-training throughput: overtrain's loop against the transformers Trainer.

Same model (same init), same batches, same optimizer settings, same machine, one run.
Timing starts after 10 warm-up steps (compilation). Prints tokens/s of each, their ratio, and the fraction of this machine's measured
float32 matmul peak that each reaches (model FLOPs ~ 6 * parameters * tokens).

    python benchmarks/bench_pretrain.py [--steps 150] [--preset tiny] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pydoc_data.topics import topics

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from overtrain.data.corpus import prepare_corpus
from overtrain.models.build import build_model, parameter_count
from overtrain.spec import PRESETS
from overtrain.train.loop import TrainConfig, train
from overtrain.train.schedules import Schedule


def matmul_peak_gflops(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


class FixedBatches(Dataset):
    """The exact windows our loop sees, one sequence per item, in order."""

    def __init__(self, batches: list[dict]):
        self.rows = [ids for batch in batches for ids in batch["input_ids"]]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


WARMUP_STEPS = 10  # excluded from the timing: compilation and allocator warm-up


class StepClock:
    """Wall time at the end of the warm-up step and of the last step."""

    def __init__(self):
        self.times = {}

    def tick(self, steps_done: int) -> None:
        self.times[steps_done] = time.perf_counter()

    def tokens_per_second(self, batches: list[dict]) -> float:
        last = max(self.times)
        return (last - WARMUP_STEPS) * batches[0]["input_ids"].numel() / (self.times[last] - self.times[WARMUP_STEPS])


class TrainerClock(TrainerCallback):
    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.tick(state.global_step)


def run_ours(model, batches, steps, lr, compile: bool) -> float:
    config = TrainConfig(steps=steps, schedule=Schedule("cosine", lr, steps, steps // 10), compile=compile)
    clock = StepClock()
    train(model, iter(batches), config, on_step_end=lambda done, _: clock.tick(done), description="overtrain loop")
    return clock.tokens_per_second(batches)


def run_trainer(model, batches, steps, lr, batch_size, out_dir, compile: bool) -> float:
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=steps // 10, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        logging_steps=10**9, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True, seed=0, torch_compile=compile,
    )
    clock = StepClock()
    trainer = Trainer(model=model, args=args, train_dataset=FixedBatches(batches), callbacks=[TrainerClock(clock)])
    trainer.train()
    return clock.tokens_per_second(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--vocab", default=2048, type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    docs = [text for _, text in sorted(topics.items())]
    corpus = prepare_corpus(docs[4:], docs[:4], args.vocab)
    stream = corpus.train_batches(args.batch_size, args.seq_len, seed=0)
    batches = [next(stream) for _ in range(args.steps)]
    size = PRESETS[args.preset]
    peak = matmul_peak_gflops()
    n_params = parameter_count(build_model(size, len(corpus.tokenizer), seed=0))

    # Each contender runs twice, interleaved, and keeps its better run: this absorbs
    # one-off warm-up (compilation caches, allocator) and the machine's noise.
    contenders = {
        "overtrain (compiled)": lambda m: run_ours(m, batches, args.steps, 3e-3, compile=True),
        "overtrain (eager)": lambda m: run_ours(m, batches, args.steps, 3e-3, compile=False),
        "Trainer": lambda m: run_trainer(m, batches, args.steps, 3e-3, args.batch_size, tmp, compile=False),
        "Trainer (torch_compile)": lambda m: run_trainer(m, batches, args.steps, 3e-3, args.batch_size, tmp, compile=True),
    }
    results = {name: 0.0 for name in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):
            for name, run in contenders.items():
                results[name] = max(results[name], run(build_model(size, len(corpus.tokenizer), seed=0)))

    print(f"model: preset {args.preset}, {n_params:,} parameters, batch {args.batch_size}x{args.seq_len}, "
          f"{args.steps} steps, {args.threads} threads")
    print(f"float32 matmul peak: {peak:.1f} GFLOP/s")
    for name, tps in results.items():
        gflops = 6 * n_params * tps / 1e9
        print(f"{name:>18}: {tps:>10,.0f} tokens/s  {gflops:6.2f} GFLOP/s  {gflops / peak:6.1%} of peak")
    ours = results["overtrain (compiled)"]
    print(f"ratio overtrain (default, compiled) / Trainer (default): {ours / results['Trainer']:.2f}x")
    print(f"ratio overtrain (compiled) / Trainer (torch_compile): {ours / results['Trainer (torch_compile)']:.2f}x")
    print(f"ratio overtrain (eager) / Trainer (default): {results['overtrain (eager)'] / results['Trainer']:.2f}x")


if __name__ == "__main__":
    main()
