"""The adaptability monitor in a real HF Trainer run of a tiny Llama: rows in a run folder that
`overtrain report` draws against tokens, the same numbers in every callback's on_log, and
a model (weights, training run) left exactly as it was."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import overtrain
from overtrain.callbacks import AdaptabilityCallback
from overtrain.data.corpus import TokenWindows
from overtrain.errors import DataError, SpecError
from overtrain.monitor import measure

BATCH, SEQ_LEN, STEPS, EVERY = 4, 64, 24, 6



class LogSpy(TrainerCallback):
    """Another callback, as an integration (MLflow, W&B) is: keeps every log it is sent."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({**logs, "step": state.global_step})


def make_trainer(model, corpus, out, callbacks=(), **arguments) -> Trainer:
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH,
                             learning_rate=3e-3, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0, **arguments)
    return Trainer(model=model, args=args, train_dataset=TokenWindows(corpus.train, SEQ_LEN),
                   processing_class=corpus.tokenizer, callbacks=list(callbacks))


@pytest.fixture()
def heldout(python_docs) -> list[str]:
    return python_docs[:8]  # the byte corpus' held-out documents: never trained on


def test_trainer_run_folder_reports_sensitivity_and_bpb_against_tokens(tiny_model, byte_corpus, heldout, tmp_path,
                                                                      capsys):
    trainer = make_trainer(tiny_model, byte_corpus, tmp_path / "trainer")
    trainer.add_callback(AdaptabilityCallback(trainer, tmp_path / "monitor", heldout, every_steps=EVERY,
                                              gammas=[0.5, 4.0], heldout_tokens=1024))
    trainer.train()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("overtrain monitor, step")]
    assert len(printed) == 4 and all(re.search(r"measured in [\d.]+ s, [\d.]+% of the training time", line)
                                     for line in printed), printed

    report = overtrain.report(tmp_path / "monitor")
    tokens = [step * BATCH * SEQ_LEN for step in range(EVERY, STEPS + 1, EVERY)]  # 1536, 3072, 4608, 6144
    base = pd.read_csv(report / "tables" / "base_model.csv")
    assert base["tokens"].tolist() == tokens and base["checkpoint"].tolist() == [f"step-{s}" for s in (6, 12, 18, 24)]
    assert base["bpb"].iloc[-1] < base["bpb"].iloc[0] < 8.1  # it trains; 8 bits per byte is a uniform guess
    sensitivity = pd.read_csv(report / "tables" / "sensitivity_delta_bpb.csv")
    assert sorted(sensitivity["tokens"].unique()) == tokens and sorted(sensitivity["gamma"].unique()) == [0.5, 4.0]
    assert (sensitivity["n"] == 2).all()  # two noise seeds behind each point
    large = sensitivity[sensitivity["gamma"] == 4.0].set_index("tokens")["mean"]
    small = sensitivity[sensitivity["gamma"] == 0.5].set_index("tokens")["mean"]
    assert (large > small).all() and (large > 0).all()  # more noise hurts more
    assert len(pd.read_csv(report / "tables" / "sharpness_kl_sharpness.csv")) == len(tokens)
    for figure in ("base_bpb", "sensitivity_delta_bpb", "sensitivity_perturbed_bpb", "sharpness_kl_sharpness"):
        assert (report / f"{figure}.png").stat().st_size > 10_000, figure
    page = (report / "summary.md").read_text()
    assert "tokens seen: steps x 4 sequences x 64 tokens, the length of the first training example" in page
    assert "A training run measured as it trained" in page and "the iterates of one monitored run" in page
    assert "monitored: " in page and "at 6.14k tokens" in page


def test_the_numbers_reach_another_callbacks_on_log(tiny_model, byte_corpus, heldout, tmp_path):
    spy = LogSpy()
    trainer = make_trainer(tiny_model, byte_corpus, tmp_path / "trainer", callbacks=[spy],
                           include_num_input_tokens_seen=True)
    trainer.add_callback(AdaptabilityCallback(trainer, tmp_path / "monitor", heldout, every_steps=EVERY,
                                              heldout_tokens=512))
    trainer.train()

    logged = [log for log in spy.logs if "overtrain/bpb" in log]
    assert [log["step"] for log in logged] == [6, 12, 18, 24]
    # the trainer counted the tokens itself: they are its count, which the rule names
    assert [log["overtrain/tokens"] for log in logged] == [s * BATCH * SEQ_LEN for s in (6, 12, 18, 24)]
    assert all(0 < log["overtrain/seconds"] and 0 < log["overtrain/share_of_training"] for log in logged)
    rows = overtrain.load_results(tmp_path / "monitor")
    for log in logged:
        at = rows[rows["step"] == log["step"]]
        assert log["overtrain/bpb"] == at.loc[at["metric"] == "bpb", "value"].item()
        assert log["overtrain/kl_sharpness_gamma0.5"] == at.loc[at["metric"] == "kl_sharpness", "value"].item()
        for gamma in (0.5, 1.0):
            rises = at[(at["metric"] == "delta_bpb") & (at["gamma"] == gamma)]["value"]
            assert log[f"overtrain/delta_bpb_gamma{gamma:g}"] == pytest.approx(rises.mean(), rel=1e-12)
    assert logged[0] in trainer.state.log_history  # where trainer_state.json keeps it
    assert "num_input_tokens_seen" in (tmp_path / "monitor" / "monitor.json").read_text()


def test_a_measurement_leaves_weights_mode_and_random_state_exactly_as_they_were(tiny_model, byte_corpus, heldout,
                                                                                 tmp_path):
    tiny_model.train()
    weights = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    random_state = torch.get_rng_state()
    found = measure(tiny_model, byte_corpus.tokenizer, heldout, gammas=[1.0, 30.0], heldout_tokens=512,
                    run_dir=tmp_path / "run", step=0, tokens=0)
    assert found["delta_bpb_gamma30"] > found["delta_bpb_gamma1"] and found["seconds"] > 0
    assert tiny_model.training and torch.equal(torch.get_rng_state(), random_state)
    for name, param in tiny_model.named_parameters():
        assert torch.equal(param, weights[name]), name


def test_training_with_the_monitor_ends_on_the_same_weights_as_without(byte_corpus, heldout, tmp_path):
    from overtrain.models.build import build_model
    from overtrain.spec import ModelSize

    finals = []
    for monitored in (False, True):
        model = build_model(ModelSize(d_model=32, n_layers=2, n_heads=2, max_seq_len=64), len(byte_corpus.tokenizer),
                            seed=0, eos_token_id=byte_corpus.tokenizer.eos_token_id,
                            pad_token_id=byte_corpus.tokenizer.pad_token_id)
        trainer = make_trainer(model, byte_corpus, tmp_path / f"trainer{monitored}")
        if monitored:
            trainer.add_callback(AdaptabilityCallback(trainer, tmp_path / "monitor", heldout, every_steps=EVERY,
                                                      heldout_tokens=256))
        trainer.train()
        finals.append({name: p.detach().clone() for name, p in model.named_parameters()})
    assert all(torch.equal(finals[0][name], finals[1][name]) for name in finals[0])


def test_bad_inputs_are_named_in_one_line(tiny_model, byte_corpus, heldout, tmp_path):
    with pytest.raises(DataError, match="heldout: 1 texts give fewer than one window of 64 tokens"):
        measure(tiny_model, byte_corpus.tokenizer, ["too short"])
    with pytest.raises(DataError, match="heldout: expected a non-empty list of texts"):
        measure(tiny_model, byte_corpus.tokenizer, "one string, not a list of texts")
    with pytest.raises(SpecError, match="give tokens="):
        measure(tiny_model, byte_corpus.tokenizer, heldout, run_dir=tmp_path / "run", step=3)
    trainer = make_trainer(tiny_model, byte_corpus, tmp_path / "trainer")
    with pytest.raises(SpecError, match="every_steps=0: must be at least 1"):
        AdaptabilityCallback(trainer, tmp_path / "monitor", heldout, every_steps=0)
    trainer.train_dataset = [{"text": "no input ids"}]
    with pytest.raises(SpecError, match="cannot tell the tokens per step.*pass tokens_per_step="):
        AdaptabilityCallback(trainer, tmp_path / "monitor", heldout)
