"""Every input that changes a cell's result is in its config, hence its key; nothing else is.

A cell reads only its config, the prepared corpus and the checkpoint it starts from
(study/cells.py), so an edit of the study must change the configs of exactly the
cells whose result it changes: the table below says which, for every key of a study
file, and a key missing from it fails the test.
"""

from __future__ import annotations

import copy
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel
from tiny_study import write_inputs

import overtrain
from overtrain.data.tokenizer import train_tokenizer
from overtrain.models.build import build_model
from overtrain.models.series import SeriesCheckpoint
from overtrain.spec import CheckpointsSpec, ModelSize, StudySpec, parse_spec
from overtrain.study.plan import Cell, cell_key, plan_study
from overtrain.study.store import study_status

NONE: frozenset[str] = frozenset()
PRETRAIN, PROBE, FINETUNE = frozenset({"pretrain"}), frozenset({"probe"}), frozenset({"finetune"})
MEASURED = frozenset({"probe", "finetune"})  # both evaluate on held-out pre-training text
EVERY_KIND = frozenset({"pretrain", "probe", "finetune"})
# Keys that choose which existing checkpoints a study reads: they act through the series
# found from them (`CheckpointsSpec.sources()`), whose path, pinned source, tokens and
# weights hash are in the import cells' configs (test_series_changes_its_import_cells).
SERIES = "series"

# key -> (another valid value, kinds of cells whose config it changes (or: in a study of our own checkpoints,
# in a study of existing ones), why).
# Keys of the corpus (data.*, tokenizer.*, seed) also change the prepared corpus, whose
# id is in every key: that is not a config and not checked here.
EDITS: dict[str, tuple[object, frozenset[str] | tuple[frozenset[str], frozenset[str]] | str, str]] = {
    "name": ("other", NONE, "a label in the report"),
    # (for a study of existing checkpoints, only the task split: they have no pre-training seed of ours)
    "seed": (1, (EVERY_KIND, FINETUNE), "initialisation, data order (the pre-training seed is in every checkpoint's "
                                        "context), the task split"),
    "device": ("auto", NONE, "deliberately not in keys: a study may move between machines"),
    "theory": ({"hidden": 10}, NONE, "not a cell: seconds of NumPy, rerun by every `overtrain run`"),
    "data.corpus": ("other.txt", PRETRAIN, "the text"),
    "data.text_field": ("body", PRETRAIN, "the text (of jsonl and parquet corpora)"),
    "data.heldout_fraction": (0.2, PRETRAIN, "the split"),
    "data.max_documents": (500, PRETRAIN, "the text"),
    "data.code_fraction": (0.2, PRETRAIN, "the text"),
    "tokenizer.vocab_size": (512, PRETRAIN, "the tokens"),
    "model.preset": ("tiny", PRETRAIN, "the model"),
    "model.d_model": (48, PRETRAIN, "the model"),
    "model.n_layers": (3, PRETRAIN, "the model"),
    "model.n_heads": (4, PRETRAIN, "the model"),
    "model.max_seq_len": (96, PRETRAIN, "the model"),
    "model.init_std": (0.01, PRETRAIN, "the model"),
    "pretrain.budgets": ([1024, 4096], EVERY_KIND, "which checkpoints exist"),
    "pretrain.schedules": (["cosine"], EVERY_KIND, "which checkpoints exist"),
    "pretrain.peak_lr": (1e-3, PRETRAIN, "training"),
    "pretrain.warmup_tokens": (256, PRETRAIN, "training"),
    "pretrain.wsd_decay_fraction": (0.5, PRETRAIN, "where wsd branches leave the constant run"),
    "pretrain.batch_size": (8, PRETRAIN, "training"),
    "pretrain.seq_len": (64, EVERY_KIND, "training, and the windows of held-out text and replay"),
    "pretrain.weight_decay": (0.0, PRETRAIN, "training"),
    "pretrain.grad_clip": (0.5, PRETRAIN, "training"),
    "pretrain.sam_rho": (0.1, PRETRAIN, "training"),
    "pretrain.sam_last_fraction": (0.25, PRETRAIN, "training"),
    "pretrain.compile": (True, PRETRAIN, "training (up to floating-point noise)"),
    "pretrain.seeds": ([0, 1], EVERY_KIND, "a second pre-training run: its checkpoints, probes and fine-tunes"),
    "checkpoints.folders": (["b"], SERIES, "which checkpoints"),
    "checkpoints.hub": ("org/model", SERIES, "which checkpoints"),
    "checkpoints.revisions": (["step1"], SERIES, "which checkpoints"),
    "checkpoints.cache_dir": ("hub-cache", SERIES, "which checkpoints"),
    "checkpoints.gguf": (["model.gguf"], SERIES, "which checkpoints"),
    "checkpoints.tokens": ({"a": 3000}, SERIES, "the checkpoints' tokens"),
    "checkpoints.tokens_per_step": (4096, SERIES, "the checkpoints' tokens, from their steps"),
    "checkpoints.seq_len": (64, MEASURED, "the windows of held-out text and replay"),
    "eval.heldout_tokens": (1024, MEASURED, "held-out evaluation"),
    "eval.batch_size": (16, MEASURED, "held-out evaluation"),
    "sensitivity.gammas": ([0.5], PROBE, "the perturbation probe"),
    "sensitivity.seeds": ([1], PROBE, "the perturbation probe"),
    "sharpness.tokens": (128, MEASURED, "the curvature probes and the curvature along each update"),
    "sharpness.top_k": (2, PROBE, "the curvature probes"),
    "sharpness.tol": (1e-2, PROBE, "the curvature probes"),
    "sharpness.trace_hvps": (0, PROBE, "the curvature probes"),
    "sharpness.kl_gamma": (0.25, PROBE, "the curvature probes"),
    "sharpness.kl_seeds": ([1], PROBE, "the curvature probes"),
    "sharpness.along_update": (False, FINETUNE, "the curvature along each update"),
    "finetune.tasks": (["qa"], FINETUNE, "fine-tuning"),
    "finetune.lrs": ([1e-2], FINETUNE, "fine-tuning"),
    "finetune.steps": (3, FINETUNE, "fine-tuning"),
    "finetune.batch_size": (2, FINETUNE, "fine-tuning"),
    "finetune.seq_len": (32, FINETUNE, "fine-tuning"),
    "finetune.warmup_steps": (2, FINETUNE, "fine-tuning"),
    "finetune.weight_decay": (0.1, FINETUNE, "fine-tuning"),
    "finetune.seeds": ([1], FINETUNE, "fine-tuning"),
    "finetune.eval_every": (0, FINETUNE, "what is measured"),
    "finetune.eval_examples": (8, FINETUNE, "what is measured"),
    "finetune.accuracy_examples": (4, FINETUNE, "what is measured"),
    "finetune.benchmarks": (["piqa"], FINETUNE, "what is measured"),
    "finetune.benchmark_limit": (20, FINETUNE, "what is measured"),
    "finetune.docstring_prompts": (4, FINETUNE, "what is measured"),
    "mitigations.l2": ([0.2], FINETUNE, "the fine-tuning variants"),
    "mitigations.wise": ([0.25], FINETUNE, "the fine-tuning variants"),
    "mitigations.replay": ([0.5], FINETUNE, "the fine-tuning variants"),
    "mitigations.lora": ([8], FINETUNE, "the fine-tuning variants"),
}

# Every section on, and every key that matters only when another is set (a model override,
# SAM, benchmarks, the docstring probe) set, so that each key can change something.
SHARED = {
    "name": "keys", "seed": 0, "device": "cpu",
    "data": {"corpus": "corpus.txt", "text_field": "text", "heldout_fraction": 0.1, "max_documents": 1000,
             "code_fraction": 0.1},
    "eval": {"heldout_tokens": 512, "batch_size": 8},
    "sensitivity": {"gammas": [1.0], "seeds": [0]},
    "sharpness": {"tokens": 64, "top_k": 1, "tol": 1e-3, "trace_hvps": 2, "kl_gamma": 0.5, "kl_seeds": [0],
                  "along_update": True},
    "finetune": {"tasks": ["math"], "lrs": [1e-3], "steps": 2, "batch_size": 4, "seq_len": 64, "warmup_steps": 1,
                 "weight_decay": 0.0, "seeds": [0], "eval_every": 1, "eval_examples": 4, "accuracy_examples": 2,
                 "benchmarks": ["arc_easy"], "benchmark_limit": 10, "docstring_prompts": 2},
    "mitigations": {"l2": [0.1], "wise": [0.5], "replay": [0.25], "lora": [4]},
    "theory": {},
}
PRETRAIN_STUDY = {
    **SHARED,
    "tokenizer": {"vocab_size": "bytes"},
    "model": {"preset": "nano"},
    "pretrain": {"budgets": [1024, 2048], "schedules": ["cosine", "constant", "wsd"], "peak_lr": 3e-3,
                 "warmup_tokens": 128, "wsd_decay_fraction": 0.25, "batch_size": 4, "seq_len": 32,
                 "weight_decay": 0.1, "grad_clip": 1.0, "sam_rho": 0.05, "sam_last_fraction": 0.5, "compile": False},
}
CHECKPOINTS_STUDY = {**SHARED, "checkpoints": {"folders": ["a", "b"], "tokens": {"a": 1000, "b": 2000}, "seq_len": 32}}


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of a study file that holds a value, through nested sections."""
    keys = []
    for name, info in model.model_fields.items():
        section = next((t for t in (info.annotation, *typing.get_args(info.annotation))
                        if isinstance(t, type) and issubclass(t, BaseModel)), None)
        keys += leaf_keys(section, f"{prefix}{name}.") if section else [f"{prefix}{name}"]
    return keys


def edited(study: dict, key: str, value: object) -> dict:
    study = copy.deepcopy(study)
    *sections, name = key.split(".")
    target = study
    for section in sections:
        target = target[section]
    target[name] = value
    return study


def series(tokens: dict[str, int], weights: dict[str, str]) -> list[SeriesCheckpoint]:
    """Checkpoints as the study's `checkpoints` section finds them (hashed), without files."""
    return [SeriesCheckpoint(label=label, tokens=count, path=Path(label), weights_sha256=weights[label] * 64,
                             extra={"parameters": 1000}) for label, count in tokens.items()]


def plan(study: dict) -> list[Cell]:
    spec = parse_spec(study)
    found = series(spec.checkpoints.tokens, {"a": "a", "b": "b"}) if spec.checkpoints else None
    return plan_study(spec, found)


def changed_kinds(before: list[Cell], after: list[Cell]) -> set[str]:
    """Kinds of the cells that are new, gone, or whose config changed; a cell is identified by its label."""
    old, new = {c.label: c for c in before}, {c.label: c for c in after}
    changed = {c.kind for label, c in old.items() if label not in new}
    for label, cell in new.items():
        if label not in old or old[label].config != cell.config:
            changed.add(cell.kind)
        else:  # same config: then it reads and writes the same checkpoints too
            assert (cell.reads, cell.writes) == (old[label].reads, old[label].writes), label
    return changed


@pytest.fixture()
def study_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("one document\n\nanother")
    (tmp_path / "other.txt").write_text("a different document\n\nand one more")


def test_every_key_of_a_study_is_in_the_table():
    assert sorted(set(leaf_keys(StudySpec)) - set(EDITS)) == [], "add these keys to EDITS"
    assert sorted(set(EDITS) - set(leaf_keys(StudySpec))) == [], "these keys are gone from the study file"


@pytest.mark.parametrize("key", leaf_keys(StudySpec))
def test_an_edited_key_changes_exactly_the_cells_it_affects(key, study_files):
    value, affected, why = EDITS[key]
    if affected == SERIES:
        assert key.removeprefix("checkpoints.") in CheckpointsSpec(folders=["a"]).sources(), why
        return
    section = key.split(".")[0]
    bases = [PRETRAIN_STUDY] if section in ("pretrain", "tokenizer", "model") else \
        [CHECKPOINTS_STUDY] if section == "checkpoints" else [PRETRAIN_STUDY, CHECKPOINTS_STUDY]
    for base in bases:
        assert parse_spec(edited(base, key, value)) != parse_spec(base), f"{key}: the edit changes nothing"
        before, after = plan(base), plan(edited(base, key, value))
        present = {cell.kind for cell in before}
        expected = affected if isinstance(affected, frozenset) else affected[base is CHECKPOINTS_STUDY]
        assert changed_kinds(before, after) == expected & present, f"{key} ({why})"


def test_series_changes_its_import_cells(study_files):
    """What the `checkpoints` keys find reaches the cells: weights and path the import, tokens every reader."""
    spec = parse_spec(CHECKPOINTS_STUDY)
    base = plan_study(spec, series({"a": 1000, "b": 2000}, {"a": "a", "b": "b"}))
    assert changed_kinds(base, plan_study(spec, series({"a": 1000, "b": 2000}, {"a": "a", "b": "c"}))) == {"import"}
    moved = [SeriesCheckpoint(**{**c.__dict__, "path": Path("elsewhere") / c.label}) for c in
             series({"a": 1000, "b": 2000}, {"a": "a", "b": "b"})]
    assert changed_kinds(base, plan_study(spec, moved)) == {"import"}
    retokened = plan_study(spec, series({"a": 1000, "b": 3000}, {"a": "a", "b": "b"}))
    assert changed_kinds(base, retokened) == {"import", "probe", "finetune"}


# -- a changed key reruns its cells -----------------------------------------------------

def save_checkpoint_folder(folder: Path, seed: int, tokenizer) -> None:
    """A tiny HF model that takes windows of 64 tokens."""
    model = build_model(ModelSize(d_model=16, n_layers=1, n_heads=2, max_seq_len=64), len(tokenizer), seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_changed_window_length_reruns_the_measurements(tmp_path, monkeypatch, python_docs):
    """A rerun with `checkpoints.seq_len` changed measures what a fresh folder measures (it used to keep
    the old bits-per-byte and report every cell done)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = train_tokenizer(python_docs[:40], 300)
    for name, seed in (("early", 0), ("late", 1)):
        save_checkpoint_folder(tmp_path / "ckpts" / name, seed, tokenizer)
    corpus, task = write_inputs(tmp_path)

    def study(seq_len: int) -> dict:
        return {"name": "windows", "data": {"corpus": str(corpus)}, "eval": {"heldout_tokens": 512},
                "checkpoints": {"folders": str(tmp_path / "ckpts" / "*"), "tokens": {"early": 1000, "late": 5000},
                                "seq_len": seq_len},
                "sensitivity": None,
                "finetune": {"tasks": [task.name], "lrs": [1e-3], "steps": 1, "batch_size": 4, "seq_len": 32,
                             "eval_examples": 4, "accuracy_examples": 0}}

    def measured(run_dir: Path) -> dict:
        frame = overtrain.load_results(run_dir)
        probes = frame.query("kind == 'probe' and metric == 'bpb'").set_index("checkpoint")["value"]
        finetunes = frame.query("kind == 'finetune' and metric == 'ood_bpb' and step == 0").set_index("checkpoint")
        return {"bpb": probes.to_dict(), "ood_bpb": finetunes["value"].to_dict()}

    def keys(run_dir: Path) -> dict:
        return study_status(run_dir).set_index("label")["key"].to_dict()

    overtrain.run(study(32), tmp_path / "edited", workers=0)
    at_32, keys_32 = measured(tmp_path / "edited"), keys(tmp_path / "edited")
    overtrain.run(study(64), tmp_path / "edited", workers=0)
    overtrain.run(study(64), tmp_path / "fresh", workers=0)
    rerun, fresh, keys_64 = measured(tmp_path / "edited"), measured(tmp_path / "fresh"), keys(tmp_path / "edited")

    assert rerun == fresh
    assert all(rerun["bpb"][name] != at_32["bpb"][name] for name in ("early", "late"))
    assert all(rerun["ood_bpb"][name] != at_32["ood_bpb"][name] for name in ("early", "late"))
    rerun_labels = {label for label in keys_64 if keys_64[label] != keys_32[label]}
    assert rerun_labels == {label for label in keys_64 if not label.startswith("import")}
    assert set(study_status(tmp_path / "edited")["status"]) == {"done"}


def test_an_edited_user_task_file_changes_its_fine_tunes_keys(tmp_path):
    """A user task is named by its path in the config: its content is in the key, so editing the file reruns."""
    task = tmp_path / "task.jsonl"
    task.write_text('{"prompt": "Q: 1+1?", "completion": " 2"}\n')
    finetune = Cell("finetune", "finetune a", {"task": str(task), "lr": 1e-3})
    builtin = Cell("finetune", "finetune b", {"task": "qa", "lr": 1e-3})
    before = cell_key(finetune, "corpus", tmp_path), cell_key(builtin, "corpus", tmp_path)
    task.write_text('{"prompt": "Q: 2+2?", "completion": " 4"}\n')
    after = cell_key(finetune, "corpus", tmp_path), cell_key(builtin, "corpus", tmp_path)
    assert before[0] != after[0]
    assert before[1] == after[1]
