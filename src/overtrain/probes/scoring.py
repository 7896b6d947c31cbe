"""What a model writes: greedy generation, scored.

- Math: exact match of the final number (after `####`, else the last number written).
- Multiple choice (qa, classify): the choice with the highest log-likelihood.
"""

from __future__ import annotations

import re

import torch

from overtrain.data.benchmarks import loglikelihoods
from overtrain.data.tasks import Example

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
