"""Run a study in a run folder: check inputs, prepare data, run the cells not yet done.

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

The theory simulation and the report are the caller's (`overtrain.api.run`): they sit
above the study.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from overtrain.data.corpus import PreparedCorpus
from overtrain.errors import StudyStopped
from overtrain.models.checkpoints import MANIFEST, read_manifest
from overtrain.spec import StudySpec
from overtrain.study.cells import is_diverged
from overtrain.study.ensembles import default_members, group_jobs, trains_as_ensemble
from overtrain.study.execute import CellJob, CellOutcome, make_executor
from overtrain.study.folder import RunFolder, claimed_run_folder
from overtrain.study.plan import Cell, cell_key
from overtrain.study.prepare import prepare
from overtrain.study.progress import StudyProgress
from overtrain.study.store import FINISHED, Store, export_tables

POLL_SECONDS = 0.5  # how often to look for checkpoints that running cells have just written


def run_study(spec: StudySpec, run_dir: str | Path, retry_failed: bool = False, workers: int = 1,
              executor: str = "local", address: str | None = None, members: int | None = None) -> Path:
    """Run or resume `spec` in `run_dir`; `workers` jobs at once (0: in this process), a job
    being one cell or up to `members` fine-tunes trained as one ensemble (None: the device's
    default, study/ensembles.py; 1: every cell alone).

    Ends with the tidy results exported beside the store (results.csv, results.parquet).
    """
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    prepared = prepare(spec, folder)  # everything that can reject the input runs before the first write
    cells, corpus = prepared.cells, prepared.corpus

    runner = make_executor(executor, workers, address, spec.device)
    try:
        with claimed_run_folder(folder, spec):
            store = Store(folder.store)
            try:
                corpus_folder = corpus.folder if executor == "local" else _shared_copy(corpus, folder)
                max_members = members or default_members(spec.device)
                _StudyRun(spec, folder, corpus_folder, cells, store, runner, retry_failed, max_members).run()
                export_tables(folder, store)
            finally:
                store.close()
    finally:
        runner.close()
    return run_dir


class _StudyRun:
    """The scheduling loop: start every cell whose input is ready, record what comes back."""

    def __init__(self, spec: StudySpec, folder: RunFolder, corpus_folder: Path, cells: list[Cell], store: Store,
                 executor, retry_failed: bool, max_members: int = 1) -> None:
        self.spec, self.folder, self.corpus_folder = spec, folder, corpus_folder
        self.cells, self.store, self.executor, self.retry_failed = cells, store, executor, retry_failed
        self.max_members = max_members
        self.producer = {ref.name: cell for cell in cells for ref in cell.writes}
        self.keys: dict[str, str] = {}      # label -> key, once known
        self.settled: set[str] = set()      # labels that will not run (again) in this run
        self.recorded: set[str] = set()     # labels settled before this run started (already on the progress bar)
        self.running: dict[str, Cell] = {}  # key -> cell
        self.jobs: dict[str, set[str]] = {}  # first key of a running job -> its keys not yet back

    def run(self) -> None:
        self.store.set_plan([(cell.label, cell.kind, self.producer[cell.reads].label if cell.reads else None)
                             for cell in self.cells])
        self.recorded = {cell.label for cell in self.cells if self._recorded(cell)}
        self.progress = StudyProgress(self.spec.name, self.cells, self.executor.slots,
                                      [cell for cell in self.cells if cell.label in self.recorded])
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
        """Skip finished cells, start ready ones as jobs while slots are free; return the cells still waiting."""
        still, ready = [], []
        for cell in waiting:
            state = self._input_state(cell)
            if state == "missing":
                self._settle(cell)
            elif state == "wait":
                still.append(cell)
            elif self._is_final(self.store.status(self._key(cell))):
                self._settle(cell)
            else:
                ready.append(cell)
        for job in group_jobs(ready, self.executor.slots, self.max_members):
            if len(self.jobs) >= self.executor.slots:
                still += job
                continue
            keys = [self._key(cell) for cell in job]
            for key, cell in zip(keys, job):
                self.store.start(key, cell.kind, cell.label, cell.config)
                self.running[key] = cell
                self.progress.started(key, cell)
            self.jobs[keys[0]] = set(keys)
            self.executor.submit(CellJob(keys[0], job[0], self.folder.path, self.corpus_folder, self.spec.device,
                                         self.executor.threads,
                                         tuple(zip(keys, job)) if trains_as_ensemble(job, self.max_members) else ()))
        return sorted(still, key=_priority)

    def _recorded(self, cell: Cell) -> bool:
        """Whether the cell's outcome is already stored under its current key, so it will not run.

        Called on the cells in plan order, before any runs: a cell's key is known when it
        reads no checkpoint or when its checkpoint was made by its maker's current key.
        """
        return self._input_state(cell) == "ready" and self._is_final(self.store.status(self._key(cell)))

    def _is_final(self, status: str | None) -> bool:
        """Finished (done, diverged), or failed and not to be retried."""
        return status in FINISHED or (status == "failed" and not self.retry_failed)

    def _input_state(self, cell: Cell) -> str:
        """'ready', 'wait' (its checkpoint may still come) or 'missing' (it will not, this run)."""
        if cell.reads is None:
            return "ready"
        producer = self.producer[cell.reads]
        manifest = self.folder.checkpoint(cell.reads) / MANIFEST
        if producer.label in self.keys and manifest.exists() and read_manifest(manifest.parent).get("cell") == self.keys[producer.label]:
            return "ready"
        return "missing" if producer.label in self.settled else "wait"

    def _key(self, cell: Cell) -> str:
        if cell.label not in self.keys:
            self.keys[cell.label] = cell_key(cell, self.corpus_folder.name, self.folder.checkpoints)
            self.store.set_plan_key(cell.label, self.keys[cell.label])
        return self.keys[cell.label]

    def _settle(self, cell: Cell) -> None:
        """This cell will not run in this run: finished before, failed before, or its input is missing."""
        self.settled.add(cell.label)
        if cell.label not in self.recorded:
            self.progress.skipped(cell)

    def _record(self, outcome: CellOutcome) -> StudyStopped | None:
        cell = self.running.pop(outcome.key)
        for first, keys in list(self.jobs.items()):  # a job's slot frees when its last cell is back
            keys.discard(outcome.key)
            if not keys:
                del self.jobs[first]
        self.settled.add(cell.label)
        self.progress.finished(outcome.key, outcome.rows)
        if outcome.error is None:
            self.store.finish(outcome.key, cell.kind, outcome.rows, "diverged" if is_diverged(outcome.rows) else "done")
            return None
        self.store.fail(outcome.key, outcome.error)
        last_line = outcome.error.strip().splitlines()[-1]
        self.progress.note(f"failed: {cell.label}: {last_line} (log: {self.folder.log(outcome.key)})")
        if outcome.out_of_space:
            return StudyStopped(f"{self.folder}: disk full while running `{cell.label}`; free space and run again "
                                "(finished cells are kept)")
        return None


def _priority(cell: Cell) -> tuple:
    """Pre-training (longest first) and imports first: other cells wait for their checkpoints."""
    if cell.kind == "pretrain":
        return (0, -cell.config["total_tokens"])
    return (0, 0) if cell.kind == "import" else (1, 0)


def _shared_copy(corpus: PreparedCorpus, folder: RunFolder) -> Path:
    """The prepared corpus copied into the run folder, for workers on other machines."""
    target = folder.corpus(corpus.folder.name)
    if not target.exists():
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(corpus.folder, tmp)
        tmp.rename(target)
    return target
