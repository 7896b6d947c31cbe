"""How well a model predicts and answers text: next-token log-probabilities, scored.

- `next_token_targets`: the one place the next-token shift and the -100 mask are
  written (logits at position t predict label t + 1); the held-out loss, the
  curvature objective, the KL proxy and the log-likelihoods below all go through it.
  Scores are computed in float32 at least, whatever precision the logits come in,
  and the forward passes that score run with autocast off (`full_precision`).
- Log-likelihoods of continuations (`loglikelihoods`), as lm-evaluation-harness
  scores them; multiple-choice benchmarks by them (`evaluate_mc`: acc, acc_norm).
- Math: exact match of the final number (after `####`, else the last number written).
- Multiple choice (qa, classify): the choice with the highest log-likelihood.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import numpy as np
import torch

from overtrain.data.benchmarks import MCItem
from overtrain.data.examples import TEST, VALIDATION, TokenizedTask
from overtrain.data.tasks import Example
from overtrain.errors import DataError

IGNORE_INDEX = -100  # a label not scored: prompt, padding, the first position


# -- next-token targets --------------------------------------------------------------

def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast off for `device` within the block, even under a caller's bf16 autocast.

    A forward pass that scores then runs in the weights' own precision (float32): bf16
    rounds logits by ~0.4%, more than the 0.01 bpb differences the study measures.
    """
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def next_token_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictions that have a target, and their targets: ([n, vocab] logits, [n] token ids).

    `logits` [batch, length, vocab] are the model's outputs, the prediction at position t
    being for the token at t + 1; `labels` [batch, length] hold the sequence's tokens
    (HF convention), or [batch, length + 1] when the sequence's last token was never an
    input (scoring a continuation to the edge of the window). Positions whose label is
    -100 are dropped. The logits come out in float32 if they were in lower precision.
    """
    targets, scored = _shifted(labels.to(logits.device))
    predictions = logits[:, : targets.shape[1]][scored]
    if predictions.dtype not in (torch.float32, torch.float64):
        predictions = predictions.float()
    return predictions, targets[scored]


def count_next_token_targets(labels: torch.Tensor) -> int:
    """How many positions of `labels` (see `next_token_targets`) are predicted and scored."""
    return int(_shifted(labels)[1].sum())


def _shifted(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    targets = labels[:, 1:]  # position 0 is never predicted
    return targets, targets != IGNORE_INDEX


# -- log-likelihoods and benchmarks ---------------------------------------------------

def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval splits them.

    Trailing spaces of the context move to the continuation; the whole string is
    encoded once and the continuation is what follows the context's tokens, so
    both are tokenized as the model would see them in running text. An empty context
    becomes the end-of-text token, for the first continuation token to have a
    prediction.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.eos_token_id], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[: len(context_ids)], whole[len(context_ids):]


def _max_length(model, tokenizer) -> int:
    for attribute in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if value := getattr(model.config, attribute, None):
            return int(value)
    return int(tokenizer.model_max_length)


def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16,
                   device: torch.device | str | None = None) -> list[float]:
    """Summed log-probability of each continuation given its context.

    Requests are sorted longest first, right-padded and scored one forward pass per
    batch; the result comes back in the order of `requests`. Sequences longer than
    the model's window keep their last tokens, as in lm-eval; a continuation longer
    than the whole window (rare: a tiny model's window) is scored on its last tokens.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    window = _max_length(model, tokenizer)
    encoded = []
    for context, continuation in requests:
        context_ids, continuation_ids = encode_request(tokenizer, context, continuation)
        if not continuation_ids:
            raise DataError(f"context {context[-40:]!r}: continuation {continuation!r} adds no token")
        sequence = (context_ids + continuation_ids)[-(window + 1):]  # the last token is only ever a target
        encoded.append((sequence, min(len(continuation_ids), len(sequence) - 1)))
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i][0]), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = [0.0] * len(encoded)
    was_training = model.training
    model.eval()
    with torch.inference_mode(), full_precision(device):
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            length = len(encoded[batch[0]][0])
            ids = torch.full((len(batch), length - 1), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), length - 1), dtype=torch.long)
            labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
            for row, i in enumerate(batch):
                sequence, n_scored = encoded[i]
                n = len(sequence) - 1
                ids[row, :n] = torch.tensor(sequence[:-1])
                mask[row, :n] = 1
                labels[row, n + 1 - n_scored: n + 1] = torch.tensor(sequence[-n_scored:])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, i in enumerate(batch):
                predictions, targets = next_token_targets(logits[row:row + 1], labels[row:row + 1])
                results[i] = predictions.log_softmax(dim=-1).gather(1, targets[:, None]).sum().item()
    model.train(was_training)
    return results


def evaluate_mc(model, tokenizer, items: Sequence[MCItem], batch_size: int = 16, limit: int | None = None,
                device: torch.device | str | None = None) -> dict:
    """Accuracy of `model` on multiple-choice items: {"acc", "acc_norm", "n"}.

    `acc` picks the choice of highest log-likelihood, `acc_norm` the highest per
    character of the choice (lm-eval's definition).
    """
    items = list(items)[:limit]
    requests = [request for item in items for request in item.requests()]
    scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, device=device)
    correct = correct_norm = 0
    position = 0
    for item in items:
        item_scores = np.array(scores[position:position + len(item.choices)])
        lengths = np.array([float(len(choice)) for choice in item.choices])
        position += len(item.choices)
        correct += int(np.argmax(item_scores) == item.gold)
        correct_norm += int(np.argmax(item_scores / lengths) == item.gold)
    n = len(items)
    return {"acc": correct / n if n else float("nan"), "acc_norm": correct_norm / n if n else float("nan"), "n": n}


# -- generation and task accuracy -----------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer a worked solution ends with: after `####` if present, else the last number."""
    tail = text.split("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    value = numbers[0] if "####" in text else numbers[-1]
    return value.replace(",", "").rstrip(".").removesuffix(".0")


@torch.inference_mode()
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations, batched with left padding so every prompt ends at the same column."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            with full_precision(device):  # a bf16 near-tie would flip the greedy token
                generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def math_exact_match(model, tokenizer, examples: list[Example], max_new_tokens: int = 128) -> float:
    """Fraction of problems whose generated final number equals the reference's."""
    generated = greedy_completions(model, tokenizer, [e.prompt for e in examples], max_new_tokens)
    hits = [final_number(text) is not None and final_number(text) == final_number(e.completion)
            for text, e in zip(generated, examples)]
    return sum(hits) / len(hits)


def multiple_choice_accuracy(model, tokenizer, examples: list[Example]) -> float:
    """Accuracy of picking the gold choice by log-likelihood given the prompt.

    Task choices are written as they follow the prompt (leading space included), so
    they are scored as they are, without the benchmark's added delimiter.
    """
    requests = [(e.prompt, choice) for e in examples for choice in e.choices]
    scores = iter(loglikelihoods(model, tokenizer, requests))
    hits = []
    for e in examples:
        item_scores = [next(scores) for _ in e.choices]
        hits.append(max(range(len(item_scores)), key=item_scores.__getitem__) == e.gold)
    return sum(hits) / len(hits)


def task_accuracy(model, tokenizer, task: TokenizedTask) -> dict[str, float]:
    """`id_acc` (validation part) and `id_test_acc` (test part) of a task where accuracy means
    something: choice log-likelihood, or math exact match."""
    scores = {}
    for name, part in (("id_acc", VALIDATION), ("id_test_acc", TEST)):
        examples = task.scored_part(part)
        if not examples:
            continue
        if all(e.choices for e in examples):
            scores[name] = multiple_choice_accuracy(model, tokenizer, examples)
        elif task.name == "math":
            scores[name] = math_exact_match(model, tokenizer, examples)
    return scores
