"""Token streams on disk, batches from them, and the bytes behind every token.

Documents are encoded once, each followed by the end-of-text token, and stored as
one flat array per split (memory-mapped .npy). Training batches are random windows
(seeded); held-out batches are the first consecutive windows, the same every time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from overtrain.data.packages import cache_dir
from overtrain.data.prose import default_documents
from overtrain.data.splits import split_documents
from overtrain.data.tokenizer import token_byte_lengths, train_tokenizer
from overtrain.errors import DataError

# Tokenizer training reads at most this much text: BPE merges settle long before.
TOKENIZER_TRAIN_CHARS = 8_000_000


@dataclass
class PreparedCorpus:
    """A tokenizer and the train / held-out token streams it produced."""

    folder: Path
    tokenizer: PreTrainedTokenizerFast
    train: np.ndarray
    heldout: np.ndarray

    @cached_property
    def byte_lengths(self) -> np.ndarray:
        # Read on every evaluation; walking a large vocabulary each time would add up.
        return token_byte_lengths(self.tokenizer)

    def train_batches(self, batch_size: int, seq_len: int, seed: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless random windows of the training stream, from batch `start_step` on.

        The same seed gives the same stream of batches, so a run that resumes or
        branches at step s sees exactly what an uninterrupted run sees after s steps.
        """
        if len(self.train) <= seq_len + 1:
            raise DataError(f"{self.folder}: training stream has {len(self.train)} tokens, fewer than one window of {seq_len}")
        rng = np.random.default_rng(seed)
        for _ in range(start_step):
            rng.integers(0, len(self.train) - seq_len, size=batch_size)
        while True:
            starts = rng.integers(0, len(self.train) - seq_len, size=batch_size)
            windows = np.stack([self.train[s:s + seq_len] for s in starts]).astype(np.int64)
            ids = torch.from_numpy(windows)
            yield {"input_ids": ids, "labels": ids}

    def heldout_batches(self, batch_size: int, seq_len: int, max_tokens: int) -> list[dict[str, torch.Tensor]]:
        """Consecutive windows from the start of the held-out stream, at most `max_tokens`."""
        n_windows = min(max_tokens, len(self.heldout)) // seq_len
        if n_windows == 0:
            raise DataError(f"{self.folder}: held-out stream has {len(self.heldout)} tokens, fewer than one window of {seq_len}")
        windows = torch.from_numpy(self.heldout[: n_windows * seq_len].astype(np.int64)).view(n_windows, seq_len)
        return [{"input_ids": w, "labels": w} for w in windows.split(batch_size)]


class TokenWindows(torch.utils.data.Dataset):
    """Consecutive windows of a token stream as a map-style dataset (input ids and labels),
    for training loops that take one, such as the Hugging Face `Trainer`."""

    def __init__(self, stream: np.ndarray, seq_len: int):
        self.stream, self.seq_len = stream, seq_len

    def __len__(self) -> int:
        return len(self.stream) // self.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.stream[index * self.seq_len:(index + 1) * self.seq_len].astype(np.int64))
        return {"input_ids": ids, "labels": ids}


def prepare_corpus(train_docs: list[str], heldout_docs: list[str], vocab_size: int | str,
                   tokenizer: PreTrainedTokenizerFast | None = None) -> PreparedCorpus:
    """Train the tokenizer (or take `tokenizer`: checkpoints that are not ours bring their own)
    and encode both splits, cached by content under the user cache."""
    vocabulary = vocab_size if tokenizer is None else f"given:{_tokenizer_fingerprint(tokenizer)}"
    key = _content_key(train_docs, heldout_docs, vocabulary)
    folder = cache_dir() / "prepared" / key
    if not (folder / "done.json").exists():
        _build(folder, train_docs, heldout_docs, vocab_size, tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    return PreparedCorpus(
        folder=folder,
        tokenizer=tokenizer,
        train=np.load(folder / "train.npy", mmap_mode="r"),
        heldout=np.load(folder / "heldout.npy", mmap_mode="r"),
    )


def default_heldout_batches(tokenizer, tokens: int, seq_len: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The first `tokens` of the default corpus' held-out documents, in any model's tokenizer:
    the same text for every model, so their bits-per-byte compare."""
    _, heldout = split_documents(default_documents(), 0.02, seed)
    return text_batches(heldout[:200], tokenizer, tokens, seq_len, batch_size)


def text_batches(documents: list[str], tokenizer, tokens: int, seq_len: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The first `tokens` of `documents` (each followed by end-of-text) as consecutive windows of
    `seq_len`, `batch_size` windows a batch; only as many documents are encoded as that needs."""
    pieces, encoded = [], 0
    for start in range(0, len(documents), 64):
        if encoded >= tokens:
            break
        pieces.append(encode_documents(documents[start:start + 64], tokenizer))
        encoded += len(pieces[-1])
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n_windows = min(tokens, len(stream)) // seq_len
    if n_windows == 0:
        return []  # (splitting an empty tensor would give one empty batch)
    windows = torch.from_numpy(stream[: n_windows * seq_len].astype(np.int64)).view(n_windows, seq_len)
    return [{"input_ids": w, "labels": w} for w in windows.split(batch_size)]


def encode_documents(documents: list[str], tokenizer: PreTrainedTokenizerFast) -> np.ndarray:
    """One flat stream: each document's tokens followed by end-of-text."""
    eos = tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    pieces = []
    for start in range(0, len(documents), 4096):
        for ids in tokenizer(documents[start:start + 4096], add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids + [eos], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _build(folder: Path, train_docs: list[str], heldout_docs: list[str], vocab_size: int | str,
           tokenizer: PreTrainedTokenizerFast | None) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    tokenizer = tokenizer or train_tokenizer(_text_prefix(train_docs, TOKENIZER_TRAIN_CHARS), vocab_size)
    tokenizer.save_pretrained(tmp / "tokenizer")
    train, heldout = encode_documents(train_docs, tokenizer), encode_documents(heldout_docs, tokenizer)
    np.save(tmp / "train.npy", train)
    np.save(tmp / "heldout.npy", heldout)
    (tmp / "done.json").write_text(json.dumps({
        "vocab_size": len(tokenizer), "train_tokens": int(len(train)), "heldout_tokens": int(len(heldout)),
        "train_documents": len(train_docs), "heldout_documents": len(heldout_docs),
    }))
    if folder.exists():  # a concurrent builder finished first; keep its result
        shutil.rmtree(tmp)
    else:
        tmp.rename(folder)


def _text_prefix(documents: list[str], max_chars: int) -> Iterator[str]:
    used = 0
    for doc in documents:
        if used >= max_chars:
            return
        used += len(doc)
        yield doc


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """The tokenizer's whole definition (vocabulary, merges, normalizer) and its special tokens."""
    definition = tokenizer.backend_tokenizer.to_str() + json.dumps(tokenizer.special_tokens_map, sort_keys=True)
    return hashlib.sha256(definition.encode()).hexdigest()[:16]


def _content_key(train_docs: list[str], heldout_docs: list[str], vocab_size: int | str) -> str:
    digest = hashlib.sha256(f"v1|{vocab_size}|{TOKENIZER_TRAIN_CHARS}|".encode())
    for split in (train_docs, heldout_docs):
        digest.update(f"{len(split)}|".encode())
        for doc in split:
            digest.update(doc.encode())
            digest.update(b"\x00")
    return digest.hexdigest()[:20]
