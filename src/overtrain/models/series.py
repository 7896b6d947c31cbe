"""Checkpoint series that are not ours: local HF folders, hub revisions, GGUF files.

Each checkpoint gets its pre-training token count (given, from a manifest, or parsed
from the revision or folder name), the commit it resolved to (hub), and the sha256
of its weights, so that two revisions holding identical weights are flagged instead
of being studied as two points (public suites have shipped such duplicates).

Where the tokens come from, first match wins:
1. `tokens` given by the user (label, folder name, revision or GGUF stem -> tokens).
2. overtrain folders: the `tokens` field of `overtrain.json`.
3. HF Trainer folders (`checkpoint-N`): `num_input_tokens_seen` of `trainer_state.json`
   (the Trainer writes 0 there unless `include_num_input_tokens_seen` is on), else its
   `global_step` times the `tokens_per_step` the user gives.
4. OLMo `step{N}-tokens{M}B` and OLMo-2 `stage1-step{N}-tokens{M}B` names: M billion tokens.
5. A step in the name (`checkpoint-N`, `global_stepN`, `...stepN`) times `tokens_per_step`;
   Pythia's 2,097,152 (1,024 sequences of 2,048 tokens) is that value for hub repositories
   whose id names Pythia, and only for them: `global_step19500` or `my-run-step1000` elsewhere
   are steps of unknown size, and `require_tokens` asks for them.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from overtrain.models.build import parameter_count
from overtrain.models.checkpoints import MANIFEST, CheckpointError, check_checkpoint_folder
from overtrain.runtime.hashing import weights_sha256

PYTHIA_TOKENS_PER_STEP = 1024 * 2048
TRAINER_STATE = "trainer_state.json"  # what the HF Trainer saves in every checkpoint-N folder
_OLMO = re.compile(r"(?:^|[-_/])step(?P<step>\d+)-tokens(?P<amount>\d+(?:\.\d+)?)(?P<unit>[MBT])(?:$|[-_/])")
_STEP = re.compile(r"(?:^|[-_/])(?:checkpoint-|(?:global_)?step)(?P<step>\d+)$")
_UNITS = {"M": 10**6, "B": 10**9, "T": 10**12}
# Hub files of a checkpoint: config, tokenizer, trainer state and safetensors weights; PyTorch
# pickles (`*.bin`) only for a revision that has no safetensors, never both.
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]
_HUB_PICKLED_WEIGHTS = ["*.bin"]


@dataclass
class SeriesCheckpoint:
    label: str                    # what plots and tables call it
    tokens: int | None            # pre-training tokens
    path: Path                    # local folder holding config and weights
    repo_id: str | None = None    # hub model id
    revision: str | None = None   # hub revision asked for
    commit: str | None = None     # commit that revision resolved to
    gguf_file: str | None = None  # file name inside `path` for GGUF checkpoints
    weights_sha256: str | None = None
    duplicate_of: str | None = None  # label of an earlier checkpoint with identical weights
    extra: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        """Where the weights come from, pinned: the hub commit, or the file or folder."""
        if self.commit:
            return f"{self.repo_id}@{self.revision} (commit {self.commit})"
        return str(self.path / self.gguf_file) if self.gguf_file else str(self.path)


def step_from_name(name: str) -> int | None:
    """The optimizer step a folder or revision name ends with (`checkpoint-N`, `global_stepN`, `stepN`)."""
    match = _STEP.search(name)
    return int(match["step"]) if match else None


def tokens_from_name(name: str, tokens_per_step: int | None = None) -> int | None:
    """Pre-training tokens a revision or folder name tells: OLMo's token count, else its step
    times `tokens_per_step` when that is known."""
    match = _OLMO.search(name)
    if match:
        return int(float(match["amount"]) * _UNITS[match["unit"]])
    step = step_from_name(name)
    return step * tokens_per_step if step is not None and tokens_per_step else None


def hub_tokens_per_step(repo_id: str) -> int | None:
    """Tokens per step of a hub repository's `step{N}` revisions where the suite is known: Pythia's."""
    return PYTHIA_TOKENS_PER_STEP if "pythia" in repo_id.lower() else None


def trainer_state_tokens(folder: Path, tokens_per_step: int | None = None) -> int | None:
    """Tokens an HF Trainer checkpoint folder had seen: `num_input_tokens_seen` of its
    trainer_state.json where counted, else `global_step` x `tokens_per_step`; None without one."""
    path = folder / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        seen, step = int(state.get("num_input_tokens_seen") or 0), int(state.get("global_step") or 0)
    except (ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a trainer state ({err})".splitlines()[0]) from None
    if seen > 0:
        return seen
    return step * tokens_per_step if step and tokens_per_step else None


def _tokens(folder: Path, names: list[str], tokens: dict[str, int], tokens_per_step: int | None) -> int | None:
    """A checkpoint's tokens: given under one of its `names`, else from its files, else from its name."""
    for name in names:
        if name in tokens:
            return tokens[name]
    counted = json.loads((folder / MANIFEST).read_text()).get("tokens") if (folder / MANIFEST).exists() else None
    if counted is None:
        counted = trainer_state_tokens(folder, tokens_per_step)
    return counted if counted is not None else tokens_from_name(names[-1], tokens_per_step)


def require_tokens(series: list[SeriesCheckpoint]) -> None:
    """Ask, in one line, for the tokens of the first checkpoint whose tokens are unknown."""
    for checkpoint in series:
        if checkpoint.tokens is None:
            name = checkpoint.revision or checkpoint.label
            step = step_from_name(name)
            instead = f", or checkpoints.tokens_per_step (its step: {step})" if step is not None else ""
            raise CheckpointError(f"{checkpoint.label}: pre-training tokens unknown (no count in {MANIFEST} or "
                                  f"{TRAINER_STATE}, none in its name); give them in checkpoints.tokens "
                                  f"({name}: N){instead}")


def series_from_folders(pattern_or_paths: str | list[str], tokens: dict[str, int] | None = None,
                        tokens_per_step: int | None = None) -> list[SeriesCheckpoint]:
    """HF folders from a glob or a list; tokens given, from their files, or from their names."""
    paths = sorted(glob.glob(pattern_or_paths)) if isinstance(pattern_or_paths, str) else list(pattern_or_paths)
    if not paths:
        raise CheckpointError(f"{pattern_or_paths}: no checkpoint folders match")
    series = []
    for raw in paths:
        path = Path(raw)
        check_checkpoint_folder(path)
        count = _tokens(path, [str(raw), path.name], tokens or {}, tokens_per_step)
        series.append(SeriesCheckpoint(label=path.name, tokens=count, path=path))
    return _sorted(series)


def series_from_hub(repo_id: str, revisions: list[str], tokens: dict[str, int] | None = None,
                    cache_dir: str | Path | None = None, tokens_per_step: int | None = None) -> list[SeriesCheckpoint]:
    """Hub revisions, downloaded (or read from the local HF cache when HF_HUB_OFFLINE=1).

    The commit each revision resolved to is kept, so results pin the exact weights.
    """
    tokens_per_step = tokens_per_step or hub_tokens_per_step(repo_id)
    series = []
    for revision in revisions:
        folder = _download(repo_id, revision, cache_dir)
        series.append(SeriesCheckpoint(label=f"{repo_id.split('/')[-1]}@{revision}", path=folder,
                                       tokens=_tokens(folder, [revision], tokens or {}, tokens_per_step),
                                       repo_id=repo_id, revision=revision, commit=folder.name))
    return _sorted(series)


def _download(repo_id: str, revision: str, cache_dir: str | Path | None) -> Path:
    """The snapshot folder of one revision: safetensors weights, or `.bin` ones where it has none."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        for patterns in (_HUB_FILES, _HUB_FILES + _HUB_PICKLED_WEIGHTS):
            folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=offline,
                                            cache_dir=cache_dir, allow_patterns=patterns))
            if any(folder.glob("*.safetensors")):
                break
    except Exception as err:  # noqa: BLE001 - hub errors come in many classes; name the revision
        raise CheckpointError(f"{repo_id}@{revision}: cannot resolve ({type(err).__name__}: {err})".splitlines()[0]) from None
    return folder


def gguf_checkpoint(path: str | Path, tokens: int | None = None) -> SeriesCheckpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    return SeriesCheckpoint(label=path.stem, tokens=tokens, path=path.parent, gguf_file=path.name)


def series_from_sources(folders: str | list[str] = (), hub: str | None = None, revisions: list[str] = (),
                        gguf: list[str] = (), tokens: dict[str, int] | None = None,
                        cache_dir: str | Path | None = None, tokens_per_step: int | None = None) -> list[SeriesCheckpoint]:
    """One series from any mix of local folders (a glob or a list), hub revisions and GGUF files.

    `tokens` maps a checkpoint's label, folder name, revision or GGUF file stem to its
    pre-training tokens, for names and files that do not tell; `tokens_per_step` turns
    a known step (trainer_state.json, or the name) into tokens.
    """
    tokens = tokens or {}
    series = series_from_folders(folders, tokens, tokens_per_step) if folders else []
    if hub:
        series += series_from_hub(hub, list(revisions), tokens, cache_dir, tokens_per_step)
    for file in gguf:
        series.append(gguf_checkpoint(file, tokens.get(Path(file).stem, tokens.get(str(file)))))
    return _one_series(series)


def resolve_series(models: list[str], revisions: list[str] = (), tokens_per_step: int | None = None) -> list[SeriesCheckpoint]:
    """The checkpoints named on a command line: folders, globs, .gguf files, 'smollm2', or one hub
    id with several revisions."""
    if len(revisions) > 1:
        if len(models) != 1:
            raise CheckpointError(f"--revision: several revisions need exactly one hub id, got {len(models)} models")
        return series_from_hub(models[0], list(revisions), tokens_per_step=tokens_per_step)
    series = []
    for model in models:
        if glob.has_magic(model):
            series += series_from_folders(model, tokens_per_step=tokens_per_step)
        else:
            series.append(resolve_model(model, revisions[0] if revisions else None, tokens_per_step))
    return _one_series(series)


def resolve_model(model: str, revision: str | None = None, tokens_per_step: int | None = None) -> SeriesCheckpoint:
    """A checkpoint from a folder, a .gguf file, 'smollm2' (the packaged GGUF) or a hub id."""
    if model == "smollm2":
        from overtrain.data.packages import SMOLLM2, SMOLLM2_GGUF, package_root

        return gguf_checkpoint(package_root(SMOLLM2) / SMOLLM2_GGUF)
    path = Path(model)
    if path.suffix == ".gguf":
        return gguf_checkpoint(path)
    if path.is_dir():
        return series_from_folders([str(path)], tokens_per_step=tokens_per_step)[0]
    return series_from_hub(model, [revision or "main"], tokens_per_step=tokens_per_step)[0]


def load_series_model(checkpoint: SeriesCheckpoint, device: str = "cpu"):
    """(model, tokenizer) in float32; GGUF weights are dequantized on load.

    A tokenizer without a padding token pads with end-of-text: padding is masked out
    of every loss, so which id fills it does not matter.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": checkpoint.gguf_file} if checkpoint.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype="float32", **kwargs).to(device)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path, **kwargs)
    if tokenizer.eos_token_id is None:
        raise CheckpointError(f"{checkpoint.source}: its tokenizer has no end-of-text token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def inspect_series(series: list[SeriesCheckpoint], context_tokens: int, context_key: str):
    """Load every checkpoint once: hash it, count its parameters, flag duplicates, and check
    that all share one tokenizer and take `context_tokens` tokens; return that tokenizer.

    A study evaluates every checkpoint on text in that one tokenizer, so it must be theirs.
    """
    shared = None
    for checkpoint in series:
        try:
            model, tokenizer = load_series_model(checkpoint)
        except (OSError, ValueError) as err:  # transformers says what is wrong in its first line
            raise CheckpointError(f"{checkpoint.source}: does not load ({str(err).strip().splitlines()[0]})") from None
        checkpoint.weights_sha256 = weights_sha256(model)
        checkpoint.extra["parameters"] = parameter_count(model)
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None and context < context_tokens:
            raise CheckpointError(f"{context_key}={context_tokens}: longer than the {context} tokens "
                                  f"{checkpoint.label} takes")
        del model
        shared = shared or tokenizer
        if tokenizer.get_vocab() != shared.get_vocab():
            raise CheckpointError(f"{checkpoint.source}: its tokenizer ({len(tokenizer)} tokens) differs from "
                                  f"{series[0].label}'s ({len(shared)} tokens); a series needs one tokenizer")
    hash_and_flag_duplicates(series)
    return shared


def hash_and_flag_duplicates(series: list[SeriesCheckpoint]) -> list[SeriesCheckpoint]:
    """Fill in every checkpoint's weight hash and mark repeats of an earlier checkpoint."""
    first_with_hash: dict[str, str] = {}
    for checkpoint in series:
        if checkpoint.weights_sha256 is None:
            model, _ = load_series_model(checkpoint)
            checkpoint.weights_sha256 = weights_sha256(model)
            del model
        first = first_with_hash.setdefault(checkpoint.weights_sha256, checkpoint.label)
        checkpoint.duplicate_of = first if first != checkpoint.label else None
    return series


def _one_series(series: list[SeriesCheckpoint]) -> list[SeriesCheckpoint]:
    """Sorted by tokens; labels name results and folders, so they must differ."""
    labels = [c.label for c in series]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise CheckpointError(f"two checkpoints share the name {repeated[0]}: rename one folder or file")
    return _sorted(series)


def _sorted(series: list[SeriesCheckpoint]) -> list[SeriesCheckpoint]:
    # Tokens unknown: by the step in the name, so that checkpoint-500 comes before checkpoint-1000.
    return sorted(series, key=lambda c: (c.tokens is None, c.tokens or 0, step_from_name(c.revision or c.label) or 0,
                                         c.label))
