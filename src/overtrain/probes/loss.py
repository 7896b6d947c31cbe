"""Held-out loss (nats per token) and bits per byte, of a model or of every member of an ensemble.

bpb = (sum of next-token losses in nats) / (ln 2 * bytes of the predicted tokens):
it does not depend on the tokenizer, so models with different vocabularies compare.

Computed in float32 whatever the caller's autocast: the differences measured with it
(0.01 bpb) are smaller than bf16's rounding of the logits.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from overtrain.models.stacked import StackedLlama
from overtrain.probes.scoring import full_precision, next_token_targets


@torch.inference_mode()
def heldout_metrics(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], byte_lengths: np.ndarray) -> dict[str, float]:
    """Mean loss in nats per predicted token, bits per byte and perplexity, in the weights' precision
    (autocast is switched off for the forward passes)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    byte_table = torch.as_tensor(byte_lengths, dtype=torch.float64)
    total_nats, total_tokens, total_bytes = 0.0, 0, 0.0
    with full_precision(device):
        for batch in batches:
            logits = model(input_ids=batch["input_ids"].to(device), use_cache=False).logits
            predictions, targets = next_token_targets(logits, batch["labels"])
            total_nats += F.cross_entropy(predictions, targets, reduction="none").double().sum().item()
            total_tokens += len(targets)
            total_bytes += byte_table[targets.cpu()].sum().item()
    model.train(was_training)
    return _metrics(total_nats, total_tokens, total_bytes)


@torch.inference_mode()
def stacked_heldout_metrics(stack: StackedLlama, batches: list[dict[str, torch.Tensor]],
                            byte_lengths: np.ndarray) -> list[dict[str, float]]:
    """`heldout_metrics` of every member of an ensemble, in one forward pass per batch
    (each member reads the same batches); one dict per member."""
    byte_table = torch.as_tensor(byte_lengths, dtype=torch.float64)
    nats = torch.zeros(stack.members, dtype=torch.float64)
    total_tokens, total_bytes = 0, 0.0
    with full_precision(stack.device):
        for batch in batches:
            losses, counted = stack.token_losses(batch["input_ids"].to(stack.device), batch["labels"].to(stack.device))
            nats += losses.double().sum(dim=(1, 2)).cpu()
            targets = batch["labels"][:, 1:][counted[0].cpu()]  # the same positions count for every member
            total_tokens += len(targets)
            total_bytes += byte_table[targets].sum().item()
    return [_metrics(n, total_tokens, total_bytes) for n in nats.tolist()]


def _metrics(total_nats: float, total_tokens: int, total_bytes: float) -> dict[str, float]:
    loss = total_nats / max(total_tokens, 1)
    return {
        "loss_nats": loss,
        "bpb": total_nats / (math.log(2) * max(total_bytes, 1.0)),
        "ppl": math.exp(min(loss, 700.0)),
    }
