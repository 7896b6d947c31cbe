"""Executors: where cells run. The runner decides what runs; an executor only runs it.

Every executor takes `CellJob`s and hands back `CellOutcome`s (rows or an error); it
never touches the results store. Three of them:
- inline (`--workers 0`): one cell at a time in this process; for debuggers.
- local (`--workers N`, default 1): N spawned worker processes on this machine, each
  with cores // N torch threads so that they do not fight over the cores.
- ray (`--executor ray`): Ray tasks on a local instance or a cluster (`--address`),
  each asking for its CPUs (and a GPU when the study runs on CUDA).

A worker needs only the job: the cell, the run folder, the prepared corpus folder,
which it opens read-only (memory-mapped token streams, no re-tokenizing), and the
device. Not the study spec: a cell reads its config and nothing else of the study.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from overtrain.data.corpus import PreparedCorpus
from overtrain.errors import SpecError
from overtrain.probes.metrics import check_rows
from overtrain.runtime.device import pick_device
from overtrain.runtime.faults import fault_point
from overtrain.study.cells import ENSEMBLE_RUNNERS, RUNNERS, StudyContext
from overtrain.study.folder import RunFolder
from overtrain.study.plan import Cell


@dataclass(frozen=True)
class CellJob:
    """One cell, or several trained as one ensemble (`members`: (key, cell) of each, the first
    being `key`, `cell`; see study/ensembles.py)."""

    key: str
    cell: Cell
    run_dir: Path
    corpus_folder: Path
    device: str   # the study's `device` setting, deliberately not in the key: a study may move between machines
    threads: int  # torch intra-op threads for this cell
    members: tuple[tuple[str, Cell], ...] = ()

    @property
    def keys(self) -> list[str]:
        return [key for key, _ in self.members] or [self.key]


@dataclass
class CellOutcome:
    key: str
    rows: list[dict] | None = None  # None when the cell raised
    error: str | None = None        # the traceback, when it raised
    out_of_space: bool = False      # the disk is full: the study stops (see docs/ENGINE.md)
    seconds: float = 0.0


# -- what a worker does ---------------------------------------------------------------

def run_job(job: CellJob, capture_fds: bool = True) -> list[CellOutcome]:
    """Run one job, its output going to logs/<key>.log (an ensemble's, to its first member's);
    one outcome per cell; never raises for the cells' errors."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    started = time.perf_counter()
    folder = RunFolder(job.run_dir)
    folder.log(job.key).parent.mkdir(parents=True, exist_ok=True)
    for key, cell in job.members[1:]:  # the other members' logs say where theirs is
        with open(folder.log(key), "a") as log:
            print(f"== {cell.label} | key {key} | trained in one ensemble, logged in {folder.log(job.key)}", file=log)
    try:
        with capture_output(folder.log(job.key), capture_fds):
            print(f"== {job.cell.label} | key {job.key} | {socket.gethostname()} pid {os.getpid()} | "
                  f"{job.threads} threads | {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
            if job.members:
                print("== one ensemble of: " + "; ".join(cell.label for _, cell in job.members), flush=True)
            try:
                fault_point(f"cell-{job.cell.kind}")  # fault-injection tests die here
                rows = _run_cells(job)
                for found in rows.values():
                    check_rows(found)  # every metric a cell emits is declared in probes/metrics.py
            except Exception as err:  # noqa: BLE001 - a failed cell is a recorded result
                traceback.print_exc()
                error = traceback.format_exc(limit=8)
                return [CellOutcome(key, error=error, out_of_space=_is_disk_full(err),
                                    seconds=time.perf_counter() - started) for key in job.keys]
        return [CellOutcome(key, rows=rows[key], seconds=time.perf_counter() - started) for key in job.keys]
    finally:
        torch.set_num_threads(threads_before)  # inline, the caller's setting survives


def _run_cells(job: CellJob) -> dict[str, list[dict]]:
    if not job.members:
        return {job.key: RUNNERS[job.cell.kind](job.cell, job.key, _context(job))}
    return ENSEMBLE_RUNNERS[job.cell.kind](list(job.members), _context(job))


@contextlib.contextmanager
def capture_output(path: Path, capture_fds: bool):
    """Send stdout, stderr and warnings to `path` (appended: a retry keeps the failed attempt's log).

    In a worker process the file descriptors are redirected, so output from C++
    (torch.compile, BLAS) lands in the log too; inline, only Python-level output is.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as log:
        if not capture_fds:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
            return
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def open_corpus(folder: Path) -> PreparedCorpus:
    """A corpus prepared earlier (by the parent): tokenizer and memory-mapped token streams."""
    folder = Path(folder)
    return PreparedCorpus(folder=folder, tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
                          train=np.load(folder / "train.npy", mmap_mode="r"),
                          heldout=np.load(folder / "heldout.npy", mmap_mode="r"))


_contexts: dict[tuple, StudyContext] = {}


def _context(job: CellJob) -> StudyContext:
    """The study context, built once per worker: later cells reuse its held-out batches and tasks."""
    ident = (str(job.run_dir), str(job.corpus_folder), job.device)
    if ident not in _contexts:
        _contexts.clear()
        _contexts[ident] = StudyContext(folder=RunFolder(job.run_dir), corpus=open_corpus(job.corpus_folder),
                                        device=pick_device(job.device))
    return _contexts[ident]


def _is_disk_full(err: BaseException | None) -> bool:
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


# -- executors ------------------------------------------------------------------------

class InlineExecutor:
    """Cells run one by one in the calling process (`--workers 0`), with its torch thread setting."""

    slots = 1

    def __init__(self) -> None:
        self.threads = torch.get_num_threads()
        self._outcomes: list[CellOutcome] = []

    def submit(self, job: CellJob) -> None:
        self._outcomes += run_job(job, capture_fds=False)

    def finished(self, timeout: float) -> list[CellOutcome]:
        outcomes, self._outcomes = self._outcomes, []
        return outcomes

    def close(self) -> None:
        pass


class LocalExecutor:
    """Cells in `workers` spawned processes on this machine.

    "spawn", not fork: a forked child inherits torch's thread pools and locks
    mid-state. Workers exit as soon as the parent dies, so a killed study leaves no
    orphan still writing checkpoints into the folder that the next run resumes.
    """

    def __init__(self, workers: int) -> None:
        self.slots = workers
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        self._pool = self._new_pool()
        self._running: dict = {}  # future -> key

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.slots, mp_context=get_context("spawn"),
                                   initializer=_exit_with_parent, initargs=(os.getpid(),))

    def submit(self, job: CellJob) -> None:
        self._running[self._pool.submit(run_job, job)] = job

    def finished(self, timeout: float) -> list[CellOutcome]:
        done, _ = wait(self._running, timeout=timeout, return_when=FIRST_COMPLETED)
        outcomes, broken = [], False
        for future in done:
            job = self._running.pop(future)
            try:
                outcomes += future.result()
            except BrokenProcessPool:
                broken = True
                outcomes += [CellOutcome(key, error=(
                    "a worker process died while this cell ran (this cell or one beside it was killed, e.g. out "
                    f"of memory); see {RunFolder(job.run_dir).log(job.key)}; run again with --retry-failed"))
                    for key in job.keys]
        if broken:  # a dead worker breaks the whole pool: start a fresh one for the cells still to come
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
        return outcomes

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


class RayExecutor:
    """Cells as Ray tasks, `workers` at a time, each asking for its share of the cluster's CPUs.

    Tasks read and write the run folder (checkpoints, logs) directly: on a cluster it
    must be on storage every node mounts at the same path. Results come back to this
    process, which alone writes the store.
    """

    def __init__(self, workers: int, address: str | None, device: str) -> None:
        try:
            import ray
        except ImportError:
            raise SpecError("--executor ray: Ray is not installed (pip install 'overtrain[ray]')") from None
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, log_to_driver=False)
        resources = ray.cluster_resources()
        self.slots = workers
        self.threads = max(1, int(resources.get("CPU", 1)) // workers)
        wants_gpu = device.startswith("cuda") or (device == "auto" and resources.get("GPU", 0) > 0)
        # max_retries=0: a cell that dies is recorded as failed, like in the local executor.
        self._task = ray.remote(run_job).options(num_cpus=self.threads, num_gpus=1 if wants_gpu else 0, max_retries=0)
        self._running: dict = {}  # ObjectRef -> job

    def submit(self, job: CellJob) -> None:
        self._running[self._task.remote(job)] = job

    def finished(self, timeout: float) -> list[CellOutcome]:
        refs = list(self._running)
        ready, _ = self._ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:  # collect every other one that is ready too
            ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        outcomes = []
        for ref in ready:
            job = self._running.pop(ref)
            try:
                outcomes += self._ray.get(ref)
            except self._ray.exceptions.RayError as err:
                outcomes += [CellOutcome(key, error=f"Ray task failed: {err}") for key in job.keys]
        return outcomes

    def close(self) -> None:
        for ref in self._running:
            self._ray.cancel(ref, force=True)
        if self._owns_ray:
            self._ray.shutdown()


def make_executor(kind: str, workers: int, address: str | None, device: str):
    if kind == "ray":
        return RayExecutor(max(1, workers), address, device)
    if kind != "local":
        raise SpecError(f"--executor {kind}: unknown executor (local or ray)")
    if address:
        raise SpecError("--address: only with --executor ray")
    return InlineExecutor() if workers == 0 else LocalExecutor(workers)
