"""Checkpoint series that are not ours: local HF folders, hub revisions, GGUF files.

Each checkpoint gets its pre-training token count (given, from a manifest, or parsed
from the revision or folder name), the commit it resolved to (hub), and the sha256
of its weights, so that two revisions holding identical weights are flagged instead
of being studied as two points (public suites have shipped such duplicates).

Naming understood:
- Pythia `step{N}`: N x 2,097,152 tokens (1,024 sequences of 2,048 tokens a step).
- OLMo `step{N}-tokens{M}B` and OLMo-2 `stage1-step{N}-tokens{M}B`: M billion tokens.
- overtrain folders: the `tokens` field of `overtrain.json`.
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
_OLMO = re.compile(r"(?:^|[-_/])step(?P<step>\d+)-tokens(?P<amount>\d+(?:\.\d+)?)(?P<unit>[MBT])(?:$|[-_/])")
_PYTHIA = re.compile(r"(?:^|[-_/])step(?P<step>\d+)$")
_UNITS = {"M": 10**6, "B": 10**9, "T": 10**12}


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


def tokens_from_name(name: str) -> int | None:
    """Pre-training tokens encoded in a revision or folder name, if any."""
    match = _OLMO.search(name)
    if match:
        return int(float(match["amount"]) * _UNITS[match["unit"]])
    match = _PYTHIA.search(name)
    if match:
        return int(match["step"]) * PYTHIA_TOKENS_PER_STEP
    return None


def series_from_folders(pattern_or_paths: str | list[str], tokens: dict[str, int] | None = None) -> list[SeriesCheckpoint]:
    """HF folders from a glob or a list; tokens given, from overtrain.json, or from the name."""
    paths = sorted(glob.glob(pattern_or_paths)) if isinstance(pattern_or_paths, str) else list(pattern_or_paths)
    if not paths:
        raise CheckpointError(f"{pattern_or_paths}: no checkpoint folders match")
    series = []
    for raw in paths:
        path = Path(raw)
        check_checkpoint_folder(path)
        count = (tokens or {}).get(str(raw), (tokens or {}).get(path.name))
        if count is None and (path / MANIFEST).exists():
            count = json.loads((path / MANIFEST).read_text()).get("tokens")
        if count is None:
            count = tokens_from_name(path.name)
        series.append(SeriesCheckpoint(label=path.name, tokens=count, path=path))
    return _sorted(series)


def series_from_hub(repo_id: str, revisions: list[str], tokens: dict[str, int] | None = None,
                    cache_dir: str | Path | None = None) -> list[SeriesCheckpoint]:
    """Hub revisions, downloaded (or read from the local HF cache when HF_HUB_OFFLINE=1).

    The commit each revision resolved to is kept, so results pin the exact weights.
    """
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    series = []
    for revision in revisions:
        try:
            folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=offline, cache_dir=cache_dir,
                                            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.bin"]))
        except Exception as err:  # noqa: BLE001 - hub errors come in many classes; name the revision
            raise CheckpointError(f"{repo_id}@{revision}: cannot resolve ({type(err).__name__}: {err})".splitlines()[0]) from None
        count = (tokens or {}).get(revision, tokens_from_name(revision))
        series.append(SeriesCheckpoint(label=f"{repo_id.split('/')[-1]}@{revision}", tokens=count, path=folder,
                                       repo_id=repo_id, revision=revision, commit=folder.name))
    return _sorted(series)


def gguf_checkpoint(path: str | Path, tokens: int | None = None) -> SeriesCheckpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    return SeriesCheckpoint(label=path.stem, tokens=tokens, path=path.parent, gguf_file=path.name)


def series_from_sources(folders: str | list[str] = (), hub: str | None = None, revisions: list[str] = (),
                        gguf: list[str] = (), tokens: dict[str, int] | None = None,
                        cache_dir: str | Path | None = None) -> list[SeriesCheckpoint]:
    """One series from any mix of local folders (a glob or a list), hub revisions and GGUF files.

    `tokens` maps a checkpoint's label, folder name, revision or GGUF file stem to its
    pre-training tokens, for names and manifests that do not tell.
    """
    tokens = tokens or {}
    series = series_from_folders(folders, tokens) if folders else []
    if hub:
        series += series_from_hub(hub, list(revisions), tokens, cache_dir)
    for file in gguf:
        series.append(gguf_checkpoint(file, tokens.get(Path(file).stem, tokens.get(str(file)))))
    return _one_series(series)


def resolve_series(models: list[str], revisions: list[str] = ()) -> list[SeriesCheckpoint]:
    """The checkpoints named on a command line: folders, globs, .gguf files, 'smollm2', or one hub
    id with several revisions."""
    if len(revisions) > 1:
        if len(models) != 1:
            raise CheckpointError(f"--revision: several revisions need exactly one hub id, got {len(models)} models")
        return series_from_hub(models[0], list(revisions))
    series = []
    for model in models:
        if glob.has_magic(model):
            series += series_from_folders(model)
        else:
            series.append(resolve_model(model, revisions[0] if revisions else None))
    return _one_series(series)


def resolve_model(model: str, revision: str | None = None) -> SeriesCheckpoint:
    """A checkpoint from a folder, a .gguf file, 'smollm2' (the packaged GGUF) or a hub id."""
    if model == "smollm2":
        from overtrain.data.packages import SMOLLM2, SMOLLM2_GGUF, package_root

        return gguf_checkpoint(package_root(SMOLLM2) / SMOLLM2_GGUF)
    path = Path(model)
    if path.suffix == ".gguf":
        return gguf_checkpoint(path)
    if path.is_dir():
        return series_from_folders([str(path)])[0]
    return series_from_hub(model, [revision or "main"])[0]


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
    return sorted(series, key=lambda c: (c.tokens is None, c.tokens or 0, c.label))
