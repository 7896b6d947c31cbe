"""Shared fixtures: real text that every Python ships, and tiny models trained on it."""

from __future__ import annotations

import pytest
import torch

# Two cores are shared by the whole suite: one thread per test process is fastest.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def python_docs() -> list[str]:
    """The Python reference's topic pages (real English prose, ~65k words, offline)."""
    from pydoc_data.topics import topics

    return [text for _, text in sorted(topics.items())]


@pytest.fixture(scope="session")
def byte_corpus(python_docs):
    from overtrain.data.corpus import prepare_corpus

    return prepare_corpus(python_docs[8:], python_docs[:8], "bytes")


@pytest.fixture()
def tiny_model(byte_corpus):
    from overtrain.models.build import build_model
    from overtrain.spec import ModelSize

    size = ModelSize(d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    return build_model(size, len(byte_corpus.tokenizer), seed=0, eos_token_id=byte_corpus.tokenizer.eos_token_id,
                       pad_token_id=byte_corpus.tokenizer.pad_token_id)
