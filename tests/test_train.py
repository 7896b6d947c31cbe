import math

import torch
from transformers import AutoModelForCausalLM

from overtrain.models.checkpoints import load_checkpoint, read_manifest, save_checkpoint
from overtrain.probes.loss import heldout_metrics
from overtrain.runtime.hashing import state_dict_sha256
from overtrain.train.loop import TrainConfig, train
from overtrain.train.schedules import Schedule


def short_run(model, corpus, lr=3e-3, steps=12, seed=0):
    config = TrainConfig(steps=steps, schedule=Schedule("cosine", lr, steps, 2))
    return train(model, corpus.train_batches(4, 64, seed), config)


def test_training_lowers_heldout_loss(tiny_model, byte_corpus):
    batches = byte_corpus.heldout_batches(8, 64, 4096)
    before = heldout_metrics(tiny_model, batches, byte_corpus.byte_lengths)
    result = short_run(tiny_model, byte_corpus, steps=40)
    after = heldout_metrics(tiny_model, batches, byte_corpus.byte_lengths)
    assert not result.diverged and result.tokens_seen == 40 * 4 * 64
    assert after["loss_nats"] < before["loss_nats"] - 0.5


def test_bits_per_byte_of_a_byte_model_is_loss_over_ln2(tiny_model, byte_corpus):
    metrics = heldout_metrics(tiny_model, byte_corpus.heldout_batches(8, 64, 4096), byte_corpus.byte_lengths)
    assert math.isclose(metrics["bpb"], metrics["loss_nats"] / math.log(2), rel_tol=1e-12)


def test_same_seed_same_weights(byte_corpus):
    from overtrain.models.build import build_model
    from overtrain.spec import ModelSize

    hashes = []
    for _ in range(2):
        model = build_model(ModelSize(d_model=32, n_layers=1, n_heads=2, max_seq_len=64), len(byte_corpus.tokenizer), seed=3)
        short_run(model, byte_corpus, seed=5)
        hashes.append(state_dict_sha256(model.state_dict()))
    assert hashes[0] == hashes[1]


def test_divergence_is_recorded_not_raised(tiny_model, byte_corpus):
    result = short_run(tiny_model, byte_corpus, lr=1e6, steps=50)
    assert result.diverged
    assert 0 < result.diverged_at_step < 50
    assert not math.isfinite(result.last_loss)


def test_checkpoint_round_trip_through_from_pretrained(tiny_model, byte_corpus, tmp_path):
    short_run(tiny_model, byte_corpus)
    manifest = save_checkpoint(tiny_model, byte_corpus.tokenizer, tmp_path / "ckpt", {"tokens": 3072, "step": 12})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left behind
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = byte_corpus.heldout_batches(2, 64, 128)[0]["input_ids"]
    tiny_model.eval()
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, reloaded(ids).logits)
    assert read_manifest(tmp_path / "ckpt")["weights_sha256"] == manifest["weights_sha256"] == state_dict_sha256(reloaded.state_dict())
    model, tokenizer = load_checkpoint(tmp_path / "ckpt")
    assert tokenizer.decode(tokenizer("déjà vu")["input_ids"]) == "déjà vu"
