"""Where tensors live and in which precision.

CPU runs in float32. CUDA runs the forward pass under bf16 autocast (fp16 where bf16
is not supported) while weights and optimizer state stay float32.
"""

from __future__ import annotations

import contextlib

import torch

from overtrain.errors import SpecError


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"device={requested!r}: CUDA is not available on this machine")
    return torch.device(requested)


def autocast(device: torch.device):
    """Mixed-precision context for forward passes on `device` (a no-op on CPU)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)
