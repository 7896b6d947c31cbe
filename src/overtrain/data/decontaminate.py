"""Decontamination: which texts share a word 13-gram with what the study tunes or scores on."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from overtrain.data.benchmarks import BENCHMARKS, load_benchmark
from overtrain.data.tasks import BUILTIN_TASKS, load_task

NGRAM = 13


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
