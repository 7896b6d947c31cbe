"""Held-out loss (nats per token) and bits per byte.

bpb = (sum of next-token losses in nats) / (ln 2 * bytes of the predicted tokens):
it does not depend on the tokenizer, so models with different vocabularies compare.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from overtrain.runtime.device import autocast


@torch.inference_mode()
def heldout_metrics(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], byte_lengths: np.ndarray) -> dict[str, float]:
    """Mean loss in nats per predicted token, bits per byte and perplexity."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    byte_table = torch.as_tensor(byte_lengths, dtype=torch.float64)
    total_nats, total_tokens, total_bytes = 0.0, 0, 0.0
    for batch in batches:
        input_ids = batch["input_ids"].to(device)
        targets = batch["labels"][:, 1:]
        with autocast(device):
            logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
        nats = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), ignore_index=-100, reduction="none")
        mask = targets.flatten() != -100
        total_nats += nats.double().sum().item()
        total_tokens += int(mask.sum())
        total_bytes += byte_table[targets.flatten()[mask]].sum().item()
    model.train(was_training)
    loss = total_nats / max(total_tokens, 1)
    return {
        "loss_nats": loss,
        "bpb": total_nats / (math.log(2) * max(total_bytes, 1.0)),
        "ppl": math.exp(min(loss, 700.0)),
    }
