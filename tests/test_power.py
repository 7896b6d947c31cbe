"""`overtrain power`: simulated studies with the rows of a real run, noise measured from a run,
calibrated claims on the paper design, and the command's output and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from overtrain.analysis import claims, power
from overtrain.cli import app
from overtrain.probes.metrics import check_rows
from overtrain.spec import load_spec, parse_spec
from overtrain.study.folder import RunFolder
from overtrain.study.store import RESULT_COLUMNS, Store, load_results

PAPER = Path(__file__).resolve().parents[1] / "examples" / "paper.yaml"


def small_study(**overrides) -> dict:
    study = {
        "name": "small", "seed": 0,
        "pretrain": {"budgets": [1000, 2048, 3072, 4096, 6144], "schedules": ["wsd"], "warmup_tokens": 128,
                     "batch_size": 4, "seq_len": 32},
        "sensitivity": {"gammas": [0.5, 1.0], "seeds": [0, 1, 2]},
        "finetune": {"tasks": ["math"], "lrs": [1e-3, 3e-3, 1e-2], "seeds": [0, 1, 2], "steps": 10, "eval_every": 4},
    }
    for section, values in overrides.items():
        study[section] = {**study[section], **values} if isinstance(values, dict) else values
    return study


def write_study(folder: Path, **overrides) -> Path:
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(small_study(**overrides)))
    return path


def write_run_folder(folder: Path, study: dict, frame: pd.DataFrame) -> Path:
    """A run folder as `overtrain run` leaves it: study.json and a store holding `frame`'s rows."""
    folder.mkdir(parents=True)
    RunFolder(folder).study.write_text(json.dumps(parse_spec(study).model_dump(mode="json")))
    store = Store(RunFolder(folder).store)
    cells = frame.groupby("cell", sort=False)
    store.set_plan([(cell, rows["kind"].iloc[0], None) for cell, rows in cells])
    for cell, rows in cells:
        kind = rows["kind"].iloc[0]
        store.start(cell, kind, cell, {})
        store.finish(cell, kind, rows.drop(columns=["cell", "kind"]).to_dict("records"))
        store.set_plan_key(cell, cell)
    store.close()
    return folder


# -- the simulated rows ----------------------------------------------------------------------

def test_simulated_rows_have_the_layout_of_a_real_runs_rows(tiny_model, byte_corpus):
    from overtrain.probes.suite import finetune_metrics, probe_rows

    design = power.design_of(parse_spec(small_study(pretrain={"seeds": [0, 5]})))
    frame = power.simulated_studies(design, power.Noise()).frame(np.random.default_rng(0), effect=False)

    assert list(frame.columns) == ["cell", "kind", *RESULT_COLUMNS, "metric", "value"]  # as load_results reads them
    check_rows(frame.to_dict("records"))
    text = byte_corpus.heldout_batches(4, 32, 256)
    real_probe = {row["metric"] for row in probe_rows(tiny_model, text, byte_corpus.byte_lengths,
                                                      {"gammas": [1.0], "seeds": [0]}, None)}
    real_finetune = set(finetune_metrics(tiny_model, text, text, byte_corpus.byte_lengths, test_batches=text))
    probes, finetunes = frame[frame["kind"] == "probe"], frame[frame["kind"] == "finetune"]
    assert real_probe - set(probes["metric"]) == {"ppl"} and set(probes["metric"]) <= real_probe
    assert set(finetunes["metric"]) == real_finetune

    # names and context as study/plan.py and study/cells.py write them
    assert set(frame["checkpoint"]) == {f"{s}-{t}{suffix}" for s in ("constant", "wsd") for t in (896, 2048, 3072, 4096, 6144)
                                        for suffix in ("", "-seed5")}
    assert (frame["pretrain_seed"] == np.where(frame["checkpoint"].str.endswith("-seed5"), 5, 0)).all()
    assert (frame["decayed"] == (frame["schedule"] == "wsd")).all()
    assert set(finetunes["step"]) == {0, 4, 8, 10} and (finetunes["mitigation"] == "none").all()
    assert finetunes["gamma"].isna().all() and probes[["step", "task", "lr", "mitigation"]].isna().all().all()
    per_gamma = probes["metric"].isin(["perturbed_bpb", "delta_bpb", "perturbed_loss_nats", "delta_loss_nats"])
    assert probes.loc[per_gamma, ["gamma", "seed"]].notna().all().all()
    assert probes.loc[~per_gamma, ["gamma", "seed"]].isna().all().all()
    assert not frame.duplicated(["cell", "metric", "gamma", "seed", "step"]).any()
    assert frame.groupby("cell")["checkpoint"].nunique().eq(1).all()


def test_simulated_values_hang_together_as_measured_ones_do():
    design = power.design_of(parse_spec(small_study()))
    frame = power.simulated_studies(design, power.Noise()).frame(np.random.default_rng(1), effect=True)
    probe = frame[frame["kind"] == "probe"]
    base = probe[probe["metric"] == "bpb"].set_index("checkpoint")["value"]
    delta, perturbed = (probe[probe["metric"] == m].set_index(["checkpoint", "gamma", "seed"])["value"].sort_index()
                        for m in ("delta_bpb", "perturbed_bpb"))
    assert np.allclose(perturbed - delta, base.reindex(perturbed.index.get_level_values("checkpoint")).to_numpy())
    start = frame[(frame["kind"] == "finetune") & (frame["step"] == 0)]
    ood_start = start[start["metric"] == "ood_bpb"]
    assert np.allclose(ood_start["value"], base.reindex(ood_start["checkpoint"]).to_numpy())  # the checkpoint itself
    assert start.groupby(["checkpoint", "metric"])["value"].nunique().eq(1).all()  # every LR and seed starts alike
    loss = frame[frame["metric"] == "id_loss_nats"]["value"].to_numpy()
    assert np.allclose(loss, frame[frame["metric"] == "id_bpb"]["value"].to_numpy() * np.log(2))


# -- designs and noise --------------------------------------------------------------------------

def test_a_design_is_read_from_a_study_file_and_from_a_run_folder(tmp_path):
    design = power.design_of(load_spec(write_study(tmp_path)))
    assert design.tokens == (896, 2048, 3072, 4096, 6144)  # whole steps of 4 x 32 tokens
    assert design.schedules == ("constant", "wsd")  # the constant run is studied whenever wsd branches leave it
    assert design.pretrain_seeds == (0,) and design.gammas == (0.5, 1.0) and design.lrs == (1e-3, 3e-3, 1e-2)
    assert design.eval_steps == [0, 4, 8, 10]

    study = small_study(pretrain={"seeds": [3, 4]})
    frame = power.simulated_studies(power.design_of(parse_spec(study)), power.Noise()).frame(np.random.default_rng(0), False)
    run = write_run_folder(tmp_path / "run", study, frame)
    assert power.design_of(power.read_study(run)) == power.design_of(parse_spec(study))
    stored = load_results(run)  # the simulated rows come back from a store as they went in
    assert len(stored) == len(frame) and stored.dtypes.equals(frame.dtypes)
    assert power.design_of(parse_spec(small_study(finetune=None))).eval_steps == [0]


NOISE = power.Noise(probe={0.5: 0.01, 1.0: 0.03}, ood={1e-3: 0.005, 1e-2: 0.02}, task={1e-3: 0.01, 1e-2: 0.04},
                    pretrain={"bpb": 0.02, "delta_bpb": 0.01, "ood_bpb": 0.03, "id_bpb": 0.015})


def noisy_design(pretrain_seeds: list[int]) -> power.Design:
    return power.design_of(parse_spec(small_study(
        pretrain={"budgets": [1024 * k for k in range(1, 9)], "schedules": ["wsd"], "seeds": pretrain_seeds},
        sensitivity={"seeds": list(range(8))}, finetune={"lrs": [1e-3, 1e-2], "seeds": list(range(8))})))


def test_noise_measured_from_a_frame_is_the_noise_it_was_simulated_with():
    design = noisy_design(list(range(8)))
    frame = power.simulated_studies(design, NOISE).frame(np.random.default_rng(2), effect=True)
    measured = power.measure_noise(frame, "a simulated run")
    for table in ("probe", "ood", "task"):
        expected = getattr(NOISE, table)
        assert set(getattr(measured, table)) == set(expected)
        for key, sd in getattr(measured, table).items():
            assert sd == pytest.approx(expected[key], rel=0.15), (table, key)
    for family, sd in measured.pretrain.items():
        assert sd == pytest.approx(NOISE.pretrain[family], rel=0.35), family
    assert measured.notes == ()


def test_one_pretraining_seed_leaves_that_level_at_zero_and_says_so():
    frame = power.simulated_studies(noisy_design([0]), NOISE).frame(np.random.default_rng(3), effect=False)
    measured = power.measure_noise(frame, "a simulated run")
    assert set(measured.pretrain.values()) == {0.0}
    assert any("one pre-training seed" in note for note in measured.notes)
    without_probes = power.measure_noise(frame[frame["kind"] != "probe"], "a run")
    assert without_probes.probe_sd(0.5) == power.PROBE_NOISE_BPB[0.5] and any("probe: default" in n for n in without_probes.notes)


def test_a_run_folder_gives_its_design_and_its_noise(tmp_path):
    study = small_study(pretrain={"seeds": [0, 1, 2]}, sensitivity={"seeds": list(range(6))})
    frame = power.simulated_studies(power.design_of(parse_spec(study)), NOISE).frame(np.random.default_rng(4), False)
    run = write_run_folder(tmp_path / "run", study, frame)
    found = power.power(run, simulations=1)
    assert str(run) in found.noise.source
    assert found.noise.probe_sd(1.0) == pytest.approx(0.03, rel=0.3)
    assert found.design.pretrain_seeds == (0, 1, 2)
    other = power.power(PAPER, noise_from=run, simulations=1)  # the paper's design with this run's noise
    assert other.design.tokens[-1] == 100663296 and other.noise.probe == found.noise.probe


# -- calibration --------------------------------------------------------------------------------

@pytest.mark.timeout(1800)
def test_no_claim_holds_in_more_than_5_percent_of_null_studies_of_the_paper_design():
    design = power.design_of(load_spec(PAPER))
    studies = power.simulated_studies(design, power.Noise())
    simulations = 400
    tally = power.count_verdicts(studies, False, simulations, np.random.default_rng(0))
    rates = {number: counts["holds"] / simulations for number, counts in tally.verdicts.items()}
    assert list(rates) == list(claims.CLAIM_IDS) and all(rate <= 0.05 for rate in rates.values()), rates


# -- the command --------------------------------------------------------------------------------

def invoke(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def test_json_gives_each_claims_rates(tmp_path):
    result = invoke("power", write_study(tmp_path), "--simulations", 3, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert [c["claim"] for c in found["claims"]] == list(claims.CLAIM_IDS)
    for claim in found["claims"]:
        assert set(claim) == {"claim", "false_positive_rate", "power", "simulations"} and claim["simulations"] == 3
        assert claim["false_positive_rate"] is None or 0 <= claim["false_positive_rate"] <= 1
        assert claim["power"] is None or 0 <= claim["power"] <= 1
    assert found["design"]["tokens"] == [896, 2048, 3072, 4096, 6144]
    assert found["noise"]["probe_bpb_by_gamma"] == {"0.5": power.PROBE_NOISE_BPB[0.5], "1": power.PROBE_NOISE_BPB[1.0]}

    text = invoke("power", write_study(tmp_path), "--simulations", 2)
    assert text.exit_code == 0 and "false_positive_rate" in text.stdout and "noise (bpb, one sd; defaults)" in text.stdout


def test_a_claim_the_design_cannot_test_has_no_rates_and_says_why(tmp_path):
    result = invoke("power", write_study(tmp_path, finetune=None), "--simulations", 2, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    untested = {c["claim"] for c in found["claims"] if c["false_positive_rate"] is None and c["power"] is None}
    finetuning = {"finetune_u", "lr_moves_turn", "t_ft_tuned", "t_pre_tuned", "lr_trend", "decay_forgets_more",
                  "matched_loss", "forecast"}
    assert finetuning <= untested and not untested & {"sensitivity", "perturbation_u", "decay_sharper"}, untested
    assert all(v["reason"] for v in found["verdicts"] if v["claim"] in untested)


@pytest.mark.parametrize("args, expected", [
    (["no-such-study.yaml"], "no-such-study.yaml: no such study file"),
    (["{tmp}"], "not a run folder"),
    ([str(PAPER), "--noise-from", "{tmp}"], "not a run folder"),
    ([str(PAPER), "--simulations", "0"], "--simulations 0: needs at least one"),
    (["{checkpoints}"], "power: simulates studies that pre-train their own checkpoints"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoints = tmp_path / "series.yaml"
    checkpoints.write_text(yaml.safe_dump({"name": "series", "checkpoints": {"folders": "ckpts/step*"}}))
    result = invoke("power", *(a.format(tmp=tmp_path, checkpoints=checkpoints) for a in args))
    message = result.output.strip()
    assert result.exit_code == 2, result.output
    assert message.startswith("error: ") and expected in message and "\n" not in message, message
