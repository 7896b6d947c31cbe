"""Learning-rate schedules as functions of the step: lr(step) = peak * factor(step).

- cosine: linear warmup, then cosine annealing to zero at the run's last step
  (the paper's controlled set-up: each token budget is its own run).
- constant: linear warmup, then constant.
- wsd (warmup-stable-decay): a decay branch taken from a constant run. The branch
  starts at `start_step` of the stable run and decays linearly to zero at `total`.
- linear: linear warmup, then linear decay to zero (used for fine-tuning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from overtrain.errors import SpecError

SCHEDULES = ("cosine", "constant", "wsd", "linear")


@dataclass(frozen=True)
class Schedule:
    kind: str
    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    decay_start: int = 0  # wsd only: the stable run's step where the decay branch starts

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise SpecError(f"schedule={self.kind!r}: expected one of {', '.join(SCHEDULES)}")

    def __call__(self, step: int) -> float:
        return self.peak_lr * self.factor(step)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        start = self.decay_start if self.kind == "wsd" else self.warmup_steps
        if step < start:
            return 1.0
        progress = (step - start) / max(1, self.total_steps - start)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)  # wsd branch and linear: straight to zero
