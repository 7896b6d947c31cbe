"""Small Llama-style models from a size dial (`spec.ModelSize`), and the init std of every parameter.

Models are plain `transformers.LlamaForCausalLM`s so every checkpoint is an HF folder
that other tools load as it is.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from overtrain.errors import SpecError
from overtrain.spec import ModelSize


def build_model(size: ModelSize, vocab_size: int, seed: int,
                bos_token_id: int | None = None, eos_token_id: int | None = None,
                pad_token_id: int | None = None) -> LlamaForCausalLM:
    """A freshly initialised model; the same seed gives the same weights."""
    if size.d_model % size.n_heads:
        raise SpecError(f"model.d_model={size.d_model} is not divisible by model.n_heads={size.n_heads}")
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
