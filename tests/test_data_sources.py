"""The default corpus (size, de-duplication, decontamination, cache) and user corpus loaders."""

from __future__ import annotations

import json
import random
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from overtrain.data import sources
from overtrain.data.sources import (
    MIN_WORDS, NgramIndex, contamination_index, corpus_stats, default_documents, load_documents, split_documents,
)
from overtrain.data.tasks import load_task
from overtrain.errors import DataError


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
    data_path, manifest_path = sources._corpus_paths()
    monkeypatch.setenv("OVERTRAIN_CACHE", str(tmp_path))
    sources._default_corpus.cache_clear()
    try:
        copy_data, copy_manifest = sources._corpus_paths()
        copy_data.parent.mkdir(parents=True)
        shutil.copy(data_path, copy_data)
        shutil.copy(manifest_path, copy_manifest)
        modified = copy_data.stat().st_mtime_ns
        assert default_documents() == corpus
        assert copy_data.stat().st_mtime_ns == modified  # read, not rebuilt
        with open(copy_data, "ab") as f:
            f.write(b"tampered")
        assert sources._cached_manifest() is None  # a mismatch means: build again
    finally:
        sources._default_corpus.cache_clear()


def test_split_by_document_is_seeded_and_disjoint():
    docs = [f"document number {i}" for i in range(100)]
    train, heldout = split_documents(docs, 0.1, seed=3)
    assert len(heldout) == 10 and sorted(train + heldout) == sorted(docs)
    assert split_documents(docs, 0.1, seed=3) == (train, heldout)
    assert split_documents(docs, 0.1, seed=4) != (train, heldout)
    with pytest.raises(DataError, match="heldout_fraction"):
        split_documents(docs, 1.0, seed=0)


# -- user corpora ---------------------------------------------------------------------

def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First document,\nstill the first.\n\n  \nSecond document.\n\n\nThird.\n")
    assert load_documents(str(path)) == ["First document,\nstill the first.", "Second document.", "Third."]


def test_jsonl_documents_and_errors_name_file_and_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "alpha"}\n\n{"body": "beta", "text": "gamma"}\n')
    assert load_documents(str(path)) == ["alpha", "gamma"]
    path.write_text('{"body": "beta"}\n')
    assert load_documents(str(path), text_field="body") == ["beta"]
    path.write_text('{"text": "alpha"}\n{"text": "beta"}\n{"text": "unterminated\n')
    with pytest.raises(DataError, match=r"corpus\.jsonl: line 3: malformed JSON"):
        load_documents(str(path))
    path.write_text('{"text": "alpha"}\n{"body": "beta"}\n')
    with pytest.raises(DataError, match=r"corpus\.jsonl: line 2: missing field 'text'"):
        load_documents(str(path))


def test_parquet_documents(tmp_path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": ["one", "two", None], "id": [1, 2, 3]}), path)
    assert load_documents(str(path)) == ["one", "two"]
    with pytest.raises(DataError, match="no column 'body'"):
        load_documents(str(path), text_field="body")


def _save_to_disk_layout(folder, texts):
    """What `datasets.Dataset.save_to_disk` writes: Arrow stream files listed in state.json."""
    folder.mkdir(parents=True)
    table = pa.table({"text": texts})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text("{}")


def test_saved_dataset_folders(tmp_path):
    _save_to_disk_layout(tmp_path / "single", ["a saved document", "another"])
    assert load_documents(str(tmp_path / "single")) == ["a saved document", "another"]
    _save_to_disk_layout(tmp_path / "dict" / "train", ["train text"])
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert load_documents(str(tmp_path / "dict")) == ["train text"]
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a datasets.save_to_disk folder"):
        load_documents(str(tmp_path / "plain"))


def test_loader_errors_are_one_line_and_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        load_documents(str(tmp_path / "missing.jsonl"))
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(DataError, match=r"blank\.txt: empty corpus"):
        load_documents(str(tmp_path / "blank.txt"))
    (tmp_path / "table.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match=r"table\.csv: unsupported corpus file type"):
        load_documents(str(tmp_path / "table.csv"))


def test_hub_name_without_datasets_package_explains_what_to_install():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pip install datasets"):
            load_documents("someone/some-corpus:train")
    else:
        pytest.skip("datasets is installed: loading a hub name would go to the network")
