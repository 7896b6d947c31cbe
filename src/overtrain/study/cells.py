"""What each kind of cell does: pre-train, import an existing checkpoint, probe a checkpoint, fine-tune a checkpoint.

Each function takes a cell and the study context and returns tidy result rows
({metric, value} plus context columns). Checkpoints are written as side effects.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from overtrain.models.checkpoints import CheckpointError, load_checkpoint, load_optimizer_state, read_manifest, save_checkpoint
from overtrain.data.benchmarks import evaluate_mc, load_benchmark
from overtrain.data.corpus import PreparedCorpus
from overtrain.data.tasks import Example, load_task, tokenize_examples
from overtrain.runtime.hashing import weights_sha256
from overtrain.train.mitigations import interpolated, with_lora, with_replay
from overtrain.models.build import ModelSize, build_model, init_stds, parameter_count
from overtrain.probes.curvature import causal_lm_objective, forgetting_prediction, hessian_eigenvalues, hessian_trace
from overtrain.probes.drift import parameter_drift
from overtrain.probes.scoring import math_exact_match, multiple_choice_accuracy
from overtrain.probes.loss import heldout_metrics
from overtrain.probes.perturb import gaussian_sensitivity
from overtrain.probes.residue import docstring_prompts, docstring_rate
from overtrain.probes.sharpness import critical_sharpness, kl_sharpness
from overtrain.train.schedules import Schedule
from overtrain.models.series import SeriesCheckpoint, load_series_model
from overtrain.spec import StudySpec
from overtrain.study.plan import SERIES, Cell
from overtrain.train.loop import TrainConfig, make_optimizer, train


@dataclass
class StudyContext:
    spec: StudySpec
    run_dir: Path
    corpus: PreparedCorpus
    device: torch.device
    _tasks: dict = field(default_factory=dict)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @cached_property
    def heldout_batches(self) -> list[dict[str, torch.Tensor]]:
        ev = self.spec.eval
        return self.corpus.heldout_batches(ev.batch_size, self.spec.text_seq_len, ev.heldout_tokens)

    def curvature_batches(self, tokens: int) -> list[dict[str, torch.Tensor]]:
        """The first `tokens` held-out tokens: the fixed set every curvature probe uses."""
        return self.corpus.heldout_batches(self.spec.eval.batch_size, self.spec.text_seq_len, tokens)

    def pretraining_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        return heldout_metrics(model, self.heldout_batches, self.corpus.byte_lengths)

    def task_data(self, name: str) -> "TokenizedTask":
        if name not in self._tasks:
            ft = self.spec.finetune
            task = load_task(name, seed=self.spec.seed)
            self._tasks[name] = TokenizedTask(
                train=tokenize_examples(task.train, self.corpus.tokenizer, ft.seq_len),
                heldout=tokenize_examples(task.heldout[: ft.eval_examples], self.corpus.tokenizer, ft.seq_len),
                pad_id=self.corpus.tokenizer.pad_token_id,
                scored=task.heldout[: ft.accuracy_examples],
                name=task.name,
                docstring_prompts=docstring_prompts(self.spec.seed, ft.docstring_prompts)
                if ft.docstring_prompts and "heldout_modules" in task.metadata else [],
            )
        return self._tasks[name]


@dataclass
class TokenizedTask:
    train: list[dict]     # {"input_ids": [...], "labels": [...]} with the prompt masked
    heldout: list[dict]
    pad_id: int
    scored: list[Example]  # held-out examples scored for accuracy
    name: str
    docstring_prompts: list[str] = field(default_factory=list)  # held-out function headers (code tasks, probe on)

    def accuracy(self, model, tokenizer) -> dict[str, float]:
        """`id_acc` where it means something: choice log-likelihood, or math exact match."""
        if not self.scored:
            return {}
        if all(e.choices for e in self.scored):
            return {"id_acc": multiple_choice_accuracy(model, tokenizer, self.scored)}
        if self.name == "math":
            return {"id_acc": math_exact_match(model, tokenizer, self.scored)}
        return {}

    def residue(self, model, tokenizer, seed: int) -> dict[str, float]:
        """`docstring_rate` of sampled continuations of held-out function headers, where measured."""
        return {"docstring_rate": docstring_rate(model, tokenizer, self.docstring_prompts, seed)} \
            if self.docstring_prompts else {}

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless seeded batches of training examples, reshuffled every epoch."""
        rng = random.Random(seed)
        order: list[int] = []
        while True:
            if len(order) < batch_size:
                order += rng.sample(range(len(self.train)), len(self.train))
            chosen, order = order[:batch_size], order[batch_size:]
            yield collate([self.train[i] for i in chosen], self.pad_id)

    def heldout_batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        return [collate(self.heldout[i:i + batch_size], self.pad_id) for i in range(0, len(self.heldout), batch_size)]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of the loss.

    No attention mask is needed: with causal attention and padding at the end, no
    real token ever attends to a pad.
    """
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.as_tensor(example["input_ids"])
        labels[row, :n] = torch.as_tensor(example["labels"])
    return {"input_ids": ids, "labels": labels}


# -- pre-training -------------------------------------------------------------------

def run_pretrain(cell: Cell, key: str, ctx: StudyContext) -> list[dict]:
    cfg = cell.config
    per_step = cfg["batch_size"] * cfg["seq_len"]
    total_steps = cfg["total_tokens"] // per_step
    warmup = cfg["warmup_tokens"] // per_step
    tokenizer = ctx.corpus.tokenizer
    model = build_model(ModelSize(**cfg["model"]), len(tokenizer), cfg["seed"], bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).to(ctx.device)
    train_config = TrainConfig(steps=total_steps, weight_decay=cfg["weight_decay"], grad_clip=cfg["grad_clip"],
                               compile=cfg["compile"], schedule=_pretrain_schedule(cfg, total_steps, warmup),
                               sam_rho=cfg["sam_rho"], sam_start_step=total_steps - round(cfg["sam_last_fraction"] * total_steps))
    optimizer = make_optimizer(model, train_config)
    start_step = _resume_point(cell, key, ctx, model, optimizer, per_step)
    save_steps = {ref.tokens // per_step: ref for ref in cell.writes}

    def save(steps_done: int, lr: float) -> None:
        ref = save_steps.get(steps_done)
        if ref is None:
            return
        save_checkpoint(model, tokenizer, ctx.checkpoint_dir / ref.name, {
            "cell": key, "schedule": ref.schedule, "decayed": ref.decayed, "tokens": steps_done * per_step,
            "step": steps_done, "lr_at_save": lr, "peak_lr": cfg["peak_lr"], "parameters": parameter_count(model),
        }, optimizer=optimizer)

    result = train(model, ctx.corpus.train_batches(cfg["batch_size"], cfg["seq_len"], cfg["seed"], start_step),
                   train_config, optimizer=optimizer, start_step=start_step, on_step_end=save, description=cell.label)
    rows = [{"metric": "train_loss_nats", "value": result.last_loss},
            {"metric": "tokens_per_second", "value": result.tokens_per_second},
            {"metric": "parameters", "value": parameter_count(model)}]
    if result.diverged:
        rows.append({"metric": "diverged_at_step", "value": result.diverged_at_step})
    context = {"schedule": cfg["schedule"], "tokens": cfg["total_tokens"]}
    return [{**context, **row} for row in rows]


def _pretrain_schedule(cfg: dict, total_steps: int, warmup: int) -> Schedule:
    kind, peak = cfg["schedule"], cfg["peak_lr"]
    if kind == "wsd":
        branch_step = cfg["branch_from_tokens"] // (cfg["batch_size"] * cfg["seq_len"])
        return Schedule("wsd", peak, total_steps, warmup, decay_start=branch_step)
    return Schedule(kind, peak, total_steps, warmup)


def _resume_point(cell: Cell, key: str, ctx: StudyContext, model, optimizer, per_step: int) -> int:
    """Step to start from: a wsd branch leaves its stable checkpoint; any run continues
    from its own latest checkpoint written by this same cell (same key)."""
    own = [ctx.checkpoint_dir / ref.name for ref in cell.writes]
    finished = [f for f in own if (f / "overtrain.json").exists() and read_manifest(f).get("cell") == key]
    source = max(finished, key=lambda f: read_manifest(f)["step"], default=None)
    if source is None and cell.reads:
        source = ctx.checkpoint_dir / cell.reads
    if source is None:
        return 0
    loaded, _ = load_checkpoint(source)
    model.load_state_dict(loaded.state_dict())
    optimizer.load_state_dict(load_optimizer_state(source))
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
        save_checkpoint(model, tokenizer, ctx.checkpoint_dir / cfg["checkpoint"], {
            "cell": key, "schedule": SERIES, "decayed": False, "tokens": cfg["tokens"], "source": cfg["source"],
            "parameters": cfg["parameters"]})
    return [{"checkpoint": cfg["checkpoint"], "schedule": SERIES, "decayed": 0, "tokens": cfg["tokens"],
             "weights": cfg["weights_sha256"][:16], "duplicate_of": cfg["duplicate_of"], "source": cfg["source"],
             "metric": "parameters", "value": cfg["parameters"]}]


# -- probing ------------------------------------------------------------------------

def run_probe(cell: Cell, key: str, ctx: StudyContext) -> list[dict]:
    cfg = cell.config
    folder = ctx.checkpoint_dir / cfg["checkpoint"]
    model, _ = load_checkpoint(folder, device=ctx.device)
    rows = []
    base = ctx.pretraining_metrics(model)
    rows += [{"metric": name, "value": value} for name, value in base.items()]
    if cfg["sensitivity"]:
        sens = cfg["sensitivity"]
        for entry in gaussian_sensitivity(model, init_stds(model), sens["gammas"], sens["seeds"], ctx.pretraining_metrics)[1:]:
            for metric in ("loss_nats", "bpb"):
                rows.append({"gamma": entry["gamma"], "seed": entry["seed"], "metric": f"perturbed_{metric}", "value": entry[metric]})
                rows.append({"gamma": entry["gamma"], "seed": entry["seed"], "metric": f"delta_{metric}", "value": entry[f"delta_{metric}"]})
    if cfg["sharpness"]:
        rows += sharpness_rows(model, ctx.curvature_batches(cfg["sharpness"]["tokens"]), cfg["sharpness"])
    return [{**checkpoint_columns(cfg, folder), **row} for row in rows]


def sharpness_rows(model: torch.nn.Module, batches: list[dict], options: dict) -> list[dict]:
    """Top Hessian eigenvalues, trace, KL proxy and critical sharpness of the held-out loss."""
    objective = causal_lm_objective(model, batches)
    eigen = hessian_eigenvalues(objective, k=options["top_k"], tol=options["tol"])
    rows = [{"metric": "hessian_top_eig", "value": eigen.eigenvalues[0]},
            {"metric": "hessian_eig_residual", "value": eigen.residuals[0]},
            {"metric": "hessian_eig_hvps", "value": eigen.hvp_count}]
    rows += [{"metric": f"hessian_eig_{rank}", "value": value} for rank, value in enumerate(eigen.eigenvalues[1:], start=2)]
    if options["trace_hvps"]:
        trace = hessian_trace(objective, n_hvps=options["trace_hvps"])
        rows += [{"metric": "hessian_trace", "value": trace.trace}, {"metric": "hessian_trace_se", "value": trace.standard_error}]
    kl = kl_sharpness(model, batches, options["kl_gamma"], options["kl_seeds"], stds=init_stds(model))
    rows += [{"metric": "kl_sharpness", "gamma": kl.gamma, "value": kl.mean},
             {"metric": "kl_sharpness_se", "gamma": kl.gamma, "value": kl.standard_error},
             {"metric": "critical_sharpness", "value": critical_sharpness(objective).sharpness}]
    return rows


def update_rows(base: torch.nn.Module, finetuned: torch.nn.Module, batches: list[dict]) -> list[dict]:
    """Forgetting predicted by the curvature along the fine-tuning update, beside the observed one, and drift."""
    prediction = forgetting_prediction(base, finetuned, batches)
    along = prediction.along_update
    drift = parameter_drift(base, finetuned)
    return [{"metric": "curvature_along_u", "value": along.curvature},
            {"metric": "predicted_forgetting_nats", "value": along.second_order_nats},
            {"metric": "first_order_term_nats", "value": along.first_order_nats},
            {"metric": "observed_forgetting_nats", "value": prediction.observed_forgetting_nats},
            {"metric": "param_drift_l2", "value": drift.distance},
            {"metric": "param_drift_relative", "value": drift.relative}]


def checkpoint_columns(cfg: dict, folder: Path) -> dict:
    return {"checkpoint": cfg["checkpoint"], "schedule": cfg["schedule"], "decayed": int(cfg["decayed"]),
            "tokens": cfg["tokens"], "weights": read_manifest(folder)["weights_sha256"][:16]}


# -- fine-tuning --------------------------------------------------------------------

def run_finetune(cell: Cell, key: str, ctx: StudyContext) -> list[dict]:
    cfg = cell.config
    folder = ctx.checkpoint_dir / cfg["checkpoint"]
    model, tokenizer = load_checkpoint(folder, device=ctx.device)
    mitigation = cfg["mitigation"] or {}
    columns = {**checkpoint_columns(cfg, folder), "task": cfg["task"], "lr": cfg["lr"], "seed": cfg["seed"],
               "mitigation": "none" if not mitigation else "{}={:g}".format(*next(iter(mitigation.items())))}
    task = ctx.task_data(cfg["task"])
    id_batches = task.heldout_batches(cfg["eval"]["batch_size"])
    byte_lengths = ctx.corpus.byte_lengths

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        task_metrics = heldout_metrics(m, id_batches, byte_lengths)
        text_metrics = ctx.pretraining_metrics(m)
        return {"id_loss_nats": task_metrics["loss_nats"], "id_bpb": task_metrics["bpb"],
                "ood_loss_nats": text_metrics["loss_nats"], "ood_bpb": text_metrics["bpb"]}

    def capabilities(m: torch.nn.Module) -> dict[str, float]:
        """Slower measures, taken before and after fine-tuning only."""
        scores = task.accuracy(m, tokenizer) | task.residue(m, tokenizer, cfg["seed"])
        for name in cfg["benchmarks"]:
            result = evaluate_mc(m, tokenizer, load_benchmark(name), limit=cfg["benchmark_limit"])
            scores |= {f"bench_{name}_acc": result["acc"], f"bench_{name}_acc_norm": result["acc_norm"]}
        return scores

    torch.manual_seed(cfg["seed"])
    config = TrainConfig(steps=cfg["steps"], weight_decay=cfg["weight_decay"], l2_to_start=mitigation.get("l2", 0.0),
                         schedule=Schedule("linear", cfg["lr"], cfg["steps"], cfg["warmup_steps"]))
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()} if cfg["wise"] else {}
    before = {"step": 0, **evaluate(model), **capabilities(model)}
    trained = with_lora(model, mitigation["lora"]) if "lora" in mitigation else model
    result = train(trained, _finetune_batches(task, cfg, ctx, mitigation.get("replay", 0.0)), config,
                   evaluate=evaluate, evaluate_every=cfg["eval_every"], description=cell.label)
    if "lora" in mitigation:
        model = trained.merge_and_unload()  # plain weights again, for the measures below
    after = {"step": result.steps_done, **capabilities(model)}
    rows = [{"step": ev["step"], "metric": name, "value": value}
            for ev in [before, *result.evaluations, after] for name, value in ev.items() if name != "step"]
    if cfg["sharpness"] and cfg["sharpness"]["along_update"] and not result.diverged:
        base, _ = load_checkpoint(folder, device=ctx.device)
        rows += [{"step": result.steps_done, **row}
                 for row in update_rows(base, model, ctx.curvature_batches(cfg["sharpness"]["tokens"]))]
    if result.diverged:
        rows.append({"metric": "diverged_at_step", "value": result.diverged_at_step})
    rows.append({"metric": "train_loss_nats", "step": result.steps_done, "value": result.last_loss})
    rows = [{**columns, **row} for row in rows]
    for alpha in cfg["wise"]:
        with interpolated(model, pretrained, alpha):
            measured = {**evaluate(model), **capabilities(model)}
        rows += [{**columns, "mitigation": f"wise={alpha:g}", "step": result.steps_done, "metric": name, "value": value}
                 for name, value in measured.items()]
    return rows


def _finetune_batches(task: "TokenizedTask", cfg: dict, ctx: StudyContext, replay: float) -> Iterator[dict]:
    batches = task.batches(cfg["batch_size"], cfg["seed"])
    if not replay:
        return batches
    pretraining = ctx.corpus.train_batches(cfg["batch_size"], ctx.spec.text_seq_len, seed=cfg["seed"] + 1)
    return with_replay(batches, pretraining, replay, task.pad_id)


RUNNERS = {"pretrain": run_pretrain, "import": run_import, "probe": run_probe, "finetune": run_finetune}


def is_diverged(rows: list[dict]) -> bool:
    return any(row["metric"] == "diverged_at_step" for row in rows)
