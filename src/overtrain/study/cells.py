"""What each kind of cell does: pre-train, import an existing checkpoint, probe a checkpoint, fine-tune a checkpoint.

Each function takes a cell and the study context and returns tidy result rows
({metric, value} plus context columns). Checkpoints are written as side effects.
A cell reads nothing of the study but its own config (see StudyContext).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from overtrain.data.corpus import PreparedCorpus
from overtrain.data.examples import TEST, VALIDATION, TokenizedTask
from overtrain.data.tasks import load_task
from overtrain.errors import CheckpointError
from overtrain.models.build import build_model, parameter_count
from overtrain.models.checkpoints import MANIFEST, load_checkpoint, load_optimizer_state, read_manifest, save_checkpoint
from overtrain.models.series import SeriesCheckpoint, load_series_model
from overtrain.probes.residue import docstring_prompts
from overtrain.models.stacked import StackedLlama, members_that_fit, unsupported_reason
from overtrain.probes.suite import capability_metrics, finetune_metrics, probe_rows, stacked_finetune_metrics, update_rows
from overtrain.runtime.hashing import weights_sha256
from overtrain.spec import ModelSize
from overtrain.study.folder import RunFolder
from overtrain.study.plan import SERIES, Cell, CheckpointRef
from overtrain.train.ensemble import EnsembleAdamW, train_ensemble
from overtrain.train.loop import TrainConfig, TrainResult, make_optimizer, train
from overtrain.train.mitigations import interpolated, with_lora, with_replay
from overtrain.train.schedules import Schedule


@dataclass
class StudyContext:
    """What a cell reads besides its config: inputs that every key names by content.

    - the prepared corpus (its folder's id is in every key);
    - the run folder's checkpoints (a cell reads one by name; its weights' hash is in the key);
    - the device, deliberately not in the key: a study may move between machines, and
      where a result was computed changes it by floating-point noise only.
    A cell never sees the study spec, so every input that changes its result must be in
    its config (study/plan.py). What is derived from config values (held-out windows,
    tokenized tasks) is cached here, keyed by the values it is made from.
    """

    folder: RunFolder
    corpus: PreparedCorpus
    device: torch.device
    _heldout: dict = field(default_factory=dict)
    _tasks: dict = field(default_factory=dict)

    def heldout_batches(self, cfg: dict, tokens: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Held-out pre-training text cut as the cell's config says: `eval.heldout_tokens` of it, or
        the first `tokens` (the fixed set every curvature probe uses)."""
        ident = (cfg["eval"]["batch_size"], cfg["text_seq_len"], tokens or cfg["eval"]["heldout_tokens"])
        if ident not in self._heldout:
            self._heldout[ident] = self.corpus.heldout_batches(*ident)
        return self._heldout[ident]

    def task(self, cfg: dict) -> TokenizedTask:
        """A fine-tuning cell's task, split and tokenized as its config says."""
        ident = (cfg["task"], cfg["task_seed"], cfg["seq_len"], cfg["eval_examples"], cfg["accuracy_examples"],
                 cfg.get("docstring_prompts", 0))  # absent from the config when the probe is off
        if ident not in self._tasks:
            self._tasks[ident] = _tokenized_task(*ident, tokenizer=self.corpus.tokenizer)
        return self._tasks[ident]


def _tokenized_task(name: str, seed: int, seq_len: int, eval_examples: int, accuracy_examples: int,
                    n_docstring_prompts: int, tokenizer) -> TokenizedTask:
    task = load_task(name, seed=seed)
    prompts = docstring_prompts(seed, n_docstring_prompts) if n_docstring_prompts and "heldout_modules" in task.metadata else []
    return TokenizedTask.from_task(task, tokenizer, seq_len, eval_examples, accuracy_examples, prompts)


# -- pre-training -------------------------------------------------------------------

def run_pretrain(cell: Cell, key: str, ctx: StudyContext) -> list[dict]:
    cfg = cell.config
    per_step, train_config = _pretrain_training(cfg)
    tokenizer = ctx.corpus.tokenizer
    model = _initial_model(cfg, tokenizer, ctx.device)
    optimizer = make_optimizer(model, train_config)
    start_step = 0
    source = _resume_sources([(key, cell)], ctx)
    if source is not None:
        start_step = _load_checkpoint_into(model, source[0])
        optimizer.load_state_dict(load_optimizer_state(source[0]))
    save_steps = _save_steps(cell, per_step)

    def save(steps_done: int, lr: float) -> None:
        if steps_done in save_steps:
            _save_pretrained(model, optimizer.state_dict(), save_steps[steps_done], steps_done, key, cfg, lr, ctx)

    result = train(model, ctx.corpus.train_batches(cfg["batch_size"], cfg["seq_len"], cfg["seed"], start_step),
                   train_config, optimizer=optimizer, start_step=start_step, on_step_end=save, description=cell.label)
    return _pretrain_rows(cfg, result, parameter_count(model))


def run_pretrain_ensemble(members: list[tuple[str, Cell]], ctx: StudyContext) -> dict[str, list[dict]]:
    """Pre-training runs that differ only in their seed (study/ensembles.py) trained as one
    ensemble: each member's checkpoints (with its AdamW state in `torch.optim`'s format) and
    rows are those it writes alone, so that a run resumes or branches from them either way."""
    configs = [cell.config for _, cell in members]
    per_step, train_config = _pretrain_training(configs[0])
    tokenizer = ctx.corpus.tokenizer
    models = [_initial_model(cfg, tokenizer, torch.device("cpu")) for cfg in configs]  # stacked on the device
    at_once = members_that_fit(models[0].config, configs[0]["batch_size"], configs[0]["seq_len"], ctx.device)
    if len(members) > at_once:  # more runs than the device holds: in turns
        return {key: rows for first in range(0, len(members), at_once)
                for key, rows in run_pretrain_ensemble(members[first:first + at_once], ctx).items()}
    stack = StackedLlama.from_models(models, device=ctx.device, compile=configs[0]["compile"])
    optimizer = EnsembleAdamW(stack, [train_config.weight_decay] * len(members), (train_config.beta1, train_config.beta2))
    start_step = 0
    sources = _resume_sources(members, ctx)
    for row, source in enumerate(sources or []):
        start_step = _load_checkpoint_into(models[row], source)
        stack.load_member(row, dict(models[row].named_parameters()))
        optimizer.load_member_state(row, load_optimizer_state(source))
    save_steps = [_save_steps(cell, per_step) for _, cell in members]

    def save(steps_done: int, alive: list[int]) -> None:
        for row, member in enumerate(alive):
            if steps_done in save_steps[member]:
                model = stack.member_model(row)
                state = optimizer.member_state_dict(row, make_optimizer(model, train_config))
                _save_pretrained(model, state, save_steps[member][steps_done], steps_done, members[member][0],
                                 configs[member], train_config.schedule(steps_done - 1), ctx)

    data = [ctx.corpus.train_batches(cfg["batch_size"], cfg["seq_len"], cfg["seed"], start_step) for cfg in configs]
    results = train_ensemble(stack, [train_config] * len(members), data, optimizer=optimizer, start_step=start_step,
                             on_step_end=save,
                             description=_job_description([cell for _, cell in members], "pre-training runs"))
    return {key: _pretrain_rows(cfg, result, parameter_count(models[0]))
            for (key, _), cfg, result in zip(members, configs, results)}


def _job_description(cells: list[Cell], many: str) -> str:
    """The progress bar's name: the cell's label, or how many cells of what."""
    return cells[0].label if len(cells) == 1 else f"{len(cells)} {many}"


def _pretrain_training(cfg: dict) -> tuple[int, TrainConfig]:
    """Tokens a step and the training settings of a pre-training cell."""
    per_step = cfg["batch_size"] * cfg["seq_len"]
    total_steps = cfg["total_tokens"] // per_step
    warmup = cfg["warmup_tokens"] // per_step
    return per_step, TrainConfig(
        steps=total_steps, weight_decay=cfg["weight_decay"], grad_clip=cfg["grad_clip"], compile=cfg["compile"],
        schedule=_pretrain_schedule(cfg, total_steps, warmup), sam_rho=cfg["sam_rho"],
        sam_start_step=total_steps - round(cfg["sam_last_fraction"] * total_steps))


def _pretrain_schedule(cfg: dict, total_steps: int, warmup: int) -> Schedule:
    kind, peak = cfg["schedule"], cfg["peak_lr"]
    if kind == "wsd":
        branch_step = cfg["branch_from_tokens"] // (cfg["batch_size"] * cfg["seq_len"])
        return Schedule("wsd", peak, total_steps, warmup, decay_start=branch_step)
    return Schedule(kind, peak, total_steps, warmup)


def _initial_model(cfg: dict, tokenizer, device: torch.device):
    return build_model(ModelSize(**cfg["model"]), len(tokenizer), cfg["seed"], bos_token_id=tokenizer.eos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).to(device)


def _save_steps(cell: Cell, per_step: int) -> dict[int, CheckpointRef]:
    return {ref.tokens // per_step: ref for ref in cell.writes}


def _save_pretrained(model, optimizer_state: dict, ref: CheckpointRef, steps_done: int, key: str, cfg: dict,
                     lr: float, ctx: StudyContext) -> None:
    save_checkpoint(model, ctx.corpus.tokenizer, ctx.folder.checkpoint(ref.name), {
        "cell": key, "schedule": ref.schedule, "decayed": ref.decayed, "tokens": steps_done * cfg["batch_size"] * cfg["seq_len"],
        "step": steps_done, "lr_at_save": lr, "peak_lr": cfg["peak_lr"], "parameters": parameter_count(model),
    }, optimizer_state=optimizer_state)


def _pretrain_rows(cfg: dict, result: TrainResult, parameters: int) -> list[dict]:
    rows = [{"metric": "train_loss_nats", "value": result.last_loss},
            {"metric": "tokens_per_second", "value": result.tokens_per_second},
            {"metric": "parameters", "value": parameters}]
    if result.diverged:
        rows.append({"metric": "diverged_at_step", "value": result.diverged_at_step})
    context = {"schedule": cfg["schedule"], "tokens": cfg["total_tokens"], "pretrain_seed": cfg["seed"]}
    return [{**context, **row} for row in rows]


def _resume_sources(members: list[tuple[str, Cell]], ctx: StudyContext) -> list[Path] | None:
    """The checkpoint each run continues from (None: from scratch): its own latest one written by
    this same cell (same key), at a step that every member reached (members save in step, so one
    killed mid-save goes back to the step before), else the stable checkpoint a wsd branch leaves."""
    reached = []
    for key, cell in members:
        own = [ctx.folder.checkpoint(ref.name) for ref in cell.writes]
        manifests = {folder: read_manifest(folder) for folder in own if (folder / MANIFEST).exists()}
        reached.append({manifest["step"]: folder for folder, manifest in manifests.items() if manifest.get("cell") == key})
    common = set.intersection(*(set(steps) for steps in reached))
    if common:
        return [steps[max(common)] for steps in reached]
    if members[0][1].reads:
        return [ctx.folder.checkpoint(cell.reads) for _, cell in members]
    return None


def _load_checkpoint_into(model, source: Path) -> int:
    """Copy a checkpoint's weights into `model`; the step it was saved at."""
    loaded, _ = load_checkpoint(source)
    model.load_state_dict(loaded.state_dict())
    return read_manifest(source)["step"]


# -- existing checkpoints -----------------------------------------------------------

def run_import(cell: Cell, key: str, ctx: StudyContext) -> list[dict]:
    """Copy an existing checkpoint into the run folder (float32, with its tokenizer and a manifest),
    so that probes and fine-tunes read it like one of ours; a duplicate is only recorded."""
    cfg = cell.config
    if cfg["duplicate_of"] is None:
        source = SeriesCheckpoint(label=cfg["checkpoint"], tokens=cfg["tokens"], path=Path(cfg["path"]),
                                  gguf_file=cfg["gguf_file"])
        model, tokenizer = load_series_model(source)
        if weights_sha256(model) != cfg["weights_sha256"]:  # the files changed after the study was planned
            raise CheckpointError(f"{cfg['source']}: its weights changed while the study ran; run it again")
        save_checkpoint(model, tokenizer, ctx.folder.checkpoint(cfg["checkpoint"]), {
            "cell": key, "schedule": SERIES, "decayed": False, "tokens": cfg["tokens"], "source": cfg["source"],
            "parameters": cfg["parameters"]})
    return [{"checkpoint": cfg["checkpoint"], "schedule": SERIES, "decayed": 0, "tokens": cfg["tokens"], "pretrain_seed": 0,
             "weights": cfg["weights_sha256"][:16], "duplicate_of": cfg["duplicate_of"], "source": cfg["source"],
             "metric": "parameters", "value": cfg["parameters"]}]


# -- probing ------------------------------------------------------------------------

def run_probe(cell: Cell, key: str, ctx: StudyContext) -> list[dict]:
    cfg = cell.config
    folder = ctx.folder.checkpoint(cfg["checkpoint"])
    model, _ = load_checkpoint(folder, device=ctx.device)
    sharpness_text = ctx.heldout_batches(cfg, cfg["sharpness"]["tokens"]) if cfg["sharpness"] else []
    rows = probe_rows(model, ctx.heldout_batches(cfg), ctx.corpus.byte_lengths, cfg["sensitivity"], cfg["sharpness"],
                      sharpness_text)
    return [{**checkpoint_columns(cfg, folder), **row} for row in rows]


def checkpoint_columns(cfg: dict, folder: Path) -> dict:
    return {"checkpoint": cfg["checkpoint"], "schedule": cfg["schedule"], "decayed": int(cfg["decayed"]),
            "tokens": cfg["tokens"], "pretrain_seed": cfg["pretrain_seed"],
            "weights": read_manifest(folder)["weights_sha256"][:16]}


# -- fine-tuning --------------------------------------------------------------------

def run_finetune(cell: Cell, key: str, ctx: StudyContext) -> list[dict]:
    cfg = cell.config
    folder = ctx.folder.checkpoint(cfg["checkpoint"])
    model, tokenizer = load_checkpoint(folder, device=ctx.device)
    mitigation = cfg["mitigation"] or {}
    columns = _finetune_columns(cfg, folder)
    task = ctx.task(cfg)
    evaluate = partial(finetune_metrics, task_batches=task.heldout_batches(cfg["eval"]["batch_size"], VALIDATION),
                       test_batches=task.heldout_batches(cfg["eval"]["batch_size"], TEST),
                       text=ctx.heldout_batches(cfg), byte_lengths=ctx.corpus.byte_lengths)
    capabilities = _capabilities(cfg, task, tokenizer)

    torch.manual_seed(cfg["seed"])
    config = _finetune_config(cfg, l2_to_start=mitigation.get("l2", 0.0))
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()} if cfg["wise"] else {}
    before = {"step": 0, **evaluate(model), **capabilities(model)}
    trained = with_lora(model, mitigation["lora"]) if "lora" in mitigation else model
    result = train(trained, _finetune_batches(task, cfg, ctx, mitigation.get("replay", 0.0)), config,
                   evaluate=evaluate, evaluate_every=cfg["eval_every"], description=cell.label)
    if "lora" in mitigation:
        model = trained.merge_and_unload()  # plain weights again, for the measures below
    # Diverged weights are not a result to measure: the run's divergence row says what happened.
    after = [] if result.diverged else [{"step": result.steps_done, **capabilities(model)}]
    rows = _finetune_rows(columns, before, result, after)
    if cfg["along_update"] and not result.diverged:
        base, _ = load_checkpoint(folder, device=ctx.device)
        rows += [{**columns, "step": result.steps_done, **row}
                 for row in update_rows(base, model, ctx.heldout_batches(cfg, cfg["along_update"]["tokens"]))]
    for alpha in cfg["wise"]:  # measured even when diverged: the variant is then diverged too, and shown so
        with interpolated(model, pretrained, alpha):
            measured = {**evaluate(model), **capabilities(model)}
        rows += [{**columns, "mitigation": f"wise={alpha:g}", "step": result.steps_done, "metric": name, "value": value}
                 for name, value in measured.items()]
    return rows


def run_finetune_ensemble(members: list[tuple[str, Cell]], ctx: StudyContext) -> dict[str, list[dict]]:
    """Fine-tunes of one checkpoint trained as one ensemble (study/ensembles.py says which may be):
    the rows of each member, by its key, as `run_finetune` would write them alone.

    The step-0 measures are taken once per task (every member starts from the same
    weights); training and the held-out measures along it are batched over members, as
    many at a time as the device's free memory holds."""
    configs = [cell.config for _, cell in members]
    folder = ctx.folder.checkpoint(configs[0]["checkpoint"])
    model, tokenizer = load_checkpoint(folder, device=ctx.device)
    if unsupported_reason(model.config):  # an imported model the stacked Llama does not cover
        return {key: run_finetune(cell, key, ctx) for key, cell in members}
    text = ctx.heldout_batches(configs[0])
    batch_size = configs[0]["eval"]["batch_size"]
    tasks = {cfg["task"]: ctx.task(cfg) for cfg in configs}
    parts = {name: (task.heldout_batches(batch_size, VALIDATION), task.heldout_batches(batch_size, TEST))
             for name, task in tasks.items()}
    start = {name: finetune_metrics(model, validation, text, ctx.corpus.byte_lengths, test_batches=test)
             for name, (validation, test) in parts.items()}

    start_capabilities: dict[tuple, dict] = {}  # the base model's, once per (task, seed) they depend on
    rows = {}
    at_once = members_that_fit(model.config, configs[0]["batch_size"], configs[0]["seq_len"], ctx.device)
    for first in range(0, len(members), at_once):
        chunk, chunk_configs = members[first:first + at_once], configs[first:first + at_once]
        stack = StackedLlama.from_models([model] * len(chunk))
        results = train_ensemble(stack, [_finetune_config(cfg) for cfg in chunk_configs],
                                 [_finetune_batches(tasks[cfg["task"]], cfg, ctx, 0.0) for cfg in chunk_configs],
                                 evaluate=lambda stack, alive: stacked_finetune_metrics(
                                     stack, [chunk_configs[m]["task"] for m in alive], parts, text, ctx.corpus.byte_lengths),
                                 evaluate_every=configs[0]["eval_every"],
                                 description=_job_description([cell for _, cell in chunk],
                                                              f"fine-tunes of {configs[0]['checkpoint']}"))
        finished = [m for m, result in enumerate(results) if not result.diverged]  # the stack's rows, in order
        for member, ((key, _), cfg, result) in enumerate(zip(chunk, chunk_configs, results)):
            capabilities = _capabilities(cfg, tasks[cfg["task"]], tokenizer)
            alike = (cfg["task"], cfg["seed"])
            if alike not in start_capabilities:
                start_capabilities[alike] = capabilities(model)
            before = {"step": 0, **start[cfg["task"]], **start_capabilities[alike]}
            after = [] if result.diverged else [
                {"step": result.steps_done, **capabilities(stack.member_model(finished.index(member)))}]
            rows[key] = _finetune_rows(_finetune_columns(cfg, folder), before, result, after)
    return rows


def _finetune_config(cfg: dict, l2_to_start: float = 0.0) -> TrainConfig:
    return TrainConfig(steps=cfg["steps"], weight_decay=cfg["weight_decay"], l2_to_start=l2_to_start,
                       schedule=Schedule("linear", cfg["lr"], cfg["steps"], cfg["warmup_steps"]))


def _finetune_columns(cfg: dict, folder: Path) -> dict:
    mitigation = cfg["mitigation"] or {}
    return {**checkpoint_columns(cfg, folder), "task": cfg["task"], "lr": cfg["lr"], "seed": cfg["seed"],
            "mitigation": "none" if not mitigation else "{}={:g}".format(*next(iter(mitigation.items())))}


def _capabilities(cfg: dict, task: TokenizedTask, tokenizer):
    return partial(capability_metrics, tokenizer=tokenizer, task=task, benchmarks=cfg["benchmarks"],
                   benchmark_limit=cfg["benchmark_limit"], seed=cfg["seed"])


def _finetune_rows(columns: dict, before: dict, result: TrainResult, after: list[dict]) -> list[dict]:
    """A fine-tuning run's rows: every measure at every step it was taken, its divergence, its last loss."""
    rows = [{"step": ev["step"], "metric": name, "value": value}
            for ev in [before, *result.evaluations, *after] for name, value in ev.items() if name != "step"]
    if result.diverged:
        rows.append({"metric": "diverged_at_step", "value": result.diverged_at_step})
    rows.append({"metric": "train_loss_nats", "step": result.steps_done, "value": result.last_loss})
    return [{**columns, **row} for row in rows]


def _finetune_batches(task: TokenizedTask, cfg: dict, ctx: StudyContext, replay: float) -> Iterator[dict]:
    batches = task.batches(cfg["batch_size"], cfg["seed"])
    if not replay:
        return batches
    pretraining = ctx.corpus.train_batches(cfg["batch_size"], cfg["text_seq_len"], seed=cfg["seed"] + 1)
    return with_replay(batches, pretraining, replay, task.pad_id)


RUNNERS = {"pretrain": run_pretrain, "import": run_import, "probe": run_probe, "finetune": run_finetune}
ENSEMBLE_RUNNERS = {"pretrain": run_pretrain_ensemble, "finetune": run_finetune_ensemble}


def is_diverged(rows: list[dict]) -> bool:
    return any(row["metric"] == "diverged_at_step" for row in rows)
