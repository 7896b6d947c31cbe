"""Tasks as token ids: examples tokenized for fine-tuning and bits-per-byte, and batches of them."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from overtrain.data.tasks import Example, Task
from overtrain.data.tokenizer import token_byte_lengths
from overtrain.errors import SpecError


VALIDATION, TEST = "validation", "test"


def held_out_part(examples: list, part: str) -> list:
    """The validation (even positions) or test (odd positions) part of held-out examples.

    Alternate positions rather than halves: the held-out list is already shuffled by the
    task's seed, and any prefix of it (fewer `eval_examples`) splits the same way."""
    if part not in (VALIDATION, TEST):
        raise ValueError(f"part: {part!r} is not {VALIDATION!r} or {TEST!r}")
    return examples[0::2] if part == VALIDATION else examples[1::2]


@dataclass
class TokenizedTask:
    """A fine-tuning task ready for training and held-out loss: its examples as token ids."""

    train: list[dict]     # {"input_ids": [...], "labels": [...]} with the prompt masked
    heldout: list[dict]
    pad_id: int
    scored: list[Example]  # held-out examples scored for accuracy
    name: str
    docstring_prompts: list[str] = field(default_factory=list)  # held-out function headers (code tasks, probe on)

    @classmethod
    def from_task(cls, task: Task, tokenizer: PreTrainedTokenizerBase, seq_len: int, eval_examples: int,
                  accuracy_examples: int = 0, docstring_prompts: list[str] | None = None) -> TokenizedTask:
        """`task` tokenized to windows of `seq_len`: all its training examples, the first `eval_examples`
        held-out ones for loss, the first `accuracy_examples` of them kept as text for accuracy.

        Both held-out sets have two parts (see `part`): a validation part that chooses the
        learning rate and the step to stop at, and a test part that reports the chosen run."""
        return cls(train=tokenize_examples(task.train, tokenizer, seq_len),
                   heldout=tokenize_examples(task.heldout[:eval_examples], tokenizer, seq_len),
                   pad_id=tokenizer.pad_token_id, scored=task.heldout[:accuracy_examples], name=task.name,
                   docstring_prompts=docstring_prompts or [])

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless seeded batches of training examples, reshuffled every epoch."""
        rng = random.Random(seed)
        order: list[int] = []
        while True:
            if len(order) < batch_size:
                order += rng.sample(range(len(self.train)), len(self.train))
            chosen, order = order[:batch_size], order[batch_size:]
            yield collate([self.train[i] for i in chosen], self.pad_id)

    def heldout_batches(self, batch_size: int, part: str = VALIDATION) -> list[dict[str, torch.Tensor]]:
        examples = held_out_part(self.heldout, part)
        return [collate(examples[i:i + batch_size], self.pad_id) for i in range(0, len(examples), batch_size)]

    def scored_part(self, part: str = VALIDATION) -> list[Example]:
        return held_out_part(self.scored, part)


def tokenize_examples(examples: Iterable[Example], tokenizer: PreTrainedTokenizerBase, max_len: int) -> list[dict]:
    """Token ids, labels and completion bytes of each example, for fine-tuning and bpb.

    Each example becomes prompt tokens + completion tokens + end-of-text. Labels are
    -100 over the prompt (no loss there); padding is added later, also with -100.
    An example longer than `max_len` loses prompt tokens from the left first (the
    prompt keeps at least half the window, if it is that long), then completion
    tokens from the right. `completion_bytes` is the UTF-8 size of the completion
    text plus 1 for end-of-text (as pre-training bpb counts it), so
    bpb = sum of completion nats / (ln 2 * bytes); for a cut completion it is the
    bytes of the tokens kept.
    """
    if max_len < 2:
        raise SpecError(f"max_len={max_len}: must be at least 2")
    examples = list(examples)
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    byte_lengths = None
    rows = []
    for example, prompt, completion in zip(examples, prompts, completions):
        completion = completion + [eos]
        prompt_room = min(len(prompt), max(max_len - len(completion), max_len // 2))
        prompt = prompt[len(prompt) - prompt_room:]
        kept = completion[: max_len - len(prompt)]
        if len(kept) == len(completion):
            n_bytes = len(example.completion.encode()) + 1
        else:
            byte_lengths = token_byte_lengths(tokenizer) if byte_lengths is None else byte_lengths
            n_bytes = int(byte_lengths[kept].sum())
        rows.append({"input_ids": prompt + kept, "labels": [-100] * len(prompt) + kept, "completion_bytes": n_bytes})
    return rows


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of the loss.

    No attention mask is needed: with causal attention and padding at the end, no
    real token ever attends to a pad.
    """
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.as_tensor(example["input_ids"])
        labels[row, :n] = torch.as_tensor(example["labels"])
    return {"input_ids": ids, "labels": labels}
