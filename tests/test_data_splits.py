"""Seeded splits: by whole document (corpora) and by group (tasks)."""

from __future__ import annotations

import pytest

from overtrain.data.splits import split_by_group, split_documents
from overtrain.errors import DataError


def test_split_by_document_is_seeded_and_disjoint():
    docs = [f"document number {i}" for i in range(100)]
    train, heldout = split_documents(docs, 0.1, seed=3)
    assert len(heldout) == 10 and sorted(train + heldout) == sorted(docs)
    assert split_documents(docs, 0.1, seed=3) == (train, heldout)
    assert split_documents(docs, 0.1, seed=4) != (train, heldout)
    with pytest.raises(DataError, match="heldout_fraction"):
        split_documents(docs, 1.0, seed=0)


def test_split_by_group_keeps_each_group_on_one_side():
    examples = [f"example{i}" for i in range(60)]
    groups = [f"module{i % 12}" for i in range(60)]
    train, heldout = split_by_group(examples, groups, 0.25, seed=0)
    group_of = dict(zip(examples, groups))
    assert not {group_of[e] for e in train} & {group_of[e] for e in heldout}
    assert len({group_of[e] for e in heldout}) == 3
    assert train == [e for e in examples if e in train]  # each side keeps the original order
