"""User corpora: .txt, .jsonl, .parquet, save_to_disk folders, hub names, and their one-line errors."""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from overtrain.data.files import load_documents
from overtrain.errors import DataError


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


def test_txt_with_windows_line_ends_splits_as_with_unix_ones(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"First,\r\nstill first.\r\n\r\nSecond.\r\n")
    assert load_documents(str(path)) == ["First,\nstill first.", "Second."]


@pytest.mark.parametrize("name, lines", [
    ("corpus.txt", [b"fine", b"", "caf\u00e9 ok".encode(), b"caf\x8c bad"]),
    ("corpus.jsonl", [b'{"text": "fine"}', b"", b'{"text": "ok"}', b'{"text": "caf\x8c"}']),
])
def test_text_that_is_not_utf8_names_file_line_and_column(tmp_path, name, lines):
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    column = lines[3].index(b"\x8c") + 1
    with pytest.raises(DataError) as caught:
        load_documents(str(path))
    assert str(caught.value) == f"{path}: line 4 is not UTF-8 (byte 0x8c at column {column})"


def test_column_of_a_bad_byte_counts_characters_before_it(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes("\u00e9t\u00e9 ".encode() + b"\xff")  # two 2-byte characters before the bad byte
    with pytest.raises(DataError, match=r"line 1 is not UTF-8 \(byte 0xff at column 5\)"):
        load_documents(str(path))


def test_parquet_documents(tmp_path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": ["one", "two", None], "id": [1, 2, 3]}), path)
    assert load_documents(str(path)) == ["one", "two"]
    with pytest.raises(DataError, match="no column 'body'"):
        load_documents(str(path), text_field="body")


@pytest.mark.parametrize("with_datasets", [True, False], ids=["datasets", "arrow-only"])
def test_saved_dataset_folders(tmp_path, monkeypatch, with_datasets):
    datasets = pytest.importorskip("datasets")  # the `hub` extra, installed by the test extra
    datasets.Dataset.from_dict({"text": ["a saved document", "another"]}).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["train text"]}),
                          "test": datasets.Dataset.from_dict({"text": ["test text"]})}).save_to_disk(str(tmp_path / "dict"))
    if not with_datasets:  # the reader without the package: the Arrow files state.json lists
        monkeypatch.setitem(sys.modules, "datasets", None)
    assert load_documents(str(tmp_path / "single")) == ["a saved document", "another"]
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


def test_hub_name_without_datasets_package_explains_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as where the package is not installed
    with pytest.raises(DataError, match="pip install datasets"):
        load_documents("someone/some-corpus:train")
