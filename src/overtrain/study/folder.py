"""A run folder, claimed by one `overtrain run` at a time.

The claim is an exclusive `flock` on `<run>/.lock`, held for the whole run: the
kernel drops it when the process dies, however it dies, so a killed run never
leaves a stale lock, and `status` can tell a running study from an interrupted one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from overtrain.spec import SpecError, StudySpec

LOCK_FILE = ".lock"


@contextlib.contextmanager
def claimed_run_folder(run_dir: Path, spec: StudySpec):
    """Create the folder if needed, hold its lock, record the study; yield the folder."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / LOCK_FILE, "a+")
    except OSError as err:
        raise SpecError(f"{run_dir}: output folder is not writable ({err.strerror})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpecError(f"{run_dir}: another `overtrain run` is using this folder") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        (run_dir / "study.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=1))
        yield run_dir


def is_running(run_dir: Path) -> bool:
    """Whether an `overtrain run` holds the folder now."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return False
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
    return False
