"""Behavioural residue: does a habit of pre-training survive fine-tuning that never shows it?

The habit measured is the docstring: pre-training text holds Python functions with
docstrings, the `code_nodoc` task fine-tunes on the same kind of code with every
docstring removed. Given the header of a held-out function (`def f(x):`), the model
samples continuations; the docstring rate is the fraction whose body (after the line
break and indentation the model writes itself) opens with a string literal. Sampling
is plain ancestral sampling at temperature 1 from a seeded generator: same seed, same
text on CPU.
"""

from __future__ import annotations

import random
import re

import torch

from overtrain.data.code import code_modules, function_headers, stdlib_sources

SAMPLES_PER_PROMPT = 4
MAX_NEW_TOKENS = 24  # a line break, up to 16 spaces of indentation and a string opener, one byte per token
DECIDED_CHARS = 3  # non-blank characters that settle whether a body opens with a string (`rb"`)
PROMPTS_PER_BATCH = 64  # sampled together: one forward pass per new token for all of them
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


def _left_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the left (so every row's next token is at the end) and their attention mask."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    return ids, mask


@torch.inference_mode()
def sample_continuations(model, tokenizer, prompts: list[str], samples: int, new_tokens: int,
                         generator: torch.Generator) -> list[str]:
    """`samples` continuations of each prompt (those of the first prompt first), sampled as one batch
    with a key-value cache until every one shows how its body opens, or `new_tokens` long."""
    device = next(model.parameters()).device
    window = model.config.max_position_embeddings - new_tokens
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    ids, mask = _left_padded([row[-window:] for row in encoded for _ in range(samples)],
                             tokenizer.pad_token_id or 0, device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # padding shifts no real token's position
    cache, sampled = None, []
    for _ in range(new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        probabilities = torch.softmax(out.logits[:, -1].float(), dim=-1).cpu()
        ids = torch.multinomial(probabilities, 1, generator=generator).to(device)
        sampled.append(ids)
        cache, mask, positions = out.past_key_values, torch.cat([mask, torch.ones_like(ids)], dim=1), positions[:, -1:] + 1
        texts = tokenizer.batch_decode(torch.cat(sampled, dim=1), skip_special_tokens=True)
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
        continuations = [text for start in range(0, len(prompts), PROMPTS_PER_BATCH)
                         for text in sample_continuations(model, tokenizer, prompts[start:start + PROMPTS_PER_BATCH],
                                                          samples, new_tokens, generator)]
    finally:
        model.train(was_training)
    return sum(map(opens_with_docstring, continuations)) / len(continuations)
