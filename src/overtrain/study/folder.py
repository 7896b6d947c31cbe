"""A run folder: the one place its layout is spelled, and its lock.

    runs/x/
      study.json         the study as last run here
      monitor.json       instead, for a training run measured as it goes: the monitor's settings
      results.sqlite     the results store (store.py)
      results.csv        the tidy results of the current plan (and results.parquet)
      checkpoints/<name> one HF folder per checkpoint
      logs/<key>.log     each cell's output
      corpus/<id>        the prepared corpus, copied for workers on other machines (Ray)
      theory/            the theory simulation's figures and summary.md
      report/            index.html, summary.md, tables/*.csv and the figures
      .lock              held by the `overtrain run` using the folder

The claim is an exclusive `flock` on `.lock`, held for the whole run: the kernel
drops it when the process dies, however it dies, so a killed run never leaves a
stale lock, and `status` can tell a running study from an interrupted one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from overtrain.errors import SpecError
from overtrain.spec import StudySpec


class ReportFolder:
    """A report's files; `write_report` may build one anywhere, a run's lives in `report/`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def html(self) -> Path:
        return self.path / "index.html"

    @property
    def markdown(self) -> Path:
        return self.path / "summary.md"

    @property
    def tables(self) -> Path:
        return self.path / "tables"

    @property
    def recommendation(self) -> Path:
        """The recommendation per task, as JSON (`recommend.Recommendation.to_json`)."""
        return self.path / "recommendation.json"

    def table(self, name: str) -> Path:
        return self.tables / f"{name}.csv"


class RunFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def study(self) -> Path:
        return self.path / "study.json"

    @property
    def monitor(self) -> Path:
        """The settings of the adaptability monitor, in a folder a training run writes (overtrain.monitor)."""
        return self.path / "monitor.json"

    @property
    def store(self) -> Path:
        return self.path / "results.sqlite"

    @property
    def results_csv(self) -> Path:
        return self.path / "results.csv"

    @property
    def results_parquet(self) -> Path:
        return self.path / "results.parquet"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / name

    def log(self, key: str) -> Path:
        return self.path / "logs" / f"{key}.log"

    def corpus(self, corpus_id: str) -> Path:
        return self.path / "corpus" / corpus_id

    @property
    def theory(self) -> Path:
        return self.path / "theory"

    @property
    def report(self) -> ReportFolder:
        return ReportFolder(self.path / "report")

    @property
    def lock(self) -> Path:
        return self.path / ".lock"


@contextlib.contextmanager
def claimed_run_folder(folder: RunFolder, spec: StudySpec):
    """Create the folder if needed, hold its lock, record the study; yield the folder."""
    try:
        folder.path.mkdir(parents=True, exist_ok=True)
        lock = open(folder.lock, "a+")
    except OSError as err:
        raise SpecError(f"{folder}: output folder is not writable ({err.strerror})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpecError(f"{folder}: another `overtrain run` is using this folder") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        folder.study.write_text(json.dumps(spec.model_dump(mode="json"), indent=1))
        yield folder


def is_running(folder: RunFolder) -> bool:
    """Whether an `overtrain run` holds the folder now."""
    if not folder.lock.exists():
        return False
    with open(folder.lock) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
    return False
