"""The default corpus (size, de-duplication, decontamination, cache) and the n-gram index."""

from __future__ import annotations

import random
import shutil

import pytest

from overtrain.data import prose
from overtrain.data.decontaminate import NgramIndex, contamination_index
from overtrain.data.prose import MIN_WORDS, corpus_stats, default_documents
from overtrain.data.tasks import load_task


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return default_documents()  # built once per machine (about a minute), then read from the cache


def test_default_corpus_is_large_deduplicated_prose(corpus):
    stats = corpus_stats()
    assert stats["documents"] == len(corpus)
    assert stats["words"] == sum(len(doc.split()) for doc in corpus) >= 4_000_000
    assert stats["dropped_duplicates"] > 0 and stats["dropped_contaminated"] >= 0
    assert all(len(doc.split()) >= MIN_WORDS for doc in corpus)
    normalized = {" ".join(doc.split()) for doc in corpus}
    assert len(normalized) == len(corpus)
    assert default_documents() == corpus  # same order every time


def test_default_corpus_shares_no_13gram_with_tasks_or_benchmarks(corpus):
    index = contamination_index()
    sample = random.Random(0).sample(corpus, 3000)  # the builder checks them all
    assert not index.overlaps(sample).any()
    # The index does catch a task text pasted into prose, whatever its case and punctuation.
    question = load_task("math").heldout[0].prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
    assert index.overlaps([corpus[0], f"{corpus[0]} {question.upper()}"]).tolist() == [False, True]


def test_ngram_index_needs_thirteen_shared_words_inside_one_text():
    index = NgramIndex(["one two three four five six seven eight nine ten eleven twelve thirteen fourteen"])
    assert len(index) == 2
    texts = [
        "Zero, ONE two three four five six seven eight nine ten eleven twelve thirteen!",
        "one two three four five six seven eight nine ten eleven twelve",
        "four five six seven eight nine ten eleven twelve thirteen fourteen",
        "fifteen",  # with the one above, 13 shared words in a row, but across two texts
    ]
    assert index.overlaps(texts).tolist() == [True, False, False, False]
    assert not NgramIndex([]).overlaps(texts).any()


def test_cached_corpus_is_reused_when_its_checksum_matches_and_rebuilt_when_not(corpus, tmp_path, monkeypatch):
    data_path, manifest_path = prose._corpus_paths()
    monkeypatch.setenv("OVERTRAIN_CACHE", str(tmp_path))
    prose._default_corpus.cache_clear()
    try:
        copy_data, copy_manifest = prose._corpus_paths()
        copy_data.parent.mkdir(parents=True)
        shutil.copy(data_path, copy_data)
        shutil.copy(manifest_path, copy_manifest)
        modified = copy_data.stat().st_mtime_ns
        assert default_documents() == corpus
        assert copy_data.stat().st_mtime_ns == modified  # read, not rebuilt
        with open(copy_data, "ab") as f:
            f.write(b"tampered")
        assert prose._cached_manifest() is None  # a mismatch means: build again
    finally:
        prose._default_corpus.cache_clear()
