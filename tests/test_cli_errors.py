"""How the CLI ends: bad input with one line and exit 2, a bug with the path of its traceback
and exit 1, and no torch import for `--help` and `keys`."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from overtrain import api
from overtrain.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def logged_path(message: str) -> Path:
    found = re.search(r"full traceback in (\S+)$", message)
    assert found, message
    return Path(found.group(1))


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("args, expected", [
    (["theory", "--set", "gammas"], "--set 'gammas': expected KEY=VALUE"),
    (["theory", "--set", "foo=1"], "theory.foo: unknown key"),
    (["theory", "no-such-study.yaml"], "no-such-study.yaml: no such file"),
    (["audit", "smollm2", "--lrs", "1e-4,fast"], "--lrs '1e-4,fast': expected comma-separated numbers"),
    (["run", "no-such-study.yaml"], "no-such-study.yaml: no such study file"),
    (["report", ".", "--max-bpb", "2.5", "--within-bpb", "0.1"], "--within-bpb are two constraints"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    message = result.output.strip()
    assert result.exit_code == 2, result.output
    assert message.startswith("error: ") and expected in message and "\n" not in message, message


def test_a_folder_that_is_not_a_run_is_bad_input(tmp_path):
    result = invoke("status", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "results.sqlite" in result.output
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a log


def test_a_bug_in_a_command_with_a_run_folder_is_logged_there(tmp_path, monkeypatch):
    def broken(run_dir):
        return 1 / 0

    monkeypatch.setattr(api, "status", broken)
    result = invoke("status", str(tmp_path))
    message = result.output.strip()
    assert result.exit_code == 1, result.output
    assert "\n" not in message and message.startswith("internal error: ZeroDivisionError: division by zero; "), message
    log = logged_path(message)
    assert log.parent == tmp_path / "logs"
    text = log.read_text()
    assert text.startswith("Traceback") and "in broken" in text and "ZeroDivisionError: division by zero" in text


def test_a_value_error_that_is_not_bad_input_is_a_bug(tmp_path, cache, monkeypatch):
    def broken(study, out, overrides):
        raise ValueError("an internal invariant broke\nsecond line")

    monkeypatch.setattr(api, "theory", broken)
    result = invoke("theory", "--out", str(tmp_path / "theory"))
    message = result.output.strip()
    assert result.exit_code == 1, result.output
    assert message.startswith("internal error: ValueError: an internal invariant broke; full traceback in "), message
    log = logged_path(message)
    assert log.parent == cache / "logs"  # no run folder: the user cache
    assert "second line" in log.read_text()


def test_the_log_falls_back_to_the_temp_folder(tmp_path, monkeypatch):
    unwritable = tmp_path / "file"
    unwritable.write_text("")
    monkeypatch.setenv("OVERTRAIN_CACHE", str(unwritable / "cache"))  # under a file: cannot be created
    monkeypatch.setattr(api, "keys", lambda: {}["missing"])
    result = invoke("keys")
    assert result.exit_code == 1, result.output
    log = logged_path(result.output.strip())
    try:
        assert log.parent == Path(tempfile.gettempdir()) and "KeyError" in log.read_text()
    finally:
        log.unlink()


@pytest.mark.parametrize("args, not_imported", [
    (["--help"], ["torch", "transformers", "pandas", "pydantic", "overtrain.api"]),  # typer alone: start-up time
    (["keys"], ["torch", "transformers"]),
])
def test_help_and_keys_do_not_import_torch(args, not_imported):
    script = ("import sys\nfrom overtrain.cli import app\n"
              f"try:\n    app({args!r})\nexcept SystemExit as end:\n    assert end.code == 0, end.code\n"
              f"imported = [name for name in {not_imported!r} if name in sys.modules]\n"
              "assert not imported, f'imported: {imported}'\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
