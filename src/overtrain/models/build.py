"""Small Llama-style models from a size dial, and the init std of every parameter.

Models are plain `transformers.LlamaForCausalLM`s so every checkpoint is an HF folder
that other tools load as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel


@dataclass(frozen=True)
class ModelSize:
    """Width and depth of a Llama-style decoder."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_mult: float = 8 / 3  # SwiGLU hidden = ffn_mult * d_model, as in Llama
    max_seq_len: int = 256
    init_std: float = 0.02

    @property
    def ffn_dim(self) -> int:
        # Round up to a multiple of 16: keeps matmuls aligned without changing the idea.
        return int(-(-self.ffn_mult * self.d_model // 16) * 16)


# Named points on the size dial (parameter counts are for a 4k vocabulary).
PRESETS: dict[str, ModelSize] = {
    "nano": ModelSize(d_model=32, n_layers=2, n_heads=2, max_seq_len=128),
    "tiny": ModelSize(d_model=64, n_layers=2, n_heads=4),
    "small": ModelSize(d_model=128, n_layers=4, n_heads=4),
    "base": ModelSize(d_model=256, n_layers=6, n_heads=8, max_seq_len=512),
    # ~48k parameters on a byte vocabulary: trains at ~80k tokens/s on one CPU core, so
    # budgets of thousands of tokens per parameter fit in minutes (examples/paper.yaml).
    "paper": ModelSize(d_model=32, n_layers=3, n_heads=2, max_seq_len=256),
}


def build_model(size: ModelSize, vocab_size: int, seed: int,
                bos_token_id: int | None = None, eos_token_id: int | None = None,
                pad_token_id: int | None = None) -> LlamaForCausalLM:
    """A freshly initialised model; the same seed gives the same weights."""
    if size.d_model % size.n_heads:
        raise ValueError(f"model.d_model={size.d_model} is not divisible by model.n_heads={size.n_heads}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.d_model,
        intermediate_size=size.ffn_dim,
        num_hidden_layers=size.n_layers,
        num_attention_heads=size.n_heads,
        num_key_value_heads=size.n_heads,
        max_position_embeddings=size.max_seq_len,
        initializer_range=size.init_std,
        tie_word_embeddings=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_stds(model: PreTrainedModel) -> dict[str, float]:
    """Std of each parameter's initialisation distribution, by parameter name.

    HF decoders draw every matrix (embeddings, projections) from N(0, initializer_range)
    and set norm gains and biases to constants, which get 0: the paper's Gaussian
    perturbation adds no noise to tensors that were initialised to a constant.
    """
    std = float(getattr(model.config, "initializer_range", 0.02))
    return {name: (std if p.ndim >= 2 else 0.0) for name, p in model.named_parameters()}
