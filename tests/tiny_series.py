"""Tiny HF models saved as checkpoint series: plain folders, or the cache layout the hub client reads offline."""

from __future__ import annotations

from overtrain.models.build import build_model
from overtrain.spec import ModelSize


def save_tiny(folder, seed, tokenizer):
    model = build_model(ModelSize(d_model=16, n_layers=1, n_heads=2, max_seq_len=32), len(tokenizer), seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_hub_cache(root, repo_id, revisions_to_seed, tokenizer):
    """The layout huggingface_hub reads offline: refs/<revision> -> snapshots/<commit>/.

    Revisions given the same seed hold identical weights (a duplicated revision)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    for index, (revision, seed) in enumerate(revisions_to_seed.items()):
        commit = f"{index:040x}"
        save_tiny(repo / "snapshots" / commit, seed, tokenizer)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
