"""Checkpoints as HF folders plus a manifest, written atomically.

A checkpoint folder holds `config.json`, `model.safetensors`, the tokenizer files and
`overtrain.json` (tokens seen, step, LR at save, schedule, sha256 of the weights), and
for pre-training saves `optimizer.pt`, so a run can resume or branch from it.
It is written to a temporary sibling and renamed, so a folder that exists is whole.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from overtrain.errors import CheckpointError
from overtrain.runtime.faults import fault_point
from overtrain.runtime.hashing import weights_sha256

MANIFEST = "overtrain.json"


OPTIMIZER = "optimizer.pt"


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, manifest: dict,
                    optimizer_state: dict | None = None) -> dict:
    """Write the checkpoint and return its manifest (with `weights_sha256` filled in);
    `optimizer_state`: `torch.optim.AdamW`'s state dict, to resume or branch from."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    manifest = {**manifest, "weights_sha256": weights_sha256(model)}
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if folder.exists():  # an earlier, interrupted attempt at the same checkpoint
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("checkpoint-saved")  # crash tests kill a run here, mid pre-training
    return manifest


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{folder}: no {MANIFEST} (not written by overtrain, or not finished)")
    return json.loads(path.read_text())


def check_checkpoint_folder(folder: Path) -> None:
    """Raise CheckpointError unless `folder` holds an HF config and weights."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise CheckpointError(f"{folder}: no weights (*.safetensors or *.bin)")


def load_checkpoint(folder: Path, device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = Path(folder)
    check_checkpoint_folder(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if len(tokenizer) > model.config.vocab_size:
        raise CheckpointError(
            f"{folder}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}")
    return model, tokenizer


def load_optimizer_state(folder: Path) -> dict:
    path = Path(folder) / OPTIMIZER
    if not path.exists():
        raise CheckpointError(f"{folder}: no {OPTIMIZER} to continue training from")
    return torch.load(path, map_location="cpu", weights_only=True)
