"""The results store: one SQLite file per run folder, written by one process only.

`cells` keeps every unit of work ever run in this folder by its content key, with
its status (running, done, diverged, failed with the error text); `results` keeps
tidy rows (one per cell and metric); `plan` is the current study's list of cells by
label, with the cell whose checkpoint each reads, and the key once it is known (a
cell's key needs the weights it reads, so cells downstream of an unfinished
pre-training run have none yet: they are pending).

A cell's rows and its `done` status are written in one transaction, so a kill at any
moment leaves either all of a cell's results or none. WAL mode keeps readers (the
report, `status`) out of the writer's way.

Readers (`load_results`, `study_status`) read the store alone: the run folder's
plan, statuses and results, without the runner.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pandas as pd

from overtrain.errors import StoreError
from overtrain.runtime.faults import fault_point
from overtrain.study.folder import RunFolder, is_running

# Context columns every result row may carry; NULL where they do not apply.
RESULT_COLUMNS = ("checkpoint", "weights", "schedule", "decayed", "tokens", "task", "lr", "gamma", "seed", "step",
                  "mitigation", "duplicate_of", "source", "pretrain_seed")
FINISHED = ("done", "diverged")
SQLITE_HEADER = b"SQLite format 3\x00"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, label TEXT NOT NULL, status TEXT NOT NULL,
    config TEXT NOT NULL, error TEXT, started REAL, finished REAL
);
CREATE TABLE IF NOT EXISTS results (
    cell TEXT NOT NULL REFERENCES cells(key), kind TEXT NOT NULL,
    {", ".join(RESULT_COLUMNS)}, metric TEXT NOT NULL, value REAL
);
CREATE INDEX IF NOT EXISTS results_cell ON results(cell);
CREATE TABLE IF NOT EXISTS plan (
    position INTEGER PRIMARY KEY, label TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, key TEXT, reads_from TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Columns added since the first stores were written: (table, column).
LATER_COLUMNS = [*(("results", column) for column in RESULT_COLUMNS), ("plan", "reads_from")]


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        check_store(self.path)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A store written before a column existed gets it (NULL in its old rows)."""
        for table, column in LATER_COLUMNS:
            if column not in {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")

    def close(self) -> None:
        self.db.close()

    # -- meta -------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- the current plan -------------------------------------------------------
    def set_plan(self, cells: list[tuple[str, str, str | None]]) -> None:
        """Replace the plan by these (label, kind, reads_from) triples, reads_from being the label of the cell
        that makes the checkpoint it reads (or None); keys are set as the run learns them."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM plan")
            self.db.executemany("INSERT INTO plan (position, label, kind, reads_from) VALUES (?, ?, ?, ?)",
                                [(i, *cell) for i, cell in enumerate(cells)])

    def add_to_plan(self, label: str, kind: str, key: str) -> None:
        """Append one cell to the plan, or give a label already there this key (a monitored training
        run's measurements arrive one at a time, and a resumed run measures a step again)."""
        self.db.execute("INSERT INTO plan (position, label, kind, key) "
                        "VALUES ((SELECT COALESCE(MAX(position), -1) + 1 FROM plan), ?, ?, ?) "
                        "ON CONFLICT(label) DO UPDATE SET kind=excluded.kind, key=excluded.key", (label, kind, key))

    def set_plan_key(self, label: str, key: str) -> None:
        self.db.execute("UPDATE plan SET key=? WHERE label=?", (key, label))

    def plan_keys(self) -> list[str]:
        return [key for (key,) in self.db.execute("SELECT key FROM plan WHERE key IS NOT NULL ORDER BY position")]

    def plan_status(self) -> pd.DataFrame:
        """The current plan, one row per cell: kind, label, key, status, error, note, started, finished.

        A cell whose key is unknown or that never started is `pending`, or `blocked` when the
        checkpoint it reads will not come: its maker diverged or failed without making it (or
        is itself blocked); `note` then names that cell ("blocked by the diverged cell <label>").
        """
        cells = pd.read_sql_query(
            "SELECT p.kind, p.label, p.key, COALESCE(c.status, 'pending') AS status, c.error, '' AS note, "
            "c.started, c.finished, p.reads_from FROM plan p LEFT JOIN cells c ON c.key = p.key ORDER BY p.position",
            self.db)
        return _mark_blocked(cells).drop(columns="reads_from")

    # -- cells ------------------------------------------------------------------
    def status(self, key: str) -> str | None:
        row = self.db.execute("SELECT status FROM cells WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def start(self, key: str, kind: str, label: str, config: dict) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO cells (key, kind, label, status, config, started) VALUES (?, ?, ?, 'running', ?, ?)",
            (key, kind, label, json.dumps(config, sort_keys=True), time.time()),
        )

    def finish(self, key: str, kind: str, rows: list[dict], status: str = "done") -> None:
        """Replace the cell's rows and mark it finished, atomically."""
        columns = ("cell", "kind", *RESULT_COLUMNS, "metric", "value")
        values = [(key, kind, *(row.get(c) for c in RESULT_COLUMNS), row["metric"], _real(row["value"])) for row in rows]
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM results WHERE cell=?", (key,))
            self.db.executemany(f"INSERT INTO results ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", values)
            fault_point("store-write")  # fault-injection tests die here, mid-transaction
            self.db.execute("UPDATE cells SET status=?, error=NULL, finished=? WHERE key=?", (status, time.time(), key))

    def fail(self, key: str, error: str) -> None:
        self.db.execute("UPDATE cells SET status='failed', error=?, finished=? WHERE key=?", (error, time.time(), key))

    def cells(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT key, kind, label, status, error, started, finished FROM cells", self.db)

    def plan_results(self) -> pd.DataFrame:
        """Tidy results of the cells of the current plan."""
        return self.results(self.plan_keys())

    def results(self, keys: list[str] | None = None) -> pd.DataFrame:
        frame = pd.read_sql_query(
            "SELECT r.* FROM results r JOIN cells c ON c.key = r.cell WHERE c.status IN ('done', 'diverged')", self.db)
        if keys is not None:
            frame = frame[frame["cell"].isin(set(keys))]
        return frame.reset_index(drop=True)


def check_store(path: Path) -> None:
    """Refuse a store that is not a SQLite database or is damaged, reading it only; none yet is fine.

    The header is checked before SQLite sees the file: SQLite would take an empty file
    for a new database and write one into it.
    """
    if not path.exists():
        return
    advice = "restore it or use another --out folder"
    with open(path, "rb") as file:
        if file.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise StoreError(f"{path}: not a SQLite database (overwritten or truncated?); {advice}")
    db = sqlite3.connect(path, timeout=60)  # not read-only: that would leave its -wal and -shm files behind
    try:
        problems = [row[0] for row in db.execute("PRAGMA quick_check(1)")]
    except sqlite3.OperationalError as err:  # cannot open or read it: permissions, locks
        raise StoreError(f"{path}: cannot be read ({err})") from None
    except sqlite3.DatabaseError as err:
        problems = [str(err)]
    finally:
        db.close()
    if problems != ["ok"]:
        first = problems[0].splitlines()[-1]  # quick_check heads its report with "*** in database main ***"
        raise StoreError(f"{path}: damaged SQLite database ({first}); {advice}")


def _mark_blocked(cells: pd.DataFrame) -> pd.DataFrame:
    """Pending cells whose checkpoint's maker diverged or failed (or is blocked) become `blocked`.

    A cell whose checkpoint exists gets its key as soon as the run sees it; so a cell
    still without a key behind a finished maker waits for a checkpoint that was not made.
    """
    cells = cells.copy()
    status = dict(zip(cells["label"], cells["status"]))
    note: dict[str, str] = {}  # label of a blocked cell -> why
    for i, cell in cells.iterrows():  # plan order: makers come before their readers
        maker = cell["reads_from"]
        if cell["status"] != "pending" or not pd.isna(cell["key"]) or pd.isna(maker):
            continue
        if maker in note:
            note[cell["label"]] = note[maker]
        elif status[maker] in ("diverged", "failed"):
            note[cell["label"]] = f"blocked by the {status[maker]} cell {maker}"
        else:
            continue
        cells.loc[i, ["status", "note"]] = ["blocked", note[cell["label"]]]
    return cells


def open_store(run_dir: str | Path) -> Store:
    """The store of an existing run folder."""
    folder = RunFolder(run_dir)
    if not folder.store.exists():
        raise StoreError(f"{folder.store}: no such file (not a run folder, or no study has run in it yet)")
    return Store(folder.store)


def load_results(run_dir: str | Path) -> pd.DataFrame:
    """Tidy results (one row per cell and metric) of the run's current plan."""
    store = open_store(run_dir)
    try:
        return store.plan_results()
    finally:
        store.close()


def study_status(run_dir: str | Path) -> pd.DataFrame:
    """The current plan, one row per cell with its status (see `Store.plan_status`);
    `interrupted` for a cell marked running whose run died."""
    store = open_store(run_dir)
    try:
        cells = store.plan_status()
    finally:
        store.close()
    if not is_running(RunFolder(run_dir)):
        cells.loc[cells["status"] == "running", "status"] = "interrupted"
    return cells


def export_tables(folder: RunFolder, store: Store) -> None:
    """The tidy results of the current plan as CSV and Parquet beside the store."""
    frame = store.plan_results()
    frame.to_csv(folder.results_csv, index=False)
    frame.to_parquet(folder.results_parquet, index=False)


def _real(value) -> float | None:
    return None if value is None else float(value)
