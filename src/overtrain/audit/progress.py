"""One progress line for an audit: its phases done of all (load, base, sensitivity, KL
sharpness, Hessian if asked, LR sweep, for every checkpoint), the one running, and tqdm's ETA.

Each phase is also timed into the checkpoint's `Costs`; the LR sweep's training runs show
their own steps beneath the line (train.loop's bar).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

from overtrain.audit.result import AuditConfig, Costs

PHASES = ("load", "base", "sensitivity", "kl_sharpness", "lr_sweep")  # and "hessian" when asked for


class AuditProgress:
    def __init__(self, checkpoints: int, config: AuditConfig) -> None:
        self.per_checkpoint = len(PHASES) + (1 if config.hessian_tokens else 0)
        self.bar = tqdm(total=checkpoints * self.per_checkpoint, desc="audit", unit="phase", dynamic_ncols=True)
        self.checkpoint = ""

    @contextmanager
    def phase(self, costs: Costs, name: str, checkpoint: str | None = None) -> Iterator[None]:
        """Time phase `name` into `costs`, showing it as the one running; count it when it ends."""
        self.checkpoint = checkpoint or self.checkpoint
        self.show(name)
        with costs.phase(name):
            yield
        self.bar.update()

    def show(self, doing: str) -> None:
        self.bar.set_postfix_str(f"{self.checkpoint}: {doing}", refresh=True)

    def skipped(self, why: str) -> None:
        """The rest of this checkpoint's phases will not run (its weights repeat an earlier checkpoint's)."""
        self.bar.write(f"{self.checkpoint}: {why}", file=self.bar.fp)
        self.bar.update(self.per_checkpoint - 1)

    def close(self) -> None:
        self.bar.close()
