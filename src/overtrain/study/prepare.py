"""A study's inputs, prepared and checked before any work: existing checkpoints, cells, corpus, tasks.

Nothing is written to the run folder until every check has passed (the prepared
corpus goes to the user cache, which is safe to share). Each check raises an error
whose message is one line naming the key, file or folder at fault (the CLI prints it
and exits with code 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from overtrain.data.code import mix_in_code
from overtrain.data.corpus import PreparedCorpus, prepare_corpus
from overtrain.data.files import load_documents
from overtrain.data.prose import default_documents
from overtrain.data.splits import split_documents
from overtrain.data.tasks import load_task
from overtrain.errors import CheckpointError, SpecError
from overtrain.models.checkpoints import MANIFEST, check_checkpoint_folder
from overtrain.models.series import SeriesCheckpoint, inspect_series, require_tokens, series_from_sources
from overtrain.probes.harness import check_benchmarks
from overtrain.spec import StudySpec
from overtrain.study.folder import RunFolder
from overtrain.study.plan import Cell, plan_study, trained_tokens
from overtrain.study.store import check_store

# Pre-training may repeat its data at most this many times: up to ~4 epochs, repeated
# tokens are worth almost as much as fresh ones (Muennighoff et al., 2023, "Scaling
# data-constrained language models"); beyond that a budget measures memorisation.
MAX_EPOCHS = 4

# Sections of a study that decide what every stored result means: a run folder holds one of each.
IDENTITY_SECTIONS = ("data", "tokenizer", "model")


@dataclass(frozen=True)
class Prepared:
    cells: list[Cell]
    corpus: PreparedCorpus


def prepare(spec: StudySpec, folder: RunFolder) -> Prepared:
    """The study's cells and prepared corpus, once everything that can reject the input has passed."""
    series, their_tokenizer = _existing_checkpoints(spec)
    cells = plan_study(spec, series)
    check_run_folder(folder.path, spec)
    check_store(folder.store)
    train_docs, heldout_docs = _documents(spec)
    check_documents(spec, train_docs, heldout_docs)
    # Cached under the user cache; a study of existing checkpoints encodes the text in their tokenizer.
    corpus = prepare_corpus(train_docs, heldout_docs, spec.tokenizer.vocab_size, their_tokenizer)
    check_corpus_size(spec, corpus)
    check_tasks(spec)
    check_checkpoints(cells, folder.checkpoints, corpus)
    return Prepared(cells, corpus)


def _existing_checkpoints(spec: StudySpec) -> tuple[list[SeriesCheckpoint] | None, PreTrainedTokenizerBase | None]:
    """The `checkpoints` series, each loaded once (hash, duplicates, checks), and their tokenizer."""
    if spec.checkpoints is None:
        return None, None
    try:
        series = series_from_sources(**spec.checkpoints.sources())
        require_tokens(series)
    except CheckpointError as err:
        raise SpecError(f"checkpoints: {err}") from None
    lengths = {"checkpoints.seq_len": spec.checkpoints.seq_len,
               "finetune.seq_len": spec.finetune.seq_len if spec.finetune else 0}
    longest = max(lengths, key=lengths.get)
    return series, inspect_series(series, lengths[longest], longest)


def _documents(spec: StudySpec) -> tuple[list[str], list[str]]:
    """The corpus' training and held-out documents."""
    data = spec.data
    documents = default_documents() if data.corpus == "default" else load_documents(data.corpus, data.text_field)
    train, heldout = split_documents(documents, data.heldout_fraction, spec.seed)
    if data.max_documents:
        train = train[: data.max_documents]
    if data.code_fraction:
        train = mix_in_code(train, data.code_fraction, spec.seed)
    return train, heldout


def check_run_folder(run_dir: Path, spec: StudySpec) -> None:
    """The folder is new, or holds this study (or an edit of it that keeps its data, tokenizer and model)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise SpecError(f"{run_dir}: output folder is a file")
    saved = RunFolder(run_dir).study
    if not saved.exists():
        return
    previous = json.loads(saved.read_text())
    current = spec.model_dump(mode="json")
    for section in IDENTITY_SECTIONS:
        if previous.get(section) != current[section]:
            raise SpecError(f"{run_dir}: holds a study with a different `{section}` section; use another --out folder")


def check_documents(spec: StudySpec, train: list[str], heldout: list[str]) -> None:
    for split, documents in (("training", train), ("held-out", heldout)):
        if not any(doc.strip() for doc in documents):
            raise SpecError(f"data.corpus: {spec.data.corpus}: the {split} split has no text")


def check_corpus_size(spec: StudySpec, corpus: PreparedCorpus) -> None:
    """Enough training tokens for the largest budget, enough held-out tokens for one sequence."""
    available = len(corpus.train)
    largest = trained_tokens(spec.pretrain.budgets[-1], spec) if spec.pretrain else 0
    if largest > MAX_EPOCHS * available:
        raise SpecError(f"pretrain.budgets: the largest budget ({largest:,} tokens) is {largest / available:.1f} epochs "
                        f"of the training split of {spec.data.corpus} ({available:,} tokens), more than the "
                        f"{MAX_EPOCHS} allowed; use a larger corpus or smaller budgets")
    if len(corpus.heldout) < spec.text_seq_len:
        key = "pretrain.seq_len" if spec.pretrain else "checkpoints.seq_len"
        raise SpecError(f"data.heldout_fraction: the held-out split of {spec.data.corpus} has {len(corpus.heldout)} "
                        f"tokens, fewer than one sequence of {key}={spec.text_seq_len}")


def check_tasks(spec: StudySpec) -> None:
    """Every fine-tuning task loads (a malformed task file fails here, naming its line), and every
    `lm_eval:TASK` benchmark is a task lm-eval (installed) knows or a task file."""
    for task in spec.finetune.tasks if spec.finetune else []:
        load_task(task, seed=spec.seed)
    check_benchmarks(spec.finetune.benchmarks if spec.finetune else [], "finetune.benchmarks")


def check_checkpoints(cells: list[Cell], checkpoint_dir: Path, corpus: PreparedCorpus) -> None:
    """Checkpoints already in the run folder are whole and speak the study's tokenizer.

    Checkpoints are written atomically, so a finished one missing its weights or
    config, or holding another tokenizer, was changed by hand: refuse to build on it.
    """
    vocabulary = corpus.tokenizer.get_vocab()
    for name in sorted({ref.name for cell in cells for ref in cell.writes}):
        folder = checkpoint_dir / name
        if not (folder / MANIFEST).exists():
            continue  # never finished: its pre-training cell writes it
        check_checkpoint_folder(folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{folder}: tokenizer files do not load ({str(err).splitlines()[0]})") from None
        if tokenizer.get_vocab() != vocabulary:
            raise CheckpointError(f"{folder}: its tokenizer ({len(tokenizer)} tokens) does not match the study's "
                                  f"({len(corpus.tokenizer)} tokens); use another --out folder")
