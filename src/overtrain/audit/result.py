"""What an audit is asked (`AuditConfig`), what it found (`AuditResult`: tidy rows) and what it cost (`Costs`).

The rows have a study's columns and metric names (probes/metrics.py): `kind` is
"probe" for the measures of the model as it is and "finetune" for those of the LR
sweep, where each LR's run has its `step` 0 (the model before fine-tuning, measured
once) and its last step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd

from overtrain.models.series import SeriesCheckpoint
from overtrain.runtime.memory import peak_resident_gib

# The columns of a study's results (study/store.py) that an audit fills, in that order.
COLUMNS = ["kind", "checkpoint", "weights", "tokens", "task", "lr", "gamma", "seed", "step", "metric", "value"]


@dataclass(frozen=True)
class AuditConfig:
    gammas: tuple[float, ...] = (0.25, 0.5, 1.0)
    noise_seeds: tuple[int, ...] = (0, 1)
    heldout_tokens: int = 4096
    seq_len: int = 256
    batch_size: int = 4
    kl_gamma: float = 0.5
    hessian_tokens: int = 0  # 0 skips the top eigenvalue (minutes on a 100M+ model on CPU)
    task: str = "qa"
    lrs: tuple[float, ...] = (1e-5, 1e-4, 1e-3)
    steps: int = 10
    finetune_seq_len: int = 256
    eval_examples: int = 32
    benchmarks: tuple[str, ...] = ("arc_easy", "piqa")
    benchmark_limit: int = 50
    tolerance_bpb: float = 0.05
    seed: int = 0


@dataclass
class Costs:
    """What an audit took: wall time and the process's peak memory at the end of each phase,
    and the speed of its evaluation and of its fine-tuning."""
    device: str = "cpu"
    seconds: dict[str, float] = field(default_factory=dict)
    peak_resident_gib: dict[str, float] = field(default_factory=dict)  # peak so far, read after each phase
    peak_gpu_gib: float | None = None
    eval_tokens_per_second: float = float("nan")
    train_tokens_per_second: float = float("nan")  # padding included, as the model computes it

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            self.peak_resident_gib[name] = peak_resident_gib()

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"seconds": self.seconds, "peak resident GiB so far": self.peak_resident_gib})


@dataclass
class AuditResult:
    checkpoint: SeriesCheckpoint
    config: AuditConfig
    rows: list[dict] = field(default_factory=list)
    costs: Costs = field(default_factory=Costs)

    @property
    def model(self) -> str:
        return self.checkpoint.label

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows).reindex(columns=COLUMNS)
