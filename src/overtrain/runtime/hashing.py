"""Content hashes that identify a model by its weights, never by its name."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in sorted-name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """The content hash of a model's weights (and buffers): key for cached evaluations."""
    return state_dict_sha256(model.state_dict())
