"""Seeded train / held-out splits: by whole document (corpora) or by group (tasks)."""

from __future__ import annotations

import random
from typing import TypeVar

from overtrain.errors import DataError

T = TypeVar("T")


def split_documents(docs: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split by whole document; both halves come out in one shuffled order."""
    if not 0 < heldout_fraction < 1:
        raise DataError(f"heldout_fraction={heldout_fraction}: must be between 0 and 1")
    if len(docs) < 2:
        raise DataError(f"corpus has {len(docs)} document(s): at least 2 are needed to hold one out")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_heldout = min(max(1, round(len(docs) * heldout_fraction)), len(docs) - 1)
    return [docs[i] for i in order[n_heldout:]], [docs[i] for i in order[:n_heldout]]


def split_by_group(examples: list[T], groups: list[str], heldout_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Seeded split in which every group (a normalized question, a passage, a module)
    lands wholly in train or wholly in held-out; each side keeps the original order."""
    unique = sorted(set(groups))
    if len(unique) < 2:
        raise DataError(f"{len(unique)} distinct group(s) (questions, passages or modules): at least 2 are needed to hold one out")
    random.Random(seed).shuffle(unique)
    n_heldout = min(max(1, round(len(unique) * heldout_fraction)), len(unique) - 1)
    heldout_groups = set(unique[:n_heldout])
    train = [e for e, g in zip(examples, groups) if g not in heldout_groups]
    heldout = [e for e, g in zip(examples, groups) if g in heldout_groups]
    return train, heldout
