"""Ensembles are an implementation detail: a member trains, diverges and measures as it would alone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_study import tiny_study

from overtrain.models.build import build_model
from overtrain.models.checkpoints import load_checkpoint, save_checkpoint
from overtrain.models.stacked import CPU_TOKENS_PER_PASS, CUDA_TOKENS_PER_MEMBER, StackedLlama, members_that_fit, pass_shape
from overtrain.probes.loss import heldout_metrics, stacked_heldout_metrics
from overtrain.spec import PRESETS, parse_spec
from overtrain.study.ensembles import group_jobs
from overtrain.study.plan import plan_study
from overtrain.study.runner import run_study
from overtrain.study.store import load_results, study_status
from overtrain.train.ensemble import EnsembleAdamW, loss_and_gradient, train_ensemble
from overtrain.train.loop import TrainConfig, make_optimizer, train
from overtrain.train.schedules import Schedule

STEPS = 50


def paper_model(seed: int = 0):
    return build_model(PRESETS["paper"], vocab_size=258, seed=seed)


def config(lr: float, weight_decay: float = 0.1, grad_clip: float = 1.0, warmup: int = 5) -> TrainConfig:
    return TrainConfig(steps=STEPS, weight_decay=weight_decay, grad_clip=grad_clip,
                       schedule=Schedule("linear", lr, STEPS, warmup))


@pytest.mark.filterwarnings("ignore:grad and param do not obey")
@pytest.mark.parametrize("compile", [True, False])
def test_a_members_loss_and_gradient_are_the_hf_models(byte_corpus, compile):
    """12 x 200 tokens: on a CPU two passes per member (8 and 4 sequences, padded to 256)."""
    models = [paper_model(seed) for seed in range(3)]
    batch = next(byte_corpus.train_batches(12, 200, seed=0))
    ids = batch["input_ids"].expand(3, -1, -1).clone()
    ids[1] = ids[1].flip(-1)  # members read different data
    labels = ids.clone()
    labels[:, :, :8] = -100  # a prompt without loss
    stack = StackedLlama.from_models(models, compile=compile)
    assert len(list(stack.passes(ids, labels))) == 6
    losses = loss_and_gradient(stack, ids, labels)
    for member, model in enumerate(models):
        expected = model(input_ids=ids[member], labels=labels[member]).loss
        expected.backward()
        assert losses[member].item() == pytest.approx(expected.item(), rel=1e-6)
        found = stack.member_state(member)
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        stacked_grads = stack.grads[member, :grads.numel()]
        torch.testing.assert_close(stacked_grads, grads, rtol=1e-4, atol=1e-7)
        for name, param in model.named_parameters():
            assert torch.equal(found[name], param.detach())


def test_a_pass_is_shaped_for_its_device():
    """A CPU computes one member over a cache-sized slice of the batch; CUDA every member over a
    bounded slice (a held-out batch of 64 goes in four passes), at least one sequence either way."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pass_shape(cpu, 15, 16, 256) == (1, CPU_TOKENS_PER_PASS // 256)
    assert pass_shape(cpu, 15, 4, 2 * CPU_TOKENS_PER_PASS) == (1, 1)
    assert pass_shape(cuda, 300, 16, 256) == (300, 16)
    assert pass_shape(cuda, 300, 64, 256) == (300, CUDA_TOKENS_PER_MEMBER // 256)
    assert pass_shape(cuda, 300, 2, 2 * CUDA_TOKENS_PER_MEMBER) == (300, 1)
    assert members_that_fit(paper_model().config, 16, 256, cpu) > 10_000  # host memory is not the limit


def test_members_end_where_the_same_runs_end_alone(byte_corpus):
    """Own LR, schedule, data order, weight decay and clipping per member; 50 steps; final loss to 1e-5."""
    base = paper_model()
    configs = [config(1e-3), config(3e-3, weight_decay=0.0), config(1e-2, grad_clip=0.5, warmup=0),
               config(3e-3, grad_clip=0.0)]
    seeds = [0, 1, 2, 3]
    stack = StackedLlama.from_models([base] * len(configs))
    together = train_ensemble(stack, configs, [byte_corpus.train_batches(8, 64, seed=s) for s in seeds])
    for member, (cfg, seed) in enumerate(zip(configs, seeds)):
        alone = copy.deepcopy(base)
        result = train(alone, byte_corpus.train_batches(8, 64, seed=seed), cfg)
        assert together[member].steps_done == result.steps_done == STEPS
        assert together[member].tokens_seen == result.tokens_seen
        assert together[member].last_loss == pytest.approx(result.last_loss, rel=1e-5)
        for name, param in alone.named_parameters():
            torch.testing.assert_close(stack.member_state(member)[name], param.detach(), rtol=1e-3, atol=1e-5)


def test_a_diverged_member_stops_and_the_others_go_on(byte_corpus):
    base = paper_model()
    configs = [config(1e-3), config(1e6, grad_clip=0.0, warmup=0), config(3e-3)]
    stack = StackedLlama.from_models([base] * 3)
    together = train_ensemble(stack, configs, [byte_corpus.train_batches(8, 64, seed=s) for s in range(3)])
    alone = train(copy.deepcopy(base), byte_corpus.train_batches(8, 64, seed=1), configs[1])
    assert alone.diverged and together[1].diverged_at_step == alone.diverged_at_step
    assert together[1].steps_done == alone.steps_done
    assert stack.members == 2  # the diverged member left the stack
    for member in (0, 2):
        result = train(copy.deepcopy(base), byte_corpus.train_batches(8, 64, seed=member), configs[member])
        assert not together[member].diverged
        assert together[member].last_loss == pytest.approx(result.last_loss, rel=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_members_numbers_do_not_depend_on_its_companions(byte_corpus, threads):
    """On a CPU, bit for bit, with one thread or several: which members train beside it changes
    nothing (a killed ensemble job resumes with the members not yet recorded)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base = paper_model()
        alone = StackedLlama.from_models([base])
        train_ensemble(alone, [config(3e-3)], [byte_corpus.train_batches(8, 64, seed=1)])
        crowd = StackedLlama.from_models([base] * 5)
        train_ensemble(crowd, [config(1e-3), config(3e-3), config(1e-2), config(3e-4), config(1e-3, grad_clip=0.0)],
                       [byte_corpus.train_batches(8, 64, seed=s) for s in (0, 1, 2, 3, 4)])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(alone.weights[0], crowd.weights[1])


def test_a_member_saves_as_an_ordinary_checkpoint(byte_corpus, tmp_path):
    stack = StackedLlama.from_models([paper_model(0), paper_model(1)])
    train_ensemble(stack, [config(1e-3), config(3e-3)], [byte_corpus.train_batches(4, 32, seed=s) for s in (0, 1)])
    save_checkpoint(stack.member_model(1), byte_corpus.tokenizer, tmp_path / "member", {"note": "member 1"})
    loaded, _ = load_checkpoint(tmp_path / "member")
    for name, param in loaded.named_parameters():
        assert torch.equal(param, stack.member_state(1)[name])


def test_a_run_resumes_from_a_checkpoint_either_way(byte_corpus):
    """AdamW's state moves between `torch.optim.AdamW` (a run alone) and a member of an ensemble:
    10 steps alone, then 10 more alone or as a member, end at the same place; and a member's
    state saves as the torch optimizer's, loadable by it."""
    steps = 20
    cfg = TrainConfig(steps=steps, schedule=Schedule("cosine", 3e-3, steps, 2))
    model = paper_model()
    optimizer = make_optimizer(model, cfg)
    train(model, byte_corpus.train_batches(8, 64, seed=0), TrainConfig(steps=10, schedule=cfg.schedule), optimizer=optimizer)
    halfway_model, halfway_state = copy.deepcopy(model), copy.deepcopy(optimizer.state_dict())

    alone = train(model, byte_corpus.train_batches(8, 64, seed=0, start_step=10), cfg, optimizer=optimizer, start_step=10)
    stack = StackedLlama.from_models([halfway_model])
    ensemble_optimizer = EnsembleAdamW(stack, [cfg.weight_decay], (cfg.beta1, cfg.beta2))
    ensemble_optimizer.load_member_state(0, halfway_state)
    together = train_ensemble(stack, [cfg], [byte_corpus.train_batches(8, 64, seed=0, start_step=10)],
                              optimizer=ensemble_optimizer, start_step=10)[0]
    assert together.steps_done == alone.steps_done == steps
    assert together.last_loss == pytest.approx(alone.last_loss, rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(stack.member_state(0)[name], param.detach(), rtol=1e-3, atol=1e-5)

    member = stack.member_model(0)
    saved = ensemble_optimizer.member_state_dict(0, make_optimizer(member, cfg))
    reloaded = make_optimizer(member, cfg)
    reloaded.load_state_dict(saved)
    for param in member.parameters():
        assert int(reloaded.state[param]["step"]) == steps
    first = next(iter(member.parameters()))  # the embedding, the first slot of a row
    assert torch.equal(reloaded.state[first]["exp_avg"].reshape(-1), ensemble_optimizer.exp_avg[0, :first.numel()])
    torch.testing.assert_close(reloaded.state[first]["exp_avg"], optimizer.state[model.model.embed_tokens.weight]["exp_avg"],
                               rtol=1e-3, atol=1e-6)


def test_held_out_metrics_of_every_member_in_one_pass(byte_corpus):
    models = [paper_model(seed) for seed in range(3)]
    batches = byte_corpus.heldout_batches(4, 64, 1024)
    together = stacked_heldout_metrics(StackedLlama.from_models(models), batches, byte_corpus.byte_lengths)
    for model, found in zip(models, together):
        expected = heldout_metrics(model, batches, byte_corpus.byte_lengths)
        assert found == pytest.approx(expected, rel=1e-6)


# -- the engine ---------------------------------------------------------------------


def test_compatible_fine_tunes_are_grouped_the_same_way_whatever_the_timing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(tiny_study(tmp_path, finetune={"lrs": [1e-4, 1e-3, 1e-2], "seeds": [0, 1]},
                                 mitigations={"l2": [0.1]}))
    cells = [c for c in plan_study(spec) if c.kind == "finetune" and c.reads == "constant-2048"]
    plain = [c for c in cells if not c.config["mitigation"]]
    jobs = group_jobs(cells, slots=2, max_members=16)
    assert sorted(len(job) for job in jobs if len(job) > 1) == [3, 3]  # 6 plain fine-tunes over 2 slots
    assert all(len(job) == 1 and job[0].config["mitigation"] for job in jobs if len(job) == 1)
    assert {c.label for job in jobs if len(job) > 1 for c in job} == {c.label for c in plain}
    assert group_jobs(cells, slots=2, max_members=16) == jobs
    assert all(len(job) == 1 for job in group_jobs(cells, slots=2, max_members=1))


@pytest.fixture(scope="module")
def alone_and_together(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensemble_study")
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        study = parse_spec(tiny_study(folder, pretrain={"seeds": [0, 1]},
                                      finetune={"lrs": [1e-3, 1e-2, 1e6], "seeds": [0, 1], "steps": 4}))
        for name, members in (("alone", 1), ("together", 16)):
            runs[name] = run_study(study, folder / name, workers=0, members=members)
    return runs


def test_a_study_in_ensembles_records_what_it_records_alone(alone_and_together):
    """Pre-training seeds and fine-tunes as ensembles: every row of every cell as alone, to float32
    rounding. Rows are matched by what they describe, not by key: a checkpoint's hash differs in
    the last bits, so the cells that read it have other keys (as on another device).

    Not the fine-tunes at LR 1e6: after two steps of that size a run's weights are ~1e6 and
    whether its loss overflows or flattens to log(vocabulary) turns on the last bit of its start
    (alone, too, from one seed's checkpoint to the next); they must diverge or flatten either way."""
    alone, together = (load_results(run) for run in (alone_and_together["alone"], alone_and_together["together"]))
    identity = [column for column in alone.columns if column not in ("cell", "weights", "value")]

    def comparable(frame):
        frame = frame[(frame["metric"] != "tokens_per_second") & ~(frame["lr"] >= 1e6)]
        return frame.astype({"tokens": float, "step": float}).set_index(identity)["value"].sort_index()

    rows = {"alone": comparable(alone), "together": comparable(together)}
    assert rows["alone"].index.equals(rows["together"].index)  # the same rows, cell for cell
    assert set(rows["alone"].index.get_level_values("kind")) == {"pretrain", "probe", "finetune"}
    np.testing.assert_allclose(rows["together"], rows["alone"], rtol=1e-5)
    statuses = {name: study_status(run).set_index("label")["status"].sort_index() for name, run in alone_and_together.items()}
    assert statuses["alone"].index.equals(statuses["together"].index)
    steady = ~statuses["alone"].index.str.contains("lr=1e+06", regex=False)
    assert statuses["alone"][steady].equals(statuses["together"][steady])
    for name, frame in (("alone", alone), ("together", together)):
        wild = frame[(frame["lr"] >= 1e6) & (frame["metric"] == "train_loss_nats")]["value"].dropna()
        assert np.allclose(wild, np.log(258), rtol=1e-4), name  # flattened where not diverged (NaN)
    log = (alone_and_together["together"] / "logs").glob("*.log")
    assert any("one ensemble of: pretrain constant; pretrain constant seed 1" in f.read_text() for f in log)
    diverged = study_status(alone_and_together["together"]).query("status == 'diverged'")
    assert len(diverged) and diverged["label"].str.contains("lr=1e+06", regex=False).all()
