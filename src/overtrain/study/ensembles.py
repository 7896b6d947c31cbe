"""Which cells run together as one ensemble job (train/ensemble.py), and how many at once.

Fine-tunes of one checkpoint that differ only in what an ensemble lets members differ
in (learning rate, seed, task of the same sequence length, weight decay, warmup) are
one computation with K members; so are pre-training runs that differ only in their seed.
A fine-tune with a mitigation, a WiSE interpolation or the along-update probe, and
pre-training with SAM, train alone. Ensembles are an implementation detail: each member
keeps its own key and rows, exactly as if it had run alone, so the store, resume and
analysis do not see them; a killed ensemble job reruns whole.
"""

from __future__ import annotations

import json
import math

import torch

from overtrain.study.plan import Cell

# Config keys in which members of one ensemble may differ, by kind of cell; every other key
# must match (a fine-tune's task split seed too: a job holds one tokenized split per task name).
MEMBER_KEYS = {"finetune": frozenset({"lr", "seed", "task", "weight_decay", "warmup_steps"}),
               "pretrain": frozenset({"seed"})}

# Members per job when the user does not say. On a GPU one tiny model leaves the device
# idle and K members fill it. On a CPU a job computes its members one after another
# (`models/stacked.pass_shape`), so K only sets how much work a job amortizes its
# compilation and evaluation set-up over, and how much a killed job reruns.
DEFAULT_MEMBERS = {"cpu": 16, "cuda": 256}


def default_members(device: str) -> int:
    """Members per job for the study's `device` setting, read as written: the process that
    schedules (a Ray driver) need not have the GPU its workers have."""
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return DEFAULT_MEMBERS["cuda" if on_gpu else "cpu"]


def signature(cell: Cell) -> str | None:
    """What cells must share to train as one ensemble; None for a cell that trains alone."""
    cfg = cell.config
    if cell.kind == "finetune":
        alone = cfg["mitigation"] or cfg["wise"] or cfg["along_update"]
    elif cell.kind == "pretrain":
        alone = cfg["sam_rho"] > 0
    else:
        alone = True
    if alone:
        return None
    shared = {k: v for k, v in cfg.items() if k not in MEMBER_KEYS[cell.kind]}
    return json.dumps({"kind": cell.kind, **shared}, sort_keys=True, default=str)


def trains_as_ensemble(job: list[Cell], max_members: int) -> bool:
    """Whether a job goes through the ensemble path (also with one member: the stacked model's
    compiled step is faster than a model's own) or runs its one cell as `study/cells.py` does."""
    return max_members > 1 and signature(job[0]) is not None


def group_jobs(ready: list[Cell], slots: int, max_members: int) -> list[list[Cell]]:
    """The ready cells as jobs, in the order of their first cell: compatible cells share a job,
    split evenly over the executor's slots (so that every worker gets a share) and at most
    `max_members` to a job.

    The split depends on the cells and the slots only, never on timing, so that a study run
    twice groups its cells the same way: with one torch thread a member's numbers do not
    depend on its companions at all (models/stacked.py), with several they may in the last bit."""
    jobs: list[list[Cell]] = []
    groups: dict[str, list[Cell]] = {}
    for cell in ready:
        key = signature(cell) if max_members > 1 else None
        if key is None:
            jobs.append([cell])
        elif key in groups:
            groups[key].append(cell)
        else:
            groups[key] = [cell]
            jobs.append(groups[key])  # filled in place as later cells join
    split = []
    for job in jobs:
        size = max(1, min(max_members, math.ceil(len(job) / max(1, slots))))
        split += [job[i:i + size] for i in range(0, len(job), size)]
    return split
