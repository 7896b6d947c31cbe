"""The results store: one SQLite file per run folder.

`cells` keeps every unit of work by its content key with its status; `results`
keeps tidy rows (one per cell and metric). A cell's rows and its `done` status are
written in one transaction, so a kill at any moment leaves either all of a cell's
results or none. WAL mode keeps readers (the report, `status`) off the writer's way.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pandas as pd

# Context columns every result row may carry; NULL where they do not apply.
RESULT_COLUMNS = ("checkpoint", "weights", "schedule", "decayed", "tokens", "task", "lr", "gamma", "seed", "step")
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
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- meta -------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

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
