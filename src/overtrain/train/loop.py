"""One training loop for pre-training and fine-tuning.

AdamW (weight decay on matrices only), gradient clipping, a schedule, optional L2
pull toward the starting weights, and divergence detection: a non-finite loss stops
the run and is reported as a result, not raised.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from overtrain.runtime.device import autocast
from overtrain.train.schedules import Schedule


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    schedule: Schedule
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    l2_to_start: float = 0.0  # lambda * ||theta - theta_start||^2 added to the loss
    compile: bool = False  # torch.compile the forward pass: ~1.3x on small models, seconds to compile
    sam_rho: float = 0.0  # sharpness-aware minimization radius; 0 is plain AdamW
    sam_start_step: int = 0  # SAM only from this step on (e.g. the last part of pre-training)


@dataclass
class TrainResult:
    steps_done: int = 0
    tokens_seen: int = 0
    diverged_at_step: int | None = None
    last_loss: float = float("nan")
    seconds: float = 0.0
    evaluations: list[dict] = field(default_factory=list)  # {"step": s, <metric>: value}

    @property
    def diverged(self) -> bool:
        return self.diverged_at_step is not None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.seconds if self.seconds else 0.0


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    # nanoGPT's rule: decay matrices, not gains and biases.
    matrices = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=config.schedule(0), betas=(config.beta1, config.beta2), fused=fused)


def train(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    config: TrainConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    on_step_end: Callable[[int, float], None] | None = None,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    evaluate_every: int = 0,
    description: str = "train",
) -> TrainResult:
    """Run steps `start_step .. config.steps-1`.

    `on_step_end(steps_done, lr)` runs after every step (checkpointing hooks here).
    `evaluate(model)` runs every `evaluate_every` steps and at the end, in eval mode.
    """
    device = next(model.parameters()).device
    optimizer = optimizer or make_optimizer(model, config)
    anchor = _start_weights(model) if config.l2_to_start > 0 else None
    forward = compiled(model) if config.compile else model
    result = TrainResult(steps_done=start_step)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    started = time.perf_counter()
    bar = tqdm(range(start_step, config.steps), desc=description, leave=False, mininterval=2.0)
    for step in bar:
        lr = config.schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        loss = _objective(model, forward, batch, anchor, config.l2_to_start)
        if not torch.isfinite(loss):
            result.diverged_at_step = step
            result.last_loss = loss.item()
            break
        loss.backward()
        if config.sam_rho > 0 and step >= config.sam_start_step:
            _sharpness_aware_gradient(model, lambda: _objective(model, forward, batch, anchor, config.l2_to_start),
                                      config.sam_rho)
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        # Free the gradients now, not before the next backward: held through the next
        # forward they would add a full copy of the weights to the peak memory.
        optimizer.zero_grad(set_to_none=True)
        result.steps_done = step + 1
        result.tokens_seen += batch["input_ids"].numel()
        result.last_loss = loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{result.last_loss:.3f}", lr=f"{lr:.2e}")
        if on_step_end is not None:
            on_step_end(step + 1, lr)
        if evaluate is not None and evaluate_every and (step + 1) % evaluate_every == 0 and step + 1 < config.steps:
            result.evaluations.append({"step": step + 1, **_evaluate(model, evaluate)})
    bar.close()
    result.seconds = time.perf_counter() - started
    if evaluate is not None and not result.diverged:
        result.evaluations.append({"step": result.steps_done, **_evaluate(model, evaluate)})
    return result


def _objective(model, forward, batch, anchor, l2: float) -> torch.Tensor:
    """The training loss of one batch, with the L2 pull toward the start weights if any."""
    with autocast(next(model.parameters()).device):
        loss = forward(**batch, use_cache=False).loss
    if anchor is not None:
        loss = loss + l2 * _squared_distance(model, anchor)
    return loss


def _sharpness_aware_gradient(model, objective: Callable[[], torch.Tensor], rho: float) -> None:
    """Replace the gradient by the one at theta + rho * g / ||g|| (SAM's ascent step)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    with torch.no_grad():
        ascent = [p.grad * (rho / (norm + 1e-12)) for p in params]
        torch._foreach_add_(params, ascent)
    model.zero_grad(set_to_none=True)
    objective().backward()
    with torch.no_grad():
        torch._foreach_sub_(params, ascent)


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile(model)`, running eagerly wherever compilation fails (e.g. no C++ compiler)."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    return torch.compile(model)


def _evaluate(model: torch.nn.Module, evaluate: Callable[[torch.nn.Module], dict[str, float]]) -> dict[str, float]:
    model.eval()
    try:
        return evaluate(model)
    finally:
        model.train()


def _start_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _squared_distance(model: torch.nn.Module, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in anchor)
