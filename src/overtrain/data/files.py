"""A user's corpus, read from a file, a folder or the hub into a list of documents.

Every problem with the input is a `DataError` of one line naming the file (and the
line, where there is one). The default corpus is not read here: see prose.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from overtrain.errors import DataError


def load_documents(source: str, text_field: str = "text") -> list[str]:
    """Documents from a local file or folder, or a hub dataset name.

    - `.txt`: documents are separated by one or more blank lines;
    - `.jsonl`: one JSON object per line, the document in `text_field`;
    - `.parquet`: the column `text_field`;
    - a folder written by `datasets.save_to_disk` (a DatasetDict uses its "train" split);
    - anything else that is not a local path: a hub dataset, "hf:NAME" or "hf:NAME:SPLIT"
      (split "train" by default), loaded with `datasets.load_dataset`.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        documents = _column(read_saved_dataset(path), text_field, path)
    elif path.suffix in _FILE_READERS:
        if not path.exists():
            raise DataError(f"{path}: file not found")
        documents = _FILE_READERS[path.suffix](path, text_field)
    elif path.exists():
        raise DataError(f"{path}: unsupported corpus file type {path.suffix!r} (use .txt, .jsonl, .parquet or a save_to_disk folder)")
    else:
        documents = _read_hub_dataset(source, text_field)
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise DataError(f"{source}: empty corpus (no non-blank documents)")
    return documents


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file with its line ends made "\\n", or a DataError naming the
    line and column of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        column = len(data[line_start:err.start].decode("utf-8")) + 1  # in characters, as an editor counts
        raise DataError(f"{path}: line {line} is not UTF-8 (byte 0x{data[err.start]:02x} at column {column})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def jsonl_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of each non-blank line of a UTF-8 JSON-lines file."""
    return [(number, line) for number, line in enumerate(read_utf8(path).split("\n"), start=1) if line.strip()]


def jsonl_field(path: Path, number: int, line: str, field: str) -> str:
    """The string `field` of one JSON line, or a DataError naming the file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {number}: malformed JSON ({err.msg})") from None
    if not isinstance(record, dict) or field not in record:
        raise DataError(f"{path}: line {number}: missing field {field!r}")
    if not isinstance(record[field], str):
        raise DataError(f"{path}: line {number}: field {field!r} is {type(record[field]).__name__}, not a string")
    return record[field]


def _read_txt(path: Path, text_field: str) -> list[str]:
    return [doc.strip() for doc in re.split(r"\n[ \t]*\n", read_utf8(path))]


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    return [jsonl_field(path, number, line, text_field) for number, line in jsonl_lines(path)]


def _read_parquet(path: Path, text_field: str) -> list[str]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    return _column(table, text_field, path)


_FILE_READERS: dict[str, Callable[[Path, str], list[str]]] = {
    ".txt": _read_txt,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}


def read_saved_dataset(folder: Path) -> pa.Table:
    """A `datasets.save_to_disk` folder as one Arrow table.

    Uses `datasets.load_from_disk` when the package is installed; otherwise reads the
    Arrow stream files that the folder's state.json lists, which is all that format is.
    """
    if (folder / "dataset_dict.json").exists():  # a DatasetDict: one sub-folder per split
        if not (folder / "train").is_dir():
            splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
            raise DataError(f"{folder}: DatasetDict has no 'train' split (splits: {', '.join(splits)}); pass a split's folder")
        folder = folder / "train"
    if not (folder / "state.json").exists():
        raise DataError(f"{folder}: folder is not a datasets.save_to_disk folder (no state.json)")
    try:
        import datasets
    except ImportError:
        state = json.loads((folder / "state.json").read_text())
        tables = [pa.ipc.open_stream(folder / f["filename"]).read_all() for f in state["_data_files"]]
        return pa.concat_tables(tables)
    return datasets.load_from_disk(str(folder)).data.table


def _read_hub_dataset(source: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: no such file or folder (to load it as a hub dataset, `pip install datasets`)") from None
    name, _, split = source.removeprefix("hf:").partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # the hub client raises many types; all mean "could not load"
        first_line = next(iter(str(err).splitlines()), "")
        raise DataError(f"{source}: could not load hub dataset ({type(err).__name__}: {first_line})") from None
    return _column(dataset.data.table, text_field, source)


def _column(table: pa.Table, text_field: str, where: object) -> list[str]:
    if text_field not in table.column_names:
        raise DataError(f"{where}: no column {text_field!r} (columns: {', '.join(table.column_names)})")
    values = table.column(text_field).to_pylist()
    if any(value is not None and not isinstance(value, str) for value in values):
        raise DataError(f"{where}: column {text_field!r} does not hold text")
    return [value for value in values if value]
