"""Held-out loss (nats per token) and bits per byte.

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
    loss = total_nats / max(total_tokens, 1)
    return {
        "loss_nats": loss,
        "bpb": total_nats / (math.log(2) * max(total_bytes, 1.0)),
        "ppl": math.exp(min(loss, 700.0)),
    }
