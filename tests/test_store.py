"""The results store read from a run folder: a store that is not a database is refused in one
line and left as it was; a store written before a column existed still reads."""

from __future__ import annotations

import json
import sqlite3

import pytest
import yaml
from tiny_study import tiny_study
from typer.testing import CliRunner

from overtrain.cli import app
from overtrain.study.folder import RunFolder
from overtrain.study.store import Store, study_status

ADVICE = "restore it or use another --out folder"


def write_store(folder: RunFolder) -> None:
    """A real store of one finished probe cell with enough rows to fill many pages."""
    folder.path.mkdir(parents=True)
    store = Store(folder.store)
    store.set_plan([("probe cosine-1024", "probe", None)])
    store.set_plan_key("probe cosine-1024", "k1")
    store.start("k1", "probe", "probe cosine-1024", {})
    store.finish("k1", "probe", [{"metric": "delta_bpb", "gamma": 1.0, "seed": seed, "value": seed / 7}
                                 for seed in range(3000)])
    store.close()
    folder.study.write_text(json.dumps({"name": "tiny"}))


def overwritten(path) -> None:
    path.write_text("these are notes I meant to keep somewhere else\n")


def truncated_to_nothing(path) -> None:
    path.write_bytes(b"")


def truncated_to_half(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def one_page_damaged(path) -> None:
    data = bytearray(path.read_bytes())
    data[4096 * 3: 4096 * 4] = b"\xff" * 4096
    path.write_bytes(bytes(data))


@pytest.fixture()
def inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(tiny_study(tmp_path)))
    return study


@pytest.mark.parametrize("damage, problem", [
    (overwritten, "not a SQLite database (overwritten or truncated?)"),
    (truncated_to_nothing, "not a SQLite database (overwritten or truncated?)"),
    (truncated_to_half, "damaged SQLite database (database disk image is malformed)"),
    (one_page_damaged, "damaged SQLite database"),
])
@pytest.mark.parametrize("command", ["status", "report", "run"])
def test_a_store_that_is_not_a_database_is_refused_and_left_untouched(inputs, damage, problem, command):
    folder = RunFolder(inputs.parent / "run")
    write_store(folder)
    damage(folder.store)
    before = folder.store.read_bytes()
    files = sorted(p.name for p in folder.path.iterdir())
    args = ["run", str(inputs), "--out", str(folder), "--workers", "0"] if command == "run" else [command, str(folder)]
    if command == "run":
        folder.study.unlink()  # a folder that holds this study's results, or no study yet
        files.remove("study.json")

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "\n" not in message and message.startswith(f"error: {folder.store}: {problem}") and message.endswith(ADVICE)
    assert folder.store.read_bytes() == before
    assert sorted(p.name for p in folder.path.iterdir()) == files  # no -wal or -shm left beside it


def test_a_store_written_before_the_plan_named_its_makers_still_reads(tmp_path):
    folder = RunFolder(tmp_path)
    store = Store(folder.store)
    store.set_plan([("pretrain cosine 1,024 tokens", "pretrain", None),
                    ("probe cosine-1024", "probe", "pretrain cosine 1,024 tokens")])
    store.close()
    with sqlite3.connect(folder.store) as db:
        db.execute("ALTER TABLE plan DROP COLUMN reads_from")
    cells = study_status(tmp_path)
    assert cells["status"].tolist() == ["pending", "pending"]
    assert (cells["note"] == "").all()
