"""Tokenizers: a byte-level BPE trained on the training split, or plain bytes.

Both are HF `tokenizers` byte-level models wrapped as `PreTrainedTokenizerFast`, so
they save beside every checkpoint and load with `AutoTokenizer.from_pretrained`.
Every token stands for a fixed byte string, which makes bits-per-byte exact.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from overtrain.errors import SpecError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]
BYTE_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(documents: Iterable[str], vocab_size: int | str) -> PreTrainedTokenizerFast:
    """BPE with `vocab_size` entries, or `vocab_size="bytes"` for a 258-token byte vocabulary."""
    if vocab_size == "bytes":
        vocab_size, documents = BYTE_VOCAB, []  # no merges to learn
    if not isinstance(vocab_size, int) or vocab_size < BYTE_VOCAB:
        raise SpecError(f"tokenizer.vocab_size={vocab_size!r}: must be 'bytes' or an integer >= {BYTE_VOCAB}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def token_byte_lengths(tokenizer: PreTrainedTokenizerFast) -> np.ndarray:
    """UTF-8 bytes each token id stands for; special tokens count 0, end-of-text 1.

    Byte-level BPE (ours, GPT-2, Llama 3, SmolLM) writes each byte as one printable
    character, so a token's byte count is its length in characters. SentencePiece
    vocabularies write a space as "\u2581" and unknown bytes as "<0xNN>".
    """
    vocab = tokenizer.get_vocab()
    byte_level = "ByteLevel" in str(tokenizer.backend_tokenizer.decoder)
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for token, index in vocab.items():
        lengths[index] = len(token) if byte_level else _sentencepiece_bytes(token)
    lengths[tokenizer.all_special_ids] = 0
    if tokenizer.eos_token_id is not None:
        lengths[tokenizer.eos_token_id] = 1  # the document boundary it predicts
    return lengths


def _sentencepiece_bytes(piece: str) -> int:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return 1
    return len(piece.replace("\u2581", " ").encode())
