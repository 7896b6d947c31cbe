"""Behavioural residue: does a habit of pre-training survive fine-tuning that never shows it?

The habit measured is the docstring: pre-training text holds Python functions with
docstrings, the `code_nodoc` task fine-tunes on the same kind of code with every
docstring removed. Given the header of a held-out function (`def f(x):`), the model
samples continuations; the docstring rate is the fraction whose body (after the line
break and indentation the model writes itself) opens with a string literal. Sampling is plain ancestral sampling at
temperature 1 from a seeded generator: same seed, same text on CPU.
"""

from __future__ import annotations

import random
import re

import torch

from overtrain.data.tasks import code_modules, function_headers, stdlib_sources

SAMPLES_PER_PROMPT = 4
MAX_NEW_TOKENS = 24  # a line break, up to 16 spaces of indentation and a string opener, one byte per token
DECIDED_CHARS = 3  # non-blank characters that settle whether a body opens with a string (`rb"`)
_STRING_OPENER = re.compile(r"""[rRuUbBfF]{0,2}("|')""")


def opens_with_docstring(continuation: str) -> bool:
    """Whether a function body starts with a string literal (line breaks and spaces before it allowed)."""
    return bool(_STRING_OPENER.match(continuation.lstrip()))


def docstring_prompts(seed: int, n: int) -> list[str]:
    """`n` function headers from the code tasks' held-out modules, a seeded choice."""
    sources = stdlib_sources()
    _, heldout = code_modules(seed)
    headers = [h for module in heldout for h in function_headers(sources[module])]
    return random.Random(seed).sample(headers, min(n, len(headers)))


@torch.inference_mode()
def sample_continuations(model, tokenizer, prompt: str, samples: int, new_tokens: int,
                         generator: torch.Generator) -> list[str]:
    """`samples` continuations of one prompt, sampled together as one batch, each long enough to
    show whether the body opens with a string (or `new_tokens` long)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    ids = ids[:, -(model.config.max_position_embeddings - new_tokens):].repeat(samples, 1)
    start = ids.shape[1]
    for _ in range(new_tokens):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
        probabilities = torch.softmax(logits, dim=-1).cpu()
        ids = torch.cat([ids, torch.multinomial(probabilities, 1, generator=generator).to(device)], dim=1)
        texts = tokenizer.batch_decode(ids[:, start:], skip_special_tokens=True)
        if all(len(text.lstrip()) >= DECIDED_CHARS for text in texts):
            break
    return texts


def docstring_rate(model, tokenizer, prompts: list[str], seed: int, samples: int = SAMPLES_PER_PROMPT,
                   new_tokens: int = MAX_NEW_TOKENS) -> float:
    """Fraction of sampled continuations of `prompts` that open with a docstring."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    try:
        continuations = [text for prompt in prompts
                         for text in sample_continuations(model, tokenizer, prompt, samples, new_tokens, generator)]
    finally:
        model.train(was_training)
    return sum(map(opens_with_docstring, continuations)) / len(continuations)
