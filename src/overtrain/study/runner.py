"""Run a study in a run folder: check inputs, prepare data, run the cells not yet done, report.

A cell's key hashes everything that determines its result: its config, the weights
it starts from (sha256 from the checkpoint manifest), the prepared corpus and the
versions that matter. So:
- finished cells (done or diverged) are skipped: a rerun, or an edited study, runs
  only new or changed cells;
- a cell found `running` (its process died) is redone; pre-training continues from
  its own latest checkpoint;
- a cell that raises is recorded as failed and the study goes on
  (`retry_failed` runs it again), except when the disk is full: then the study stops.

This process alone writes the store; executors (execute.py) run cells and return rows.
A cell that reads a checkpoint starts as soon as that checkpoint exists, written by
the current key of the pre-training cell that makes it (the constant run's early
checkpoints are probed while it is still training).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedTokenizerBase

from overtrain import __version__
from overtrain.models.checkpoints import MANIFEST, CheckpointError, read_manifest
from overtrain.data.code import mix_in_code
from overtrain.data.corpus import PreparedCorpus, prepare_corpus
from overtrain.data.sources import default_documents, load_documents, split_documents
from overtrain.models.series import SeriesCheckpoint, inspect_series, series_from_sources
from overtrain.spec import SpecError, StudySpec
from overtrain.study.prepare import (check_checkpoints, check_corpus_size, check_documents, check_run_folder,
                                    check_tasks)
from overtrain.study.cells import is_diverged
from overtrain.study.execute import CellJob, CellOutcome, make_executor
from overtrain.study.plan import Cell, plan_study
from overtrain.study.progress import StudyProgress
from overtrain.study.folder import claimed_run_folder, is_running
from overtrain.study.store import FINISHED, Store
from overtrain.theory.linear import config_from_dict
from overtrain.theory.run import run_theory

STORE_FILE = "results.sqlite"
POLL_SECONDS = 0.5  # how often to look for checkpoints that running cells have just written


class StudyStopped(RuntimeError):
    """The study cannot go on (the disk is full); finished cells are kept."""


def run_study(spec: StudySpec, run_dir: str | Path, retry_failed: bool = False, report: bool = True,
              workers: int = 1, executor: str = "local", address: str | None = None) -> Path:
    """Run or resume `spec` in `run_dir`; `workers` cells at once (0: in this process)."""
    run_dir = Path(run_dir)
    # Everything that can reject the input runs before the first write.
    series, their_tokenizer = _existing_checkpoints(spec)
    cells = plan_study(spec, series)
    check_run_folder(run_dir, spec)
    train_docs, heldout_docs = _documents(spec)
    check_documents(spec, train_docs, heldout_docs)
    # Cached under the user cache; a study of existing checkpoints encodes the text in their tokenizer.
    corpus = prepare_corpus(train_docs, heldout_docs, spec.tokenizer.vocab_size, their_tokenizer)
    check_corpus_size(spec, corpus)
    check_tasks(spec)
    check_checkpoints(cells, run_dir / "checkpoints", corpus)

    runner = make_executor(executor, workers, address, spec.device)
    try:
        with claimed_run_folder(run_dir, spec):
            store = Store(run_dir / STORE_FILE)
            try:
                corpus_folder = corpus.folder if executor == "local" else _shared_copy(corpus, run_dir)
                _StudyRun(spec, run_dir, corpus_folder, cells, store, runner, retry_failed).run()
                export_tables(run_dir, store)
                if spec.theory is not None:  # seconds of NumPy: recomputed, not cached
                    run_theory(config_from_dict(spec.theory), run_dir / "theory")
            finally:
                store.close()
    finally:
        runner.close()
    if report:
        from overtrain.analysis.report import build_report
        build_report(run_dir)
    return run_dir


class _StudyRun:
    """The scheduling loop: start every cell whose input is ready, record what comes back."""

    def __init__(self, spec: StudySpec, run_dir: Path, corpus_folder: Path, cells: list[Cell], store: Store,
                 executor, retry_failed: bool) -> None:
        self.spec, self.run_dir, self.corpus_folder = spec, run_dir, corpus_folder
        self.cells, self.store, self.executor, self.retry_failed = cells, store, executor, retry_failed
        self.producer = {ref.name: cell for cell in cells for ref in cell.writes}
        self.keys: dict[str, str] = {}      # label -> key, once known
        self.settled: set[str] = set()      # labels that will not run (again) in this run
        self.running: dict[str, Cell] = {}  # key -> cell
        self.progress = StudyProgress(spec.name, cells, executor.slots)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def run(self) -> None:
        self.store.set_plan([(cell.label, cell.kind) for cell in self.cells])
        waiting = sorted(self.cells, key=_priority)
        stop: StudyStopped | None = None
        try:
            while (waiting and stop is None) or self.running:
                if stop is None:
                    waiting = self._dispatch(waiting)
                if self.running:
                    for outcome in self.executor.finished(timeout=POLL_SECONDS):
                        stop = self._record(outcome) or stop
                elif waiting and stop is None:
                    raise RuntimeError(f"no cell can start: {[c.label for c in waiting]}")  # a planner bug
        finally:
            self.progress.close()
        missing = len(self.cells) - len(self.keys)
        if missing and stop is None:
            print(f"{missing} cells not run: the checkpoint they read was not made (see `overtrain status`)")
        if stop is not None:
            raise stop

    def _dispatch(self, waiting: list[Cell]) -> list[Cell]:
        """Skip finished cells, start ready ones while slots are free; return the cells still waiting."""
        still = []
        for cell in waiting:
            state = self._input_state(cell)
            if state == "missing":
                self._settle(cell)
                continue
            if state == "wait":
                still.append(cell)
                continue
            key = self._key(cell)
            status = self.store.status(key)
            if status in FINISHED or (status == "failed" and not self.retry_failed):
                self._settle(cell)
            elif len(self.running) >= self.executor.slots:
                still.append(cell)
            else:
                self.store.start(key, cell.kind, cell.label, cell.config)
                self.running[key] = cell
                self.progress.started(key, cell)
                self.executor.submit(CellJob(key, cell, self.spec, self.run_dir, self.corpus_folder, self.executor.threads))
        return still

    def _input_state(self, cell: Cell) -> str:
        """'ready', 'wait' (its checkpoint may still come) or 'missing' (it will not, this run)."""
        if cell.reads is None:
            return "ready"
        producer = self.producer[cell.reads]
        manifest = self.checkpoint_dir / cell.reads / MANIFEST
        if producer.label in self.keys and manifest.exists() and read_manifest(manifest.parent).get("cell") == self.keys[producer.label]:
            return "ready"
        return "missing" if producer.label in self.settled else "wait"

    def _key(self, cell: Cell) -> str:
        if cell.label not in self.keys:
            self.keys[cell.label] = cell_key(cell, self.corpus_folder.name, self.checkpoint_dir)
            self.store.set_plan_key(cell.label, self.keys[cell.label])
        return self.keys[cell.label]

    def _settle(self, cell: Cell) -> None:
        """This cell will not run in this run: finished before, failed before, or its input is missing."""
        self.settled.add(cell.label)
        self.progress.skipped(cell)

    def _record(self, outcome: CellOutcome) -> StudyStopped | None:
        cell = self.running.pop(outcome.key)
        self.settled.add(cell.label)
        self.progress.finished(outcome.key, outcome.rows)
        if outcome.error is None:
            self.store.finish(outcome.key, cell.kind, outcome.rows, "diverged" if is_diverged(outcome.rows) else "done")
            return None
        self.store.fail(outcome.key, outcome.error)
        last_line = outcome.error.strip().splitlines()[-1]
        self.progress.note(f"failed: {cell.label}: {last_line} (log: logs/{outcome.key}.log)")
        if outcome.out_of_space:
            return StudyStopped(f"{self.run_dir}: disk full while running `{cell.label}`; free space and run again "
                                "(finished cells are kept)")
        return None


def _priority(cell: Cell) -> tuple:
    """Pre-training (longest first) and imports first: other cells wait for their checkpoints."""
    if cell.kind == "pretrain":
        return (0, -cell.config["total_tokens"])
    return (0, 0) if cell.kind == "import" else (1, 0)


def _existing_checkpoints(spec: StudySpec) -> tuple[list[SeriesCheckpoint] | None, PreTrainedTokenizerBase | None]:
    """The `checkpoints` series, each loaded once (hash, duplicates, checks), and their tokenizer."""
    if spec.checkpoints is None:
        return None, None
    try:
        series = series_from_sources(**spec.checkpoints.sources())
        unknown = [c.label for c in series if c.tokens is None]
        if unknown:
            raise CheckpointError(f"{unknown[0]}: pre-training tokens unknown (neither its name nor a manifest "
                                  "tells); give them in checkpoints.tokens")
    except CheckpointError as err:
        raise SpecError(f"checkpoints: {err}") from None
    lengths = {"checkpoints.seq_len": spec.checkpoints.seq_len,
               "finetune.seq_len": spec.finetune.seq_len if spec.finetune else 0}
    longest = max(lengths, key=lengths.get)
    return series, inspect_series(series, lengths[longest], longest)


def cell_key(cell: Cell, corpus_id: str, checkpoint_dir: Path) -> str:
    inputs = {
        "kind": cell.kind,
        "config": cell.config,
        "corpus": corpus_id,
        "reads": read_manifest(checkpoint_dir / cell.reads)["weights_sha256"] if cell.reads else None,
        "versions": {"overtrain": __version__, "torch": torch.__version__.split("+")[0],
                     "transformers": transformers.__version__},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def _documents(spec: StudySpec) -> tuple[list[str], list[str]]:
    data = spec.data
    documents = default_documents() if data.corpus == "default" else load_documents(data.corpus, data.text_field)
    train, heldout = split_documents(documents, data.heldout_fraction, spec.seed)
    if data.max_documents:
        train = train[: data.max_documents]
    if data.code_fraction:
        train = mix_in_code(train, data.code_fraction, spec.seed)
    return train, heldout


def _shared_copy(corpus: PreparedCorpus, run_dir: Path) -> Path:
    """The prepared corpus copied into the run folder, for workers on other machines."""
    target = run_dir / "corpus" / corpus.folder.name
    if not target.exists():
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(corpus.folder, tmp)
        tmp.rename(target)
    return target


def study_status(run_dir: str | Path):
    """The current plan, one row per cell with its status; `interrupted` for a cell whose run died."""
    store = _open_store(run_dir)
    try:
        cells = store.plan_status()
    finally:
        store.close()
    if not is_running(Path(run_dir)):
        cells.loc[cells["status"] == "running", "status"] = "interrupted"
    return cells


def export_tables(run_dir: Path, store: Store) -> None:
    """The tidy results of the current plan as CSV (and Parquet) beside the store."""
    frame = load_results(run_dir, store=store)
    frame.to_csv(run_dir / "results.csv", index=False)
    frame.to_parquet(run_dir / "results.parquet", index=False)


def load_results(run_dir: str | Path, store: Store | None = None):
    """Tidy results (one row per cell and metric) of the run's current plan, as a DataFrame."""
    own = store is None
    store = store or _open_store(run_dir)
    try:
        return store.results(store.plan_keys())
    finally:
        if own:
            store.close()


def _open_store(run_dir: str | Path) -> Store:
    path = Path(run_dir) / STORE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no {STORE_FILE} (not a run folder)")
    return Store(path)
