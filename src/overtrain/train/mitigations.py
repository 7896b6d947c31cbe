"""Fine-tuning mitigations that are not just a smaller learning rate.

- L2 toward the pre-trained weights: `TrainConfig.l2_to_start` (in the training loop).
- WiSE-FT: interpolate fine-tuned and pre-trained weights, no retraining.
- Replay: mix pre-training sequences into every fine-tuning batch.
- LoRA: train low-rank adapters (through peft) instead of the weights.
- SAM during pre-training: `TrainConfig.sam_rho` / `sam_start_step`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from overtrain.errors import SpecError


@contextmanager
def interpolated(model: torch.nn.Module, pretrained: dict[str, torch.Tensor], alpha: float) -> Iterator[None]:
    """WiSE-FT: within the block theta = alpha * theta_ft + (1 - alpha) * theta_pre.

    alpha = 1 is the fine-tuned model, alpha = 0 the pre-trained one. The fine-tuned
    weights are restored exactly afterwards.
    """
    if not 0.0 <= alpha <= 1.0:
        raise SpecError(f"wise alpha={alpha}: must be in [0, 1]")
    params = dict(model.named_parameters())
    finetuned = {n: p.detach().clone() for n, p in params.items() if n in pretrained}
    try:
        with torch.no_grad():
            for name, weights in finetuned.items():
                params[name].copy_(torch.lerp(pretrained[name].to(weights), weights, alpha))
        yield
    finally:
        with torch.no_grad():
            for name, weights in finetuned.items():
                params[name].copy_(weights)


def with_replay(task_batches: Iterator[dict], pretraining_batches: Iterator[dict], fraction: float,
                pad_id: int) -> Iterator[dict]:
    """Task batches in which a `fraction` of the rows are pre-training sequences.

    Each batch keeps its size: round(fraction * B) task rows are swapped for
    pre-training rows (all of their tokens in the loss), padded or cut to the batch length.
    """
    if not 0.0 <= fraction < 1.0:
        raise SpecError(f"replay fraction={fraction}: must be in [0, 1)")
    for batch in task_batches:
        n_replay = round(fraction * len(batch["input_ids"]))
        if n_replay == 0:
            yield batch
            continue
        replay = next(pretraining_batches)
        length = batch["input_ids"].shape[1]
        ids = _fit(replay["input_ids"][:n_replay], length, pad_id)
        labels = _fit(replay["labels"][:n_replay], length, -100)
        yield {"input_ids": torch.cat([batch["input_ids"][n_replay:], ids]),
               "labels": torch.cat([batch["labels"][n_replay:], labels])}


def _fit(rows: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    if rows.shape[1] >= length:
        return rows[:, :length]
    return torch.nn.functional.pad(rows, (0, length - rows.shape[1]), value=fill)


def with_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """The model with rank-`rank` adapters on every attention and MLP projection (peft)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, config)
