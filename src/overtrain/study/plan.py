"""From a study spec to cells: units of work with their configs and dependencies.

Pre-training cells make checkpoints (or, in a study of existing checkpoints, import
cells copy each one into the run folder); probe and fine-tune cells read one checkpoint.
- cosine: one run per budget, annealed to zero at that budget.
- constant: one run at the peak LR, saved at every budget (and at the points wsd
  branches leave from, with its optimizer state).
- wsd: per budget B, a branch that leaves the constant run at (1 - f) * B tokens and
  decays linearly to zero at B, so decayed and undecayed checkpoints meet at B.

A cell's config holds every input of the study that changes its result, and nothing
else: cells read only their config, the prepared corpus and the checkpoint they start
from (both named by content in the cell's key), so an edit reruns exactly the cells
it changes (tests/test_cell_keys.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from overtrain.data.tasks import task_file
from overtrain.errors import SpecError
from overtrain.models.checkpoints import read_manifest
from overtrain.models.series import SeriesCheckpoint
from overtrain.spec import StudySpec

SERIES = "series"  # the `schedule` of checkpoints that are not ours: how they were trained is not known
MONITORED = "monitored"  # the `schedule` of a training run's iterates, measured as it trained (overtrain.monitor)


@dataclass(frozen=True)
class CheckpointRef:
    name: str          # folder name under checkpoints/, e.g. "cosine-1000000"
    schedule: str
    tokens: int
    decayed: bool      # ended in a learning-rate decay (cosine or wsd) or not (constant)
    evaluate: bool = True  # branch points of the constant run are not studied themselves
    pretrain_seed: int = 0  # which independent pre-training run (`pretrain.seeds`) made it


@dataclass(frozen=True)
class Cell:
    kind: str                      # "pretrain", "import", "probe" or "finetune"
    label: str                     # human-readable and unique within a plan
    config: dict
    reads: str | None = None       # checkpoint this cell starts from
    writes: tuple[CheckpointRef, ...] = field(default_factory=tuple)


def steps_for(tokens: int, spec: StudySpec) -> int:
    return tokens // (spec.pretrain.batch_size * spec.pretrain.seq_len)


def trained_tokens(budget: int, spec: StudySpec) -> int:
    """A budget rounded down to whole steps: the tokens a run really sees."""
    return steps_for(budget, spec) * spec.pretrain.batch_size * spec.pretrain.seq_len


def plan_study(spec: StudySpec, series: list[SeriesCheckpoint] | None = None) -> list[Cell]:
    """All cells in an order where every cell comes after the checkpoint it reads.

    series: the study's existing checkpoints, hashed (`overtrain.series.inspect_series`),
    when it has a `checkpoints` section.
    """
    if spec.checkpoints is None:
        _check_budgets(spec)
    makers = _pretrain_cells(spec) if spec.checkpoints is None else _import_cells(series)
    checkpoints = [ref for cell in makers for ref in cell.writes if ref.evaluate]
    cells = list(makers)
    for ref in checkpoints:
        cells.append(Cell("probe", f"probe {ref.name}", _probe_config(spec, ref), reads=ref.name))
    if spec.finetune:
        ft = spec.finetune
        for ref in checkpoints:
            for task in ft.tasks:
                for lr in ft.lrs:
                    for seed in ft.seeds:
                        # A probe switched off stays out of the key: runs made before it existed are reused.
                        off = {"docstring_prompts"} if not ft.docstring_prompts else set()
                        config = {**_checkpoint_context(ref), "task": task, "task_seed": spec.seed, "lr": lr,
                                  "seed": seed, **ft.model_dump(exclude={"tasks", "lrs", "seeds", *off}),
                                  **_text_eval(spec), "along_update": _along_update(spec),
                                  "mitigation": None, "wise": spec.mitigations.wise if spec.mitigations else []}
                        label = f"finetune {ref.name} {task} lr={lr:g} seed={seed}"
                        cells.append(Cell("finetune", label, config, reads=ref.name))
                        for kind, value in _mitigation_variants(spec):
                            cells.append(Cell("finetune", f"{label} {kind}={value:g}",
                                              {**config, "mitigation": {kind: value}, "wise": [], "along_update": None},
                                              reads=ref.name))
    return cells


def pretrain_seeds(spec: StudySpec) -> list[int]:
    """The independent pre-training runs of the study: `pretrain.seeds`, else the study's seed."""
    return spec.pretrain.seeds or [spec.seed]


def _pretrain_cells(spec: StudySpec) -> list[Cell]:
    return [cell for seed in pretrain_seeds(spec) for cell in _pretrain_cells_of_seed(spec, seed)]


def _pretrain_cells_of_seed(spec: StudySpec, seed: int) -> list[Cell]:
    """One pre-training run of every schedule, initialised and fed in the order of `seed`."""
    pre = spec.pretrain
    common = {"model": spec.model.size().__dict__, "tokenizer": spec.tokenizer.model_dump(), "data": spec.data.model_dump(),
              "seed": seed, **pre.model_dump(exclude={"budgets", "schedules", "wsd_decay_fraction", "seeds"})}
    budgets = [trained_tokens(b, spec) for b in pre.budgets]  # names and tokens are whole steps
    # The study seed's run keeps plain names (and so its keys): adding seeds reuses it.
    suffix, of_seed = ("", "") if seed == spec.seed else (f"-seed{seed}", f" seed {seed}")

    def ref(schedule: str, tokens: int, decayed: bool, evaluate: bool = True) -> CheckpointRef:
        return CheckpointRef(f"{schedule}-{tokens}{suffix}", schedule, tokens, decayed, evaluate, seed)

    cells = []
    if "cosine" in pre.schedules:
        for budget in budgets:
            cells.append(Cell("pretrain", f"pretrain cosine {budget:,} tokens{of_seed}",
                              {**common, "schedule": "cosine", "total_tokens": budget, "save_at": [budget]},
                              writes=(ref("cosine", budget, True),)))
    wants_wsd = "wsd" in pre.schedules
    if "constant" in pre.schedules or wants_wsd:
        branch_points = sorted({_branch_point(b, spec) for b in budgets}) if wants_wsd else []
        writes = [ref("constant", b, False) for b in budgets]
        writes += [ref("constant", t, False, evaluate=False) for t in branch_points if t not in set(budgets)]
        cells.append(Cell("pretrain", f"pretrain constant{of_seed}",
                          {**common, "schedule": "constant", "total_tokens": budgets[-1],
                           "save_at": sorted(r.tokens for r in writes), "save_optimizer_at": branch_points},
                          writes=tuple(sorted(writes, key=lambda r: r.tokens))))
    if wants_wsd:
        for budget in budgets:
            start = _branch_point(budget, spec)
            cells.append(Cell("pretrain", f"pretrain wsd branch {start:,}->{budget:,} tokens{of_seed}",
                              {**common, "schedule": "wsd", "total_tokens": budget, "branch_from_tokens": start,
                               "save_at": [budget]},
                              reads=f"constant-{start}{suffix}", writes=(ref("wsd", budget, True),)))
    return cells


def _import_cells(series: list[SeriesCheckpoint]) -> list[Cell]:
    """One cell per existing checkpoint; a repeat of earlier weights is recorded, not studied again."""
    cells = []
    for checkpoint in series:
        ref = CheckpointRef(checkpoint.label, SERIES, checkpoint.tokens, decayed=False)
        config = {"checkpoint": checkpoint.label, "tokens": checkpoint.tokens, "source": checkpoint.source,
                  "path": str(checkpoint.path), "gguf_file": checkpoint.gguf_file,
                  "weights_sha256": checkpoint.weights_sha256, "duplicate_of": checkpoint.duplicate_of,
                  "parameters": checkpoint.extra["parameters"]}
        writes = () if checkpoint.duplicate_of else (ref,)
        cells.append(Cell("import", f"import {checkpoint.label}", config, writes=writes))
    return cells


def _branch_point(budget: int, spec: StudySpec) -> int:
    """Tokens of the stable run where the decay to `budget` starts, on a step boundary."""
    return trained_tokens(round(budget * (1 - spec.pretrain.wsd_decay_fraction)), spec)


def _probe_config(spec: StudySpec, ref: CheckpointRef) -> dict:
    return {**_checkpoint_context(ref), **_text_eval(spec),
            "sensitivity": spec.sensitivity.model_dump() if spec.sensitivity else None,
            "sharpness": spec.sharpness.model_dump(exclude={"along_update"}) if spec.sharpness else None}


def _text_eval(spec: StudySpec) -> dict:
    """How held-out pre-training text is cut and evaluated (the windows' length also serves replay)."""
    return {"eval": spec.eval.model_dump(), "text_seq_len": spec.text_seq_len}


def _mitigation_variants(spec: StudySpec) -> list[tuple[str, float]]:
    """(kind, value) of every retrained variant; WiSE-FT needs no run of its own."""
    mitigations = spec.mitigations
    if mitigations is None:
        return []
    return [(kind, value) for kind in ("l2", "replay", "lora") for value in getattr(mitigations, kind)]


def _along_update(spec: StudySpec) -> dict | None:
    """Curvature along each fine-tuning update: over the first `tokens` held-out tokens, or not measured."""
    return {"tokens": spec.sharpness.tokens} if spec.sharpness and spec.sharpness.along_update else None


def _checkpoint_context(ref: CheckpointRef) -> dict:
    return {"checkpoint": ref.name, "schedule": ref.schedule, "tokens": ref.tokens, "decayed": ref.decayed,
            "pretrain_seed": ref.pretrain_seed}


def _check_budgets(spec: StudySpec) -> None:
    per_step = spec.pretrain.batch_size * spec.pretrain.seq_len
    steps = [steps_for(b, spec) for b in spec.pretrain.budgets]
    if steps[0] < 1:
        raise SpecError(f"pretrain.budgets: {spec.pretrain.budgets[0]} tokens is less than one step "
                        f"(batch_size x seq_len = {per_step} tokens)")
    if len(set(steps)) < len(steps):
        raise SpecError(f"pretrain.budgets: two budgets round to the same number of steps of {per_step} tokens")
    if "wsd" in spec.pretrain.schedules and steps_for(spec.pretrain.budgets[0], spec) * spec.pretrain.wsd_decay_fraction < 1:
        raise SpecError(f"pretrain.wsd_decay_fraction: {spec.pretrain.wsd_decay_fraction} of the first budget is less than one step")
    if "wsd" in spec.pretrain.schedules and _branch_point(spec.pretrain.budgets[0], spec) < spec.pretrain.warmup_tokens:
        # A branch that leaves during warmup never decays: it would be the constant run under another name.
        raise SpecError(f"pretrain.warmup_tokens: {spec.pretrain.warmup_tokens} tokens is past where the wsd branch of the "
                        f"first budget ({spec.pretrain.budgets[0]}) starts to decay; shorten the warmup or raise the budget")


def cell_key(cell: Cell, corpus_id: str, checkpoint_dir: Path) -> str:
    """A hash of everything the cell's result depends on: its config, the prepared corpus, the
    weights it starts from, the content of a user task file, and the versions that matter."""
    task = task_file(cell.config["task"]) if cell.kind == "finetune" else None
    inputs = {
        "kind": cell.kind,
        "config": cell.config,
        "corpus": corpus_id,
        "reads": read_manifest(checkpoint_dir / cell.reads)["weights_sha256"] if cell.reads else None,
        "versions": {package: version(package).split("+")[0] for package in ("overtrain", "torch", "transformers")},
    }
    if task is not None:  # only then: the keys of every other cell stay those of earlier runs
        inputs["task_file"] = hashlib.sha256(task.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
