"""Metrics in float32 even when the caller runs under bf16 autocast (STATISTICS.md section 9).

On CUDA the training forward runs under bf16 autocast; the effects the study measures
(0.01 bpb) are below bf16's rounding. CPU autocast rounds the same way, so these tests
run the real code paths on a tiny real model inside `torch.autocast("cpu", bfloat16)`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from overtrain.probes.loss import heldout_metrics
from overtrain.probes.objective import causal_lm_objective
from overtrain.probes.scoring import loglikelihoods, next_token_targets


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture()
def text(byte_corpus):
    return byte_corpus.heldout_batches(4, 64, 1024)


def test_heldout_metrics_under_bf16_autocast_equal_the_float32_ones_exactly(tiny_model, text, byte_corpus):
    float32 = heldout_metrics(tiny_model, text, byte_corpus.byte_lengths)
    with bf16_autocast():
        under_autocast = heldout_metrics(tiny_model, text, byte_corpus.byte_lengths)
    assert under_autocast == float32
    assert torch.is_autocast_enabled("cpu") is False  # the caller's state is restored on the way out


def test_a_bf16_forward_would_have_changed_the_loss(tiny_model, text, byte_corpus):
    """The guard above is needed: the same forward under autocast, left on, gives another loss."""
    float32 = heldout_metrics(tiny_model, text, byte_corpus.byte_lengths)["loss_nats"]
    total, count = 0.0, 0
    tiny_model.eval()
    with torch.inference_mode(), bf16_autocast():
        for batch in text:
            logits = tiny_model(input_ids=batch["input_ids"], use_cache=False).logits
            assert logits.dtype == torch.bfloat16
            predictions, targets = next_token_targets(logits, batch["labels"])
            total += F.cross_entropy(predictions, targets, reduction="sum").double().item()
            count += len(targets)
    assert abs(total / count - float32) > 1e-5


@pytest.mark.filterwarnings("ignore:.*attention:UserWarning")  # the objective switches to eager attention: said once
def test_log_likelihoods_and_the_curvature_objective_ignore_the_callers_autocast(tiny_model, text, byte_corpus):
    requests = [("The quick brown", " fox"), ("def f(x):", " return x")]
    tokenizer = byte_corpus.tokenizer
    objective = causal_lm_objective(tiny_model, text[:2])
    float32 = (loglikelihoods(tiny_model, tokenizer, requests), objective.value())
    with bf16_autocast():
        under_autocast = (loglikelihoods(tiny_model, tokenizer, requests), objective.value())
    assert under_autocast == float32
