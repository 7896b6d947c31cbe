"""How often each claim says "holds" on simulated studies whose answer is known.

`overtrain power` takes a study's design (budgets, schedules, pre-training seeds,
sensitivity gammas and noise seeds, fine-tuning tasks, LRs, seeds and evaluation
steps) and simulates many studies of it, as the tidy rows a real run writes (see
`simulated_frame`). Each goes through `claims.check_claims`; the share of studies in
which a claim holds is its *false-positive rate* on null studies (no effect
anywhere) and its *power* on effect studies (the effects docs/REPRODUCTION.md
measured, at its sizes). docs/POWER.md says how to read the result.

The simulated curves, in x = tokens / the design's first budget:
- base bpb falls and flattens: BASE_FLOOR + BASE_DROP / x (decayed checkpoints a
  little lower); the bpb under noise of size gamma is base + delta, delta =
  SENSITIVITY * gamma^2, the same for both schedules and flat in tokens (null), or
  lower for constant-LR checkpoints and growing as x^growth (effect);
- task bpb after fine-tuning falls with tokens (no U) and is a bowl in log LR with
  its bottom at the middle LR of the grid (null), moving slowly to smaller LRs as
  tokens grow (effect), so the tuned LR is inside the grid; the task is learned as
  sqrt(step / steps);
- fine-tuning forgets pre-training-text bpb in step with what it learns of the task
  (null: at equal task loss every LR has forgotten the same), or F(lr) =
  FORGETTING_AT_LOWEST_LR * (lr / lowest LR)^0.5 reached as sqrt(step / steps)
  (effect: larger LRs forget more at equal task loss); under the effect decayed
  checkpoints forget DECAYED_EXTRA_FORGETTING more and forgetting grows with ln(x),
  which makes a U after fine-tuning.

Noise is Gaussian: one draw per second-level seed of every checkpoint (noise seed
of a probe, fine-tuning run: a run's luck is the same at each of its evaluations),
independent across checkpoints while the seed ids stay paired across budgets in the
rows; plus, with several pre-training seeds, one draw per (pre-training seed,
budget) shared by every schedule, task and LR of that run. Its sizes are measured on
a run (`measure_noise`) or are the documented defaults below.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import ValidationError
from tqdm.auto import tqdm

from overtrain.analysis import claims
from overtrain.errors import SpecError, StoreError
from overtrain.spec import StudySpec, load_spec
from overtrain.study.folder import RunFolder
from overtrain.study.store import RESULT_COLUMNS, load_results

DEFAULT_SIMULATIONS = 400

# -- noise defaults (bpb, one standard deviation), measured on the paper study -------------
# `overtrain power examples/paper.yaml --noise-from runs/paper` on a run of examples/paper.yaml
# (252 fine-tunes, 3 seeds each; docs/REPRODUCTION.md): pooled within-checkpoint sds.
PROBE_NOISE_BPB = {0.25: 0.0031, 0.5: 0.0091, 0.75: 0.024, 1.0: 0.051}  # by gamma, across noise seeds
OOD_NOISE_BPB = {3e-4: 0.0045, 1e-3: 0.0054, 3e-3: 0.012}  # by LR, final pre-training-text bpb
ID_NOISE_BPB = {3e-4: 0.0053, 1e-3: 0.0059, 3e-3: 0.010}  # by LR, final task bpb (validation part)
PRETRAIN_NOISE_BPB = 0.0  # any bpb across pre-training seeds (one run per budget there: unknown)
DEFAULTS_NOTE = ("defaults measured on the paper study (docs/POWER.md); the pre-training level is 0 unless "
                 "measured with --noise-from a run that has several pre-training seeds")

# -- curves shared by null and effect studies ----------------------------------------------
# The base model's bpb: BASE_FLOOR + BASE_DROP / x. The exponent 1 is what places the
# minima of the perturbed bpb where REPRODUCTION.md found them (wsd: 12.0M, 18.2M, 36.1M
# tokens for gamma 1, 0.75, 0.5; none for 0.25) given the sensitivity growth below;
# BASE_DROP sets the size of every U, chosen so that the rises after fine-tuning come out at
# REPRODUCTION.md's 0.011-0.042 bpb.
BASE_FLOOR_BPB = 2.3
BASE_DROP_BPB = 0.3
# Decayed checkpoints end lower: REPRODUCTION.md's lowest pre-training-text bpb after fine-tuning
# at LR 3e-4, less the forgetting there, is ~2.33 (constant) and ~2.16 (wsd) at the last budget.
DECAY_BONUS_BPB = 0.17
# bpb of a byte-level tokenizer's token in nats: loss_nats = bpb * ln 2 (one byte per token)
NATS_PER_BPB = math.log(2)
# delta_bpb of a decayed checkpoint at the first budget, per gamma^2 (with the growth below
# it puts the wsd minima where REPRODUCTION.md found them); under the effect constant-LR checkpoints
# are less sensitive: KL sharpness 0.0704 vs 0.0866 at the first budget (REPRODUCTION.md).
SENSITIVITY_PER_GAMMA2_BPB = 0.5
CONSTANT_LR_SENSITIVITY_RATIO = 0.0704 / 0.0866
# Forgetting (final minus start pre-training-text bpb) at the grid's lowest LR, and how it
# scales with LR: REPRODUCTION.md's constant-LR checkpoints forget ~0.17 bpb at LR 3e-4,
# ~0.31 at 1e-3 and ~0.56 at 3e-3 (medians over budgets and tasks): about sqrt(LR).
FORGETTING_AT_LOWEST_LR_BPB = 0.17
FORGETTING_LR_EXPONENT = 0.5
# Task bpb: the base model's TASK_FLOOR + TASK_DROP / x, lowered by fine-tuning by
# TASK_LEARNED at the best LR, less TASK_LR_BOWL per squared decade away from it. Levels
# are placeholders (no claim reads them); the bowl is deep enough (0.05 bpb at half a
# decade) that the middle LR wins against ID noise.
TASK_FLOOR_BPB = 3.2
TASK_DROP_BPB = 0.3
TASK_LEARNED_BPB = 0.7
TASK_LR_BOWL_BPB = 0.2
# Null forgetting per bpb of task learned: at the bottom of the bowl, the ~0.31 bpb REPRODUCTION.md's
# checkpoints forget at its middle LR (1e-3).
NULL_FORGETTING_PER_TASK_BPB = 0.31 / TASK_LEARNED_BPB

# -- effect sizes: the effects REPRODUCTION.md measured, at its sizes --------------------------
# Claims 1-2. delta_bpb grows as x^growth: KL sharpness (gamma 0.5) grew 0.0866 -> 0.185
# (wsd) and 0.0704 -> 0.0879 (constant) over the paper's 16-fold range of budgets.
SENSITIVITY_GROWTH = {True: math.log(0.185 / 0.0866) / math.log(16), False: math.log(0.0879 / 0.0704) / math.log(16)}
# Claim 4: "median extra forgetting of the decayed checkpoint: +0.117 bpb" (at the first
# budget here; it grows with the forgetting below, as REPRODUCTION.md's wsd forgetting does).
DECAYED_EXTRA_FORGETTING_BPB = 0.117
# Claims 3 and 5: forgetting grows as (1 + FORGETTING_GROWTH * ln x), which puts the
# minimum of the wsd curve at the largest LR at 4x the first budget (REPRODUCTION.md: 25.2M
# of 6.29M) and gives rises of 0.004-0.048 bpb from the minimum to the last budget
# (REPRODUCTION.md: 0.011-0.042) on its grid, whose largest LR is 10x its lowest. No U in task
# bpb: REPRODUCTION.md found no T_ft.
FORGETTING_GROWTH = BASE_DROP_BPB / ((FORGETTING_AT_LOWEST_LR_BPB * 10**FORGETTING_LR_EXPONENT
                                      + DECAYED_EXTRA_FORGETTING_BPB) * 4)

# Claim lr_trend: under the effect the bottom of the task's LR bowl moves as x^LR_TREND_SLOPE, the
# papers' "slowly decreasing" (Springer et al. give no number at this scale; -0.15 keeps it
# inside a grid whose LRs are half a decade apart over a 16-fold range of budgets).
LR_TREND_SLOPE = -0.15

VERDICTS = ("holds", "does not hold", "not testable")


# -- the design --------------------------------------------------------------------------

@dataclass(frozen=True)
class Design:
    """What a study measures: everything that shapes its result rows, and nothing else."""

    tokens: tuple[int, ...]  # trained tokens of each budget (rounded down to whole steps)
    schedules: tuple[str, ...]  # schedules of the checkpoints that are studied
    pretrain_seeds: tuple[int, ...]
    study_seed: int  # its checkpoints keep plain names
    gammas: tuple[float, ...] = ()
    noise_seeds: tuple[int, ...] = ()
    tasks: tuple[str, ...] = ()
    lrs: tuple[float, ...] = ()
    finetune_seeds: tuple[int, ...] = ()
    steps: int = 0
    eval_every: int = 0

    @property
    def eval_steps(self) -> list[int]:
        """The steps a fine-tuning run is evaluated at: before it, every eval_every, at its end."""
        between = range(self.eval_every, self.steps, self.eval_every) if self.eval_every else []
        return sorted({0, *between, self.steps})

    def as_dict(self) -> dict:
        return {name: list(value) if isinstance(value, tuple) else value for name, value in self.__dict__.items()}


def design_of(spec: StudySpec) -> Design:
    """The design of a study that pre-trains its own checkpoints."""
    if spec.pretrain is None:
        raise SpecError("power: simulates studies that pre-train their own checkpoints (`pretrain:`); "
                        "a study of existing checkpoints has no budgets to simulate")
    pre = spec.pretrain
    per_step = pre.batch_size * pre.seq_len  # as study/plan.py: a run sees whole steps
    # The constant run is studied at every budget whenever wsd branches leave from it (study/plan.py).
    studied = [s for s in ("cosine", "constant", "wsd")
               if s in pre.schedules or (s == "constant" and "wsd" in pre.schedules)]
    sensitivity, finetune = spec.sensitivity, spec.finetune
    return Design(
        tokens=tuple(b // per_step * per_step for b in pre.budgets), schedules=tuple(studied),
        pretrain_seeds=tuple(pre.seeds or [spec.seed]), study_seed=spec.seed,
        gammas=tuple(sensitivity.gammas) if sensitivity else (), noise_seeds=tuple(sensitivity.seeds) if sensitivity else (),
        tasks=tuple(finetune.tasks) if finetune else (), lrs=tuple(finetune.lrs) if finetune else (),
        finetune_seeds=tuple(finetune.seeds) if finetune else (), steps=finetune.steps if finetune else 0,
        eval_every=finetune.eval_every if finetune else 0)


def read_study(path: str | Path) -> StudySpec:
    """The study of a study file, or of a run folder (its study.json, as last run)."""
    path = Path(path)
    if not path.is_dir():
        return load_spec(path)
    folder = RunFolder(path)
    if not folder.store.exists() or not folder.study.exists():
        raise StoreError(f"{path}: not a run folder (no results.sqlite and study.json)")
    try:  # validated, not parse_spec: the study's data files need not be reachable from here
        return StudySpec.model_validate(json.loads(folder.study.read_text()))
    except (ValueError, ValidationError) as err:
        raise StoreError(f"{folder.study}: not a study overtrain wrote ({str(err).splitlines()[0]})") from None


# -- the noise -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Noise:
    """Standard deviations (bpb) of the simulated noise; a gamma or LR not listed gets the
    root mean square of the listed ones, an empty table the paper study's (the defaults)."""

    probe: dict[float, float] = field(default_factory=dict)  # per gamma, across noise seeds
    ood: dict[float, float] = field(default_factory=dict)  # per LR, final ood_bpb across fine-tuning seeds
    task: dict[float, float] = field(default_factory=dict)  # per LR, final id_bpb across fine-tuning seeds
    # across pre-training seeds, per family: bpb (base), delta_bpb, ood_bpb, id_bpb (final)
    pretrain: dict[str, float] = field(default_factory=dict)
    source: str = "defaults"
    notes: tuple[str, ...] = ()

    def probe_sd(self, gamma: float) -> float:
        return _look_up(self.probe or PROBE_NOISE_BPB, gamma)

    def ood_sd(self, lr: float) -> float:
        return _look_up(self.ood or OOD_NOISE_BPB, lr)

    def task_sd(self, lr: float) -> float:
        return _look_up(self.task or ID_NOISE_BPB, lr)

    def pretrain_sd(self, family: str) -> float:
        return self.pretrain.get(family, PRETRAIN_NOISE_BPB)

    def used(self, design: Design) -> dict:
        """The standard deviations a simulation of `design` uses, by what they are of."""
        return {"source": self.source, "notes": list(self.notes),
                "probe_bpb_by_gamma": {f"{g:g}": self.probe_sd(g) for g in design.gammas},
                "ood_bpb_by_lr": {f"{lr:g}": self.ood_sd(lr) for lr in design.lrs},
                "id_bpb_by_lr": {f"{lr:g}": self.task_sd(lr) for lr in design.lrs},
                "pretrain_bpb": {family: self.pretrain_sd(family) for family in PRETRAIN_FAMILIES}}


PRETRAIN_FAMILIES = ("bpb", "delta_bpb", "ood_bpb", "id_bpb")


def _look_up(table: dict[float, float], key: float) -> float:
    for listed, sd in table.items():
        if math.isclose(listed, key, rel_tol=1e-9):
            return sd
    return float(np.sqrt(np.mean(np.square(list(table.values())))))


def measure_noise(results: pd.DataFrame, source: str) -> Noise:
    """The noise of a run: pooled within-checkpoint standard deviations across second-level
    seeds, and the spread across pre-training seeds beyond what those explain."""
    plain = _plain_undiverged(results)
    delta = plain[(plain["kind"] == "probe") & (plain["metric"] == "delta_bpb")]
    final = _final_evaluations(plain)
    ood, task = final[final["metric"] == "ood_bpb"], final[final["metric"] == "id_bpb"]
    probe_sd = _pooled_sd(delta, ["checkpoint", "gamma"], "gamma")
    ood_sd, task_sd = (_pooled_sd(t, ["checkpoint", "task", "lr"], "lr") for t in (ood, task))
    notes = [f"{what}: default (the run has no {rows} with two seeds or more)"
             for what, rows, measured in (("probe", "delta_bpb", probe_sd), ("ood_bpb", "fine-tunes", ood_sd),
                                          ("id_bpb", "fine-tunes", task_sd)) if not measured]
    if "pretrain_seed" not in plain or plain["pretrain_seed"].nunique() < 2:
        notes.append("pre-training level: 0 (the run has one pre-training seed, so its spread is unknown)")
        pretrain = {family: 0.0 for family in PRETRAIN_FAMILIES}
    else:
        base = plain[(plain["kind"] == "probe") & (plain["metric"] == "bpb")].assign(seed=0)
        pretrain = {"bpb": _between_pretrain_seeds(base, [], {}),
                    "delta_bpb": _between_pretrain_seeds(delta, ["gamma"], probe_sd),
                    "ood_bpb": _between_pretrain_seeds(ood, ["task", "lr"], ood_sd),
                    "id_bpb": _between_pretrain_seeds(task, ["task", "lr"], task_sd)}
    return Noise(probe_sd, ood_sd, task_sd, pretrain, source, tuple(notes))


def _plain_undiverged(results: pd.DataFrame) -> pd.DataFrame:
    """Rows of plain cells (no mitigation) that did not diverge."""
    plain = results[results["mitigation"].fillna("none") == "none"] if "mitigation" in results else results
    diverged = set(plain.loc[plain["metric"] == "diverged_at_step", "cell"])
    return plain[~plain["cell"].isin(diverged)]


def _final_evaluations(results: pd.DataFrame) -> pd.DataFrame:
    runs = results[(results["kind"] == "finetune") & results["step"].notna()]
    return runs[runs["step"] == runs.groupby("cell")["step"].transform("max")]


def _pooled_sd(rows: pd.DataFrame, cells: list[str], by: str | None) -> dict[float, float]:
    """sqrt of the within-cell variances (ddof 1) pooled over cells, per value of `by` (or all)."""
    if rows.empty:
        return {}
    stats = rows.groupby(cells)["value"].agg(["var", "count"]).reset_index()
    stats = stats[stats["count"] > 1].assign(df=lambda s: s["count"] - 1)
    stats = stats.assign(squares=stats["var"] * stats["df"], key=stats[by].astype(float) if by else 0.0)
    sums = stats.groupby("key")[["squares", "df"]].sum()
    return {float(key): float(np.sqrt(row.squares / row.df)) for key, row in sums.iterrows() if row.df > 0}


def _between_pretrain_seeds(rows: pd.DataFrame, group: list[str], within_sd: dict[float, float]) -> float:
    """The pre-training level: variance of the seed means across pre-training seeds (pooled over
    schedules, budgets and `group`), less the part the second-level noise explains."""
    means = rows.groupby(["schedule", "tokens", "pretrain_seed", *group])["value"].agg(["mean", "count"]).reset_index()
    stats = means.groupby(["schedule", "tokens", *group]).agg(var=("mean", "var"), n=("mean", "count"),
                                                               seeds=("count", "mean")).reset_index()
    stats = stats[stats["n"] > 1]
    if stats.empty:
        return 0.0
    # the second level's noise is per gamma or per LR: the last of `group`
    second_level = stats[group[-1]].map(lambda key: _look_up(within_sd, key) if within_sd else 0.0) ** 2 / stats["seeds"] if group else 0.0
    excess = ((stats["var"] - second_level) * (stats["n"] - 1)).sum() / (stats["n"] - 1).sum()
    return float(np.sqrt(max(excess, 0.0)))


# -- simulated studies -----------------------------------------------------------------------

class _Draws:
    """Hands out blocks of standard normal draws: each row of a study is its mean plus a few draws times their sizes."""

    def __init__(self) -> None:
        self.size = 0

    def block(self, *shape: int) -> np.ndarray:
        start, self.size = self.size, self.size + int(np.prod(shape))
        return np.arange(start, self.size).reshape(shape)


@dataclass
class SimulatedStudies:
    """Result rows of one design without their values, and how to draw them, null or with effects."""

    rows: pd.DataFrame  # context columns and metric of every row
    null_mean: np.ndarray  # bpb space
    effect_mean: np.ndarray
    draw: np.ndarray  # (rows, terms): index of each term's standard normal draw
    size: np.ndarray  # (rows, terms): its standard deviation
    unit: np.ndarray  # 1 for bpb metrics, NATS_PER_BPB for *_loss_nats
    draws: int

    def frame(self, rng: np.random.Generator, effect: bool) -> pd.DataFrame:
        z = rng.standard_normal(self.draws)
        bpb = (self.effect_mean if effect else self.null_mean) + (self.size * z[self.draw]).sum(axis=1)
        return self.rows.assign(value=bpb * self.unit)


def simulated_studies(design: Design, noise: Noise) -> SimulatedStudies:
    """The rows of every study of `design`: built once, then drawn again for each simulated study."""
    draws = _Draws()
    checkpoints = _checkpoints(design)
    n_pre, n_budgets = len(design.pretrain_seeds), len(design.tokens)
    pretrain_luck = {family: draws.block(n_pre, n_budgets) for family in ("bpb", "delta_bpb", "forgetting")}
    task_luck = draws.block(n_pre, n_budgets, len(design.tasks))
    parts = [_base_rows(checkpoints, noise, pretrain_luck["bpb"])]
    if design.gammas:
        parts.append(_sensitivity_rows(checkpoints, design, noise, pretrain_luck, draws))
    if design.tasks:
        parts += _finetune_rows(checkpoints, design, noise, pretrain_luck, task_luck, draws)
    quantities = pd.concat(parts, ignore_index=True)
    metric_rows = pd.concat([quantities.assign(metric=quantities["quantity"] + "_bpb", unit=1.0),
                             quantities.assign(metric=quantities["quantity"] + "_loss_nats", unit=NATS_PER_BPB)],
                            ignore_index=True)
    metric_rows["metric"] = metric_rows["metric"].str.removeprefix("base_")
    terms = sorted(c for c in metric_rows if c.startswith("draw_"))
    sizes = [t.replace("draw_", "size_") for t in terms]
    metric_rows[terms + sizes] = metric_rows[terms + sizes].fillna(0)  # a row with fewer terms: size 0
    rows = metric_rows.reindex(columns=["cell", "kind", *RESULT_COLUMNS, "metric"])
    empty = [c for c in rows if rows[c].isna().all()]
    rows[empty] = rows[empty].astype(object)  # as a column of NULLs comes out of the store
    return SimulatedStudies(
        rows=rows, null_mean=metric_rows["null"].to_numpy(),
        effect_mean=metric_rows["effect"].to_numpy(), draw=metric_rows[terms].to_numpy(dtype=int),
        size=metric_rows[sizes].to_numpy(dtype=float), unit=metric_rows["unit"].to_numpy(),
        draws=draws.size)


def _product(**levels) -> pd.DataFrame:
    return pd.MultiIndex.from_product(list(levels.values()), names=list(levels)).to_frame(index=False)


def _checkpoints(design: Design) -> pd.DataFrame:
    """One row per studied checkpoint, named as study/plan.py names them."""
    frame = _product(pre=range(len(design.pretrain_seeds)), schedule=design.schedules, budget=range(len(design.tokens)))
    frame["pretrain_seed"] = np.asarray(design.pretrain_seeds)[frame["pre"]]
    frame["tokens"] = np.asarray(design.tokens)[frame["budget"]]
    frame["x"] = frame["tokens"] / design.tokens[0]
    frame["decayed"] = (frame["schedule"] != "constant").astype(int)
    suffix = np.where(frame["pretrain_seed"] == design.study_seed, "", "-seed" + frame["pretrain_seed"].astype(str))
    frame["checkpoint"] = frame["schedule"] + "-" + frame["tokens"].astype(str) + suffix
    return frame


def _base_bpb(frame: pd.DataFrame) -> pd.Series:
    return BASE_FLOOR_BPB + BASE_DROP_BPB / frame["x"] - DECAY_BONUS_BPB * frame["decayed"]


def _base_rows(checkpoints: pd.DataFrame, noise: Noise, luck: np.ndarray) -> pd.DataFrame:
    """bpb (and loss_nats) of every checkpoint: one per checkpoint, moved by its pre-training run's luck only."""
    base = _base_bpb(checkpoints)
    return checkpoints.assign(kind="probe", cell="probe " + checkpoints["checkpoint"], quantity="base", null=base,
                              effect=base, draw_0=luck[checkpoints["pre"], checkpoints["budget"]],
                              size_0=noise.pretrain_sd("bpb"))


def _sensitivity_rows(checkpoints: pd.DataFrame, design: Design, noise: Noise, pretrain_luck: dict,
                      draws: _Draws) -> pd.DataFrame:
    """perturbed and delta bpb per (checkpoint, gamma, noise seed); perturbed = base + delta in every draw."""
    rows = checkpoints.merge(_product(gamma=design.gammas, seed=design.noise_seeds), how="cross")
    decayed = rows["decayed"].astype(bool)
    level = SENSITIVITY_PER_GAMMA2_BPB * rows["gamma"] ** 2
    effect = level * np.where(decayed, 1.0, CONSTANT_LR_SENSITIVITY_RATIO) * rows["x"] ** np.where(
        decayed, SENSITIVITY_GROWTH[True], SENSITIVITY_GROWTH[False])
    run, where = draws.block(len(rows)), (rows["pre"], rows["budget"])
    delta = rows.assign(quantity="delta", null=level, effect=effect,
                        draw_0=run, size_0=rows["gamma"].map(noise.probe_sd),
                        draw_1=pretrain_luck["delta_bpb"][where], size_1=noise.pretrain_sd("delta_bpb"))
    base = _base_bpb(rows)
    perturbed = delta.assign(quantity="perturbed", null=base + delta["null"], effect=base + delta["effect"],
                             draw_2=pretrain_luck["bpb"][where], size_2=noise.pretrain_sd("bpb"))
    both = pd.concat([delta, perturbed], ignore_index=True)
    return both.assign(kind="probe", cell="probe " + both["checkpoint"])


def _finetune_rows(checkpoints: pd.DataFrame, design: Design, noise: Noise, pretrain_luck: dict, task_luck: np.ndarray,
                   draws: _Draws) -> list[pd.DataFrame]:
    """ood, id and id_test bpb per fine-tuning run and evaluation step."""
    runs = checkpoints.merge(_product(task=design.tasks, lr=design.lrs, seed=design.finetune_seeds), how="cross")
    runs["cell"] = ("finetune " + runs["checkpoint"] + " " + runs["task"] + " lr=" + runs["lr"].map("{:g}".format)
                    + " seed=" + runs["seed"].astype(str))
    luck = {name: draws.block(len(runs)) for name in ("ood", "id", "id_test")}
    rows = runs.assign(run=np.arange(len(runs))).merge(pd.DataFrame({"step": design.eval_steps}), how="cross")
    done = np.sqrt(rows["step"] / design.steps)  # fine-tuning has its effect early: as sqrt(steps done)
    started = (rows["step"] > 0).astype(float)  # before its first step, a run is its checkpoint
    where = (rows["pre"], rows["budget"])
    base = _base_bpb(rows)
    middle_lr = sorted(design.lrs)[len(design.lrs) // 2]
    learned = {kind: TASK_LEARNED_BPB - TASK_LR_BOWL_BPB * np.log10(rows["lr"] / best_lr) ** 2
               for kind, best_lr in (("null", middle_lr), ("effect", middle_lr * rows["x"] ** LR_TREND_SLOPE))}
    forgetting = FORGETTING_AT_LOWEST_LR_BPB * (rows["lr"] / min(design.lrs)) ** FORGETTING_LR_EXPONENT
    grown = (forgetting + DECAYED_EXTRA_FORGETTING_BPB * rows["decayed"]) * (1 + FORGETTING_GROWTH * np.log(rows["x"]))
    # the spread of final ood bpb across pre-training seeds beyond the base model's
    extra = math.sqrt(max(noise.pretrain_sd("ood_bpb") ** 2 - noise.pretrain_sd("bpb") ** 2, 0.0))
    ood = rows.assign(quantity="ood", null=base + NULL_FORGETTING_PER_TASK_BPB * learned["null"] * done,
                      effect=base + grown * done,
                      draw_0=luck["ood"][rows["run"]], size_0=rows["lr"].map(noise.ood_sd) * started,
                      draw_1=pretrain_luck["bpb"][where], size_1=noise.pretrain_sd("bpb"),
                      draw_2=pretrain_luck["forgetting"][where], size_2=extra * started)
    task_bpb = {kind: TASK_FLOOR_BPB + TASK_DROP_BPB / rows["x"] - DECAY_BONUS_BPB * rows["decayed"] - learned[kind] * done
                for kind in ("null", "effect")}
    task_index = rows["task"].map({task: i for i, task in enumerate(design.tasks)})
    task = {name: rows.assign(quantity=name, null=task_bpb["null"], effect=task_bpb["effect"],
                              draw_0=luck[name][rows["run"]], size_0=rows["lr"].map(noise.task_sd) * started,
                              draw_1=task_luck[rows["pre"], rows["budget"], task_index], size_1=noise.pretrain_sd("id_bpb"))
            for name in ("id", "id_test")}
    return [frame.assign(kind="finetune", mitigation="none") for frame in (ood, task["id"], task["id_test"])]


# -- false-positive rate and power ------------------------------------------------------------

@dataclass(frozen=True)
class ClaimPower:
    claim: str  # its short id
    title: str
    false_positive_rate: float | None  # share of null studies where it holds; None: never testable here
    power: float | None  # share of effect studies where it holds
    simulations: int  # null studies (and as many effect studies)
    null_verdicts: dict[str, int]
    effect_verdicts: dict[str, int]
    reason: str  # why it is never testable in this design, or ""


@dataclass(frozen=True)
class PowerReport:
    claims: list[ClaimPower]
    design: Design
    noise: Noise

    def as_dict(self) -> dict:
        return {"claims": [{"claim": c.claim, "false_positive_rate": c.false_positive_rate, "power": c.power,
                            "simulations": c.simulations} for c in self.claims],
                "verdicts": [{"claim": c.claim, "title": c.title, "null": c.null_verdicts, "effect": c.effect_verdicts,
                              "reason": c.reason} for c in self.claims],
                "design": self.design.as_dict(), "noise": self.noise.used(self.design)}

    def to_text(self) -> str:
        table = pd.DataFrame([{"claim": c.claim, "false_positive_rate": _rate(c.false_positive_rate),
                               "power": _rate(c.power), "simulations": c.simulations,
                               "not testable (null/effect)": f"{c.null_verdicts['not testable']}/{c.effect_verdicts['not testable']}",
                               "title": c.title} for c in self.claims])
        lines = [table.to_string(index=False), ""]
        lines += [f"claim {c.claim} never testable in this design: {c.reason}" for c in self.claims if c.reason]
        design = self.design
        lines.append(f"design: budgets {', '.join(f'{t / 1e6:.3g}M' for t in design.tokens)} tokens; schedules "
                     f"{', '.join(design.schedules)}; pre-training seeds {', '.join(map(str, design.pretrain_seeds))}; gammas "
                     f"{', '.join(f'{g:g}' for g in design.gammas) or 'none'} x {len(design.noise_seeds)} noise seeds; tasks "
                     f"{', '.join(design.tasks) or 'none'} at LRs {', '.join(f'{lr:g}' for lr in design.lrs) or '-'} x "
                     f"{len(design.finetune_seeds)} seeds, {design.steps} steps (evaluated at steps "
                     f"{', '.join(map(str, design.eval_steps)) if design.tasks else '-'})")
        used = self.noise.used(design)
        lines.append(f"noise (bpb, one sd; {used['source']}): probe by gamma {_sds(used['probe_bpb_by_gamma'])}; final "
                     f"ood_bpb by LR {_sds(used['ood_bpb_by_lr'])}; final id_bpb by LR {_sds(used['id_bpb_by_lr'])}; "
                     f"across pre-training seeds {_sds(used['pretrain_bpb'])}")
        lines += [f"  {note}" for note in used["notes"]]
        return "\n".join(lines)


def _rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.3f}"


def _sds(table: dict) -> str:
    return ", ".join(f"{key} {sd:.2g}" for key, sd in table.items()) or "-"


@dataclass
class Tally:
    """Verdicts of the claims over simulated studies: counts per claim (by id) and verdict, titles,
    and the reasons given for "not testable"."""

    verdicts: dict[str, Counter] = field(default_factory=dict)
    reasons: dict[str, Counter] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)

    def add(self, found: list) -> None:
        for claim in found:
            self.titles[claim.id] = claim.title
            self.verdicts.setdefault(claim.id, Counter())[claim.verdict] += 1
            if claim.verdict == "not testable":
                self.reasons.setdefault(claim.id, Counter())[claim.reason] += 1


def count_verdicts(studies: SimulatedStudies, effect: bool, simulations: int, rng: np.random.Generator,
                   bar: tqdm | None = None) -> Tally:
    """Check the claims on `simulations` studies drawn null (effect=False) or with the effects."""
    tally = Tally()
    for _ in range(simulations):
        tally.add(claims.check_claims(studies.frame(rng, effect), intervals=False))
        if bar is not None:
            bar.update()
    return tally


def estimate_power(design: Design, noise: Noise, simulations: int = DEFAULT_SIMULATIONS, seed: int = 0) -> PowerReport:
    """Run `simulations` null and as many effect studies of `design` through the claim checks."""
    studies = simulated_studies(design, noise)
    rng = np.random.default_rng(seed)
    with tqdm(total=2 * simulations, desc="power", unit="study", dynamic_ncols=True) as bar:
        null, effect = (count_verdicts(studies, with_effect, simulations, rng, bar) for with_effect in (False, True))
    return PowerReport([_claim_power(claim, null, effect, simulations) for claim in null.titles], design, noise)


def _claim_power(claim: str, null: Tally, effect: Tally, simulations: int) -> ClaimPower:
    verdicts = {"null": null.verdicts[claim], "effect": effect.verdicts[claim]}
    never_testable = all(counts["not testable"] == simulations for counts in verdicts.values())
    reason = (null.reasons[claim] + effect.reasons[claim]).most_common(1)[0][0] if never_testable else ""
    return ClaimPower(claim, null.titles[claim],
                      None if never_testable else verdicts["null"]["holds"] / simulations,
                      None if never_testable else verdicts["effect"]["holds"] / simulations,
                      simulations, {v: verdicts["null"][v] for v in VERDICTS}, {v: verdicts["effect"][v] for v in VERDICTS},
                      reason)


def power(study: str | Path, noise_from: str | Path | None = None, simulations: int = DEFAULT_SIMULATIONS,
          seed: int = 0) -> PowerReport:
    """False-positive rate and power of every claim for the design of `study` (a study file or a run
    folder), with the noise measured in `noise_from` (default: `study` when it is a run folder, else
    the documented defaults)."""
    if simulations < 1:
        raise SpecError(f"--simulations {simulations}: needs at least one")
    design = design_of(read_study(study))
    measured_in = noise_from if noise_from is not None else study if Path(study).is_dir() else None
    if measured_in is None:
        noise = Noise(notes=(DEFAULTS_NOTE,))
    else:
        noise = measure_noise(load_results(measured_in), f"measured in {measured_in}")
    return estimate_power(design, noise, simulations, seed)
