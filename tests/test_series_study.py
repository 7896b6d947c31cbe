"""A study of checkpoints that are not ours: a hub-style series of tiny models saved here (one
revision a copy of another), read offline, probed and fine-tuned through a real tiny study."""

from __future__ import annotations

import json

import pytest
import yaml
from tiny_series import build_hub_cache, save_tiny
from tiny_study import write_inputs
from transformers import AutoTokenizer
from typer.testing import CliRunner

import overtrain
from overtrain.cli import app
from overtrain.data.tokenizer import train_tokenizer

REVISIONS = {"step100": 0, "step200": 1, "step300": 1}  # step300 re-uploads step200's weights


@pytest.fixture()
def their_tokenizer(python_docs):
    """A 300-token BPE that no study here would train: a study that used its own tokenizer would fail."""
    return train_tokenizer(python_docs[:40], 300)


@pytest.fixture()
def inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def series_study(folder, checkpoints: dict, **sections) -> dict:
    corpus, task = write_inputs(folder)
    return {"name": "series", "data": {"corpus": str(corpus)}, "checkpoints": {"seq_len": 32, **checkpoints},
            "eval": {"heldout_tokens": 512}, "sensitivity": {"gammas": [1.0], "seeds": [0]},
            "finetune": {"tasks": [task.name], "lrs": [1e-3, 1e-2], "steps": 2, "batch_size": 4, "seq_len": 32,
                         "eval_every": 1, "eval_examples": 4, "accuracy_examples": 0},
            **sections}


def test_hub_series_through_a_study_flags_the_duplicate_and_measures_it_once(inputs, their_tokenizer):
    build_hub_cache(inputs / "hub", "org/tiny", REVISIONS, their_tokenizer)
    study = series_study(inputs, {"hub": "org/tiny", "revisions": ["step300", "step100", "step200"],
                                  "cache_dir": str(inputs / "hub"), "tokens_per_step": 2_097_152},
                         sharpness={"tokens": 64, "trace_hvps": 2, "kl_seeds": [0], "along_update": False})
    run_dir = overtrain.run(study, inputs / "run", workers=0)
    frame = overtrain.load_results(run_dir)

    imported = frame[frame["kind"] == "import"].set_index("checkpoint")
    assert list(imported.sort_values("tokens").index) == ["tiny@step100", "tiny@step200", "tiny@step300"]
    assert imported["tokens"].to_dict() == {f"tiny@step{n}": n * 2_097_152 for n in (100, 200, 300)}
    assert imported["weights"].str.len().eq(16).all()
    assert imported.loc["tiny@step300", "weights"] == imported.loc["tiny@step200", "weights"]
    assert imported.loc["tiny@step100", "weights"] != imported.loc["tiny@step200", "weights"]
    assert imported["duplicate_of"].fillna("-").to_dict() == {"tiny@step100": "-", "tiny@step200": "-",
                                                               "tiny@step300": "tiny@step200"}
    assert f"org/tiny@step300 (commit {2:040x})" == imported.loc["tiny@step300", "source"]

    # The duplicate is measured once, as step200: no probe or fine-tune of its own.
    studied = {"tiny@step100", "tiny@step200"}
    probes = frame[frame["kind"] == "probe"]
    assert set(probes["checkpoint"]) == studied
    assert set(probes.query("metric == 'hessian_top_eig'")["checkpoint"]) == studied
    assert probes.query("metric == 'delta_bpb'")["value"].abs().gt(0).all()  # noise changed each (untrained) model
    finals = frame[(frame["kind"] == "finetune") & (frame["metric"] == "ood_bpb") & (frame["step"] == 2)]
    assert sorted(map(tuple, finals[["checkpoint", "lr"]].values)) == [
        (c, lr) for c in sorted(studied) for lr in (1e-3, 1e-2)]
    weights_in_probes = probes.groupby("checkpoint")["weights"].first()
    assert weights_in_probes["tiny@step200"] == imported.loc["tiny@step200", "weights"]

    # The tokenizer is theirs: copied with every checkpoint and used for the held-out text.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted(studied)
    copied = AutoTokenizer.from_pretrained(run_dir / "checkpoints" / "tiny@step100")
    assert copied.get_vocab() == their_tokenizer.get_vocab()
    manifest = json.loads((run_dir / "checkpoints" / "tiny@step200" / "overtrain.json").read_text())
    assert manifest["weights_sha256"].startswith(imported.loc["tiny@step200", "weights"])

    summary = (run_dir / "report" / "summary.md").read_text()
    lead = summary.split("## ")[1]
    assert "Duplicate weights: tiny@step300" in lead and "weights of tiny@step200" in lead
    assert "Table `checkpoints`" in summary


def test_local_folders_with_tokens_given(inputs, their_tokenizer):
    for name, seed in (("early", 0), ("late", 1)):
        save_tiny(inputs / "ckpts" / name, seed, their_tokenizer)
    study = series_study(inputs, {"folders": str(inputs / "ckpts" / "*"), "tokens": {"early": 1000, "late": 5000}},
                         finetune=None, sensitivity=None)
    frame = overtrain.load_results(overtrain.run(study, inputs / "run", workers=0))
    base = frame.query("kind == 'probe' and metric == 'bpb'")
    assert dict(zip(base["checkpoint"], base["tokens"])) == {"early": 1000, "late": 5000}
    assert frame.query("kind == 'import'")["duplicate_of"].isna().all()


def run_cli(study: dict, folder):
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return CliRunner().invoke(app, ["run", str(path), "--out", str(folder / "run"), "--workers", "0"])


def assert_refused(result, folder, *expected: str):
    """Exit 2, the error in one line (after the load progress of the checkpoints read so far), nothing written."""
    message = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and message.startswith("error: "), result.output
    assert all(part in message for part in expected), message
    assert not (folder / "run").exists()


def test_unknown_tokens_are_named(inputs, their_tokenizer):
    # A DeepSpeed-style step folder: a step of unknown size, not a Pythia step (which would make up 40.9B tokens).
    save_tiny(inputs / "ckpts" / "global_step19500", 0, their_tokenizer)
    result = run_cli(series_study(inputs, {"folders": [str(inputs / "ckpts" / "global_step19500")]}), inputs)
    assert_refused(result, inputs, "checkpoints: global_step19500: pre-training tokens unknown",
                   "checkpoints.tokens (global_step19500: N), or checkpoints.tokens_per_step (its step: 19500)")


def test_a_series_needs_one_tokenizer(inputs, their_tokenizer, byte_corpus):
    save_tiny(inputs / "ckpts" / "step1", 0, their_tokenizer)
    save_tiny(inputs / "ckpts" / "step2", 0, byte_corpus.tokenizer)
    result = run_cli(series_study(inputs, {"folders": str(inputs / "ckpts" / "step*"), "tokens_per_step": 64}), inputs)
    assert_refused(result, inputs, "step2: its tokenizer (258 tokens) differs from step1's (300 tokens)")


def test_windows_longer_than_the_checkpoints_take(inputs, their_tokenizer):
    save_tiny(inputs / "ckpts" / "step1", 0, their_tokenizer)
    result = run_cli(series_study(inputs, {"folders": str(inputs / "ckpts" / "step1"), "seq_len": 64,
                                           "tokens_per_step": 64}), inputs)
    assert_refused(result, inputs, "checkpoints.seq_len=64: longer than the 32 tokens step1 takes")


def test_no_folder_matches(inputs):
    result = run_cli(series_study(inputs, {"folders": str(inputs / "nothing*")}), inputs)
    assert_refused(result, inputs, "checkpoints:", "nothing*: no checkpoint folders match")
