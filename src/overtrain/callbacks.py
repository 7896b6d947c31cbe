"""The adaptability monitor inside a `transformers.Trainer` run.

    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.add_callback(AdaptabilityCallback(trainer, run_dir="runs/monitor", heldout=texts, every_steps=1000))
    trainer.train()

Every `every_steps` optimizer steps, and at each checkpoint save, it measures the model with
`overtrain.monitor.measure` (held-out bpb, Gaussian sensitivity at each gamma and seed,
the KL sharpness proxy) on the fixed held-out texts, in the trainer's own tokenizer, and:
- appends the rows to `run_dir`, so that `overtrain report RUN_DIR` draws them against tokens;
- sends the same numbers through `trainer.log` (keys `overtrain/...`), so that whatever
  `report_to` names (MLflow, W&B, TensorBoard), every other callback's `on_log` and
  `trainer.state.log_history` receive them. This is why it takes the trainer, as TRL's
  callbacks do: a callback is not otherwise given a way to log;
- prints one line with what it found and what the measurement cost, in seconds and as a
  share of the training time since the previous measurement.

Tokens seen come from the trainer's state (`num_input_tokens_seen`) when it counts them
(`TrainingArguments(include_num_input_tokens_seen=True)`), else steps x sequences per step x
the length of the first training example, or steps x `tokens_per_step` when given; the
rule is printed at the start and written beside the results. Only the main process
measures. docs/MONITOR.md gives the cost at the default settings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from overtrain import monitor
from overtrain.errors import SpecError

# A measurement at the defaults of overtrain.monitor costs about 7 training steps of
# SmolLM2-135M (batches of 4 x 256) and 4 of the paper preset (32 x 128): every 1,000 steps
# is under 1% of training time (docs/MONITOR.md, benchmarks/bench_monitor.py).
EVERY_STEPS = 1000
LOG_PREFIX = "overtrain/"


class AdaptabilityCallback(TrainerCallback):
    """Measures how hard the model is becoming to fine-tune, as `trainer` trains it."""

    def __init__(self, trainer: Trainer, run_dir: str | Path, heldout: Sequence[str], *,
                 every_steps: int = EVERY_STEPS, gammas: Sequence[float] = monitor.GAMMAS,
                 seeds: Sequence[int] = monitor.SEEDS, kl_gamma: float = monitor.KL_GAMMA,
                 heldout_tokens: int = monitor.HELDOUT_TOKENS, seq_len: int = monitor.SEQ_LEN,
                 batch_size: int = monitor.BATCH_SIZE, tokens_per_step: int | None = None):
        if every_steps < 1:
            raise SpecError(f"every_steps={every_steps}: must be at least 1")
        self.trainer, self.run_dir, self.heldout, self.every_steps = trainer, Path(run_dir), list(heldout), every_steps
        self.tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        if self.tokenizer is None:
            raise SpecError("AdaptabilityCallback: the trainer has no tokenizer to read the held-out texts with; "
                            "pass Trainer(..., processing_class=tokenizer)")
        self.settings = {"gammas": gammas, "seeds": seeds, "kl_gamma": kl_gamma, "heldout_tokens": heldout_tokens,
                         "seq_len": seq_len, "batch_size": batch_size}
        # Bad held-out text is named now, not at the first measurement, hundreds of steps in.
        monitor.heldout_batches(self.tokenizer, self.heldout, heldout_tokens,
                                monitor.window_length(trainer.model, seq_len), batch_size)
        self.tokens_per_step, self.tokens_counted = tokens_rule(trainer, tokens_per_step)
        self.measured_step: int | None = None
        self.clock = time.perf_counter()  # training time since the last measurement starts here

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock = time.perf_counter()
        if state.is_world_process_zero:
            tqdm.write(f"overtrain monitor: every {self.every_steps} steps and at each save, into {self.run_dir}; "
                       f"tokens seen: {self.tokens_counted}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_steps == 0:
            self.measure(state, model)

    def on_save(self, args, state, control, model=None, **kwargs):
        self.measure(state, model)

    def measure(self, state, model) -> None:
        if not state.is_world_process_zero or state.global_step == self.measured_step:
            return
        training_seconds = time.perf_counter() - self.clock
        tokens = state.num_input_tokens_seen if self.tokens_per_step is None else state.global_step * self.tokens_per_step
        found = monitor.measure(model, self.tokenizer, self.heldout, run_dir=self.run_dir, step=state.global_step,
                                tokens=int(tokens), tokens_counted=self.tokens_counted, **self.settings)
        found["share_of_training"] = found["seconds"] / training_seconds
        tqdm.write(f"{monitor.describe(found)}, {found['share_of_training']:.1%} of the training time since the "
                   "last measurement")
        self.trainer.log({LOG_PREFIX + name: value for name, value in found.items() if name != "step"})
        self.measured_step = state.global_step
        self.clock = time.perf_counter()


def tokens_rule(trainer: Trainer, tokens_per_step: int | None) -> tuple[int | None, str]:
    """(tokens per optimizer step, or None to read the trainer's own count; the rule in words)."""
    args = trainer.args
    counting = args.include_num_input_tokens_seen  # a bool in older transformers, "all"/"non_padding"/"no" now
    if counting not in (False, "no"):
        return None, f"the trainer's count, num_input_tokens_seen (include_num_input_tokens_seen={counting!r})"
    if tokens_per_step is not None:
        return tokens_per_step, f"steps x {tokens_per_step:,} tokens per step (given as tokens_per_step)"
    sequences = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    try:
        seq_len = len(trainer.train_dataset[0]["input_ids"])
    except (TypeError, KeyError, IndexError, NotImplementedError):
        raise SpecError("AdaptabilityCallback: cannot tell the tokens per step from the training set (no input_ids "
                        "in its first example); pass tokens_per_step=, or "
                        "TrainingArguments(include_num_input_tokens_seen=True)") from None
    return sequences * seq_len, (f"steps x {sequences} sequences x {seq_len} tokens, the length of the first "
                                 "training example (TrainingArguments(include_num_input_tokens_seen=True) counts "
                                 "them exactly)")
