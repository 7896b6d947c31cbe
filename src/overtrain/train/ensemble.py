"""Train K same-shaped models at once: the training loop of `loop.py`, member by member, as one computation.

Each member has its own learning rate and schedule, data order, weight decay and
gradient clipping; members share the step count and the AdamW betas. A member whose
loss is not finite stops there (its divergence is its result) and is dropped from
the stack; the others go on. Per member, the arithmetic is `loop.train`'s: HF's
causal-LM loss, `clip_grad_norm_`'s clip, `torch.optim.AdamW`'s update (weight decay
on matrices only), so a member ends where the same run trained alone ends, to float32
rounding (tests/test_ensemble.py). Not here: SAM, the L2 pull, LoRA; cells that
use them train alone. Compilation is the stack's own (`StackedLlama(compile=...)`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from overtrain.errors import CheckpointError
from overtrain.models.stacked import IGNORE, LAYOUT_WARNING, Slot, StackedLlama
from overtrain.runtime.device import autocast
from overtrain.train.loop import TrainConfig, TrainResult

Batch = dict[str, torch.Tensor]


class EnsembleAdamW:
    """`torch.optim.AdamW` on every row of a stack, with a learning rate and weight decay per member."""

    def __init__(self, stack: StackedLlama, weight_decays: Sequence[float], betas: tuple[float, float],
                 eps: float = 1e-8):
        self.stack, self.betas, self.eps = stack, betas, eps
        self.exp_avg = torch.zeros_like(stack.weights)
        self.exp_avg_sq = torch.zeros_like(stack.weights)
        decays = torch.as_tensor(weight_decays, dtype=stack.weights.dtype, device=stack.device)
        self.decay = decays[:, None] * stack.matrix_mask()[None, :]
        self.steps = 0

    @torch.no_grad()
    def step(self, lrs: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        for rows in self.stack.row_blocks():
            weights, grads, lr = self.stack.weights[rows], self.stack.grads[rows], lrs[rows, None]
            exp_avg, exp_avg_sq = self.exp_avg[rows], self.exp_avg_sq[rows]
            weights.mul_(1 - lr * self.decay[rows])
            exp_avg.lerp_(grads, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
            step_size = lr / (1 - beta1 ** self.steps)
            denom = (exp_avg_sq.sqrt() / (1 - beta2 ** self.steps) ** 0.5).add_(self.eps)
            weights.addcmul_(exp_avg / denom, step_size, value=-1.0)

    def keep(self, rows: torch.Tensor) -> None:
        self.exp_avg, self.exp_avg_sq, self.decay = (t.index_select(0, rows) for t in (self.exp_avg, self.exp_avg_sq, self.decay))

    # -- a member's state as torch.optim.AdamW's, so that a checkpoint resumes either way ----

    def member_state_dict(self, row: int, optimizer: torch.optim.AdamW) -> dict:
        """Row `row`'s moments and step as the state dict of `optimizer`, an AdamW of the member's
        HF model made by `loop.make_optimizer` (its param groups, with these moments in them)."""
        state = optimizer.state_dict()
        order = self._torch_order()
        listed = sorted(i for group in state["param_groups"] for i in group["params"])
        if listed != list(range(len(order))):
            raise ValueError(f"the optimizer has {len(listed)} parameters, a member {len(order)}")
        step = torch.tensor(float(self.steps), dtype=torch.float32)
        state["state"] = {i: {"step": step.clone(),
                              "exp_avg": self.exp_avg[row, slot.start:slot.end].reshape(slot.shape).cpu().clone(),
                              "exp_avg_sq": self.exp_avg_sq[row, slot.start:slot.end].reshape(slot.shape).cpu().clone()}
                          for i, slot in enumerate(order)}
        return state

    def load_member_state(self, row: int, state: dict) -> None:
        """Set row `row`'s moments and the step count from `torch.optim.AdamW`'s state dict of an
        HF model whose optimizer `loop.make_optimizer` made (e.g. a pre-training checkpoint's)."""
        order = self._torch_order()
        entries = state["state"]
        if sorted(entries) != list(range(len(order))):
            raise CheckpointError(f"optimizer state has {len(entries)} parameters' moments, a member {len(order)}")
        with torch.no_grad():
            for i, slot in enumerate(order):
                for moments, name in ((self.exp_avg, "exp_avg"), (self.exp_avg_sq, "exp_avg_sq")):
                    moments[row, slot.start:slot.end] = entries[i][name].reshape(-1).to(moments)
        steps = {int(entry["step"]) for entry in entries.values()}
        if len(steps) != 1:
            raise CheckpointError(f"optimizer state: parameters at different steps {sorted(steps)}")
        self.steps = steps.pop()

    def _torch_order(self) -> list[Slot]:
        """The parameters in the order of `make_optimizer`'s groups: matrices, then vectors (each in
        `named_parameters()` order, which is the slots')."""
        slots = self.stack.slots
        return [s for s in slots if len(s.shape) >= 2] + [s for s in slots if len(s.shape) < 2]


def train_ensemble(
    stack: StackedLlama,
    configs: Sequence[TrainConfig],
    batches: Sequence[Iterator[Batch]],
    *,
    optimizer: EnsembleAdamW | None = None,
    start_step: int = 0,
    evaluate: Callable[[StackedLlama, list[int]], list[dict[str, float]]] | None = None,
    evaluate_every: int = 0,
    on_step_end: Callable[[int, list[int]], None] | None = None,
    description: str = "ensemble",
) -> list[TrainResult]:
    """Train member i of `stack` with `configs[i]` on `batches[i]`, steps `start_step .. steps-1`;
    one TrainResult per member. `optimizer`: one holding the members' AdamW state (resuming), else a new one.

    `evaluate(stack, members)` returns metrics for each row of the stack (whose member
    ids are `members`), every `evaluate_every` steps and at the end. `on_step_end(steps_done,
    members)` runs after every step (checkpointing hooks here). The stack ends holding the
    members that did not diverge, in order.
    """
    _check_alike(configs)
    steps = configs[0].steps
    results = [TrainResult(steps_done=start_step) for _ in configs]
    alive = list(range(len(configs)))
    optimizer = optimizer or EnsembleAdamW(stack, [c.weight_decay for c in configs], (configs[0].beta1, configs[0].beta2))
    clips = torch.tensor([c.grad_clip for c in configs], device=stack.device)
    stack.grads.zero_()
    started = time.perf_counter()
    bar = tqdm(range(start_step, steps), desc=description, leave=False, mininterval=2.0)
    for step in bar:
        drawn = [next(batches[m]) for m in alive]
        input_ids, labels = stacked_batch(drawn, stack.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=LAYOUT_WARNING)
            losses = loss_and_gradient(stack, input_ids, labels)
        # A diverged member's gradient is not finite in its own rows only: members share no operation.
        finite = torch.isfinite(losses)
        losses = losses.tolist()
        if not bool(finite.all()):
            rows = [row for row, ok in enumerate(finite.tolist()) if ok]
            for row, member in enumerate(alive):
                if row not in rows:
                    results[member].diverged_at_step, results[member].last_loss = step, losses[row]
            kept = torch.tensor(rows, device=stack.device, dtype=torch.long)
            stack.keep(kept)
            optimizer.keep(kept)
            clips = clips.index_select(0, kept)
            alive, drawn, losses = [alive[r] for r in rows], [drawn[r] for r in rows], [losses[r] for r in rows]
            if not alive:
                break
        _clip_rows(stack, clips)
        optimizer.step(torch.tensor([configs[m].schedule(step) for m in alive], device=stack.device))
        stack.grads.zero_()
        for member, batch, loss in zip(alive, drawn, losses):
            result = results[member]
            result.steps_done, result.last_loss = step + 1, loss
            result.tokens_seen += batch["input_ids"].numel()
        if step % 20 == 0:
            bar.set_postfix(members=len(alive), loss=f"{min(losses):.3f}")
        if on_step_end is not None:
            on_step_end(step + 1, alive)
        if evaluate is not None and evaluate_every and (step + 1) % evaluate_every == 0 and step + 1 < steps:
            for member, metrics in zip(alive, evaluate(stack, alive)):
                results[member].evaluations.append({"step": step + 1, **metrics})
    bar.close()
    seconds = time.perf_counter() - started
    for result in results:
        result.seconds = seconds
    if evaluate is not None and alive:
        for member, metrics in zip(alive, evaluate(stack, alive)):
            results[member].evaluations.append({"step": results[member].steps_done, **metrics})
    return results


def loss_and_gradient(stack: StackedLlama, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each member's loss [K] (HF's: the mean over the batch's counted positions), its gradient
    accumulated into `stack.grads`, pass by pass (`StackedLlama.passes`)."""
    counted = (labels[:, :, 1:] != IGNORE).sum(dim=(1, 2)).clamp(min=1)
    nats = torch.zeros(stack.members, device=stack.device)
    with autocast(stack.device):
        for rows, _, losses in stack.passes(input_ids, labels):
            summed = losses.sum(dim=(1, 2))
            (summed / counted[rows]).sum().backward()
            nats[rows] += summed.detach()
    return nats / counted


def stacked_batch(batches: Sequence[Batch], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Members' batches as [K, B, T] ids and labels, right-padded to the longest (the padding
    has no loss and, with causal attention at the end of each row, changes no other position)."""
    length = max(b["input_ids"].shape[1] for b in batches)
    ids = torch.stack([_pad(b["input_ids"], length, 0) for b in batches])
    labels = torch.stack([_pad(b.get("labels", b["input_ids"]), length, IGNORE) for b in batches])
    return ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def _pad(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    missing = length - tensor.shape[1]
    return tensor if not missing else torch.nn.functional.pad(tensor, (0, missing), value=value)


@torch.no_grad()
def _clip_rows(stack: StackedLlama, clips: torch.Tensor) -> None:
    """`clip_grad_norm_` per member: scale a row by min(1, clip / (norm + 1e-6)); a clip of 0 is none."""
    for rows in stack.row_blocks():
        grads = stack.grads[rows]
        coefficients = (clips[rows] / (torch.linalg.vector_norm(grads, dim=1) + 1e-6)).clamp(max=1.0)
        grads.mul_(torch.where(clips[rows] > 0, coefficients, torch.ones_like(coefficients))[:, None])


def _check_alike(configs: Sequence[TrainConfig]) -> None:
    first = configs[0]
    for config in configs:
        if (config.steps, config.beta1, config.beta2) != (first.steps, first.beta1, first.beta2):
            raise ValueError("ensemble members must share steps and AdamW betas; train the others apart")
        if config.l2_to_start or config.sam_rho:
            raise ValueError("ensemble members train without the L2 pull or SAM; train those alone")
