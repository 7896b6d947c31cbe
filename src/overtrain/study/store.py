"""The results store: one SQLite file per run folder, written by one process only.

`cells` keeps every unit of work ever run in this folder by its content key, with
its status (running, done, diverged, failed with the error text); `results` keeps
tidy rows (one per cell and metric); `plan` is the current study's list of cells by
label, with the key once it is known (a cell's key needs the weights it reads, so
cells downstream of an unfinished pre-training run have none yet: they are pending).

A cell's rows and its `done` status are written in one transaction, so a kill at any
moment leaves either all of a cell's results or none. WAL mode keeps readers (the
report, `status`) out of the writer's way.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pandas as pd

from overtrain.runtime.faults import fault_point

# Context columns every result row may carry; NULL where they do not apply.
RESULT_COLUMNS = ("checkpoint", "weights", "schedule", "decayed", "tokens", "task", "lr", "gamma", "seed", "step",
                  "mitigation", "duplicate_of", "source")
FINISHED = ("done", "diverged")

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
    position INTEGER PRIMARY KEY, label TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, key TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A store written before a context column existed gets it (NULL in its old rows)."""
        present = {row[1] for row in self.db.execute("PRAGMA table_info(results)")}
        for column in RESULT_COLUMNS:
            if column not in present:
                self.db.execute(f"ALTER TABLE results ADD COLUMN {column}")

    def close(self) -> None:
        self.db.close()

    # -- meta -------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- the current plan -------------------------------------------------------
    def set_plan(self, cells: list[tuple[str, str]]) -> None:
        """Replace the plan by these (label, kind) pairs; keys are set as the run learns them."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM plan")
            self.db.executemany("INSERT INTO plan (position, label, kind) VALUES (?, ?, ?)",
                                [(i, label, kind) for i, (label, kind) in enumerate(cells)])

    def set_plan_key(self, label: str, key: str) -> None:
        self.db.execute("UPDATE plan SET key=? WHERE label=?", (key, label))

    def plan_keys(self) -> list[str]:
        return [key for (key,) in self.db.execute("SELECT key FROM plan WHERE key IS NOT NULL ORDER BY position")]

    def plan_status(self) -> pd.DataFrame:
        """The current plan, one row per cell: kind, label, key, status, error.

        A cell whose key is unknown or that never started is `pending`.
        """
        return pd.read_sql_query(
            "SELECT p.kind, p.label, p.key, COALESCE(c.status, 'pending') AS status, c.error, c.started, c.finished "
            "FROM plan p LEFT JOIN cells c ON c.key = p.key ORDER BY p.position", self.db)

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

    def results(self, keys: list[str] | None = None) -> pd.DataFrame:
        frame = pd.read_sql_query(
            "SELECT r.* FROM results r JOIN cells c ON c.key = r.cell WHERE c.status IN ('done', 'diverged')", self.db)
        if keys is not None:
            frame = frame[frame["cell"].isin(set(keys))]
        return frame.reset_index(drop=True)


def _real(value) -> float | None:
    return None if value is None else float(value)
