"""Run a study in a run folder: prepare data, plan cells, run what is not done, report.

A cell's key hashes everything that determines its result: its config, the weights
it starts from (sha256 from the checkpoint manifest), the prepared corpus and the
versions that matter. Finished cells are skipped; a cell found `running` (its
process died) is redone; a cell that raises is recorded as failed and the study
goes on.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from overtrain import __version__
from overtrain.checkpoints import read_manifest
from overtrain.data.corpus import prepare_corpus
from overtrain.data.sources import default_documents, load_documents, split_documents
from overtrain.device import pick_device
from overtrain.spec import SpecError, StudySpec
from overtrain.study.cells import RUNNERS, StudyContext, is_diverged
from overtrain.study.plan import Cell, plan_study
from overtrain.study.store import FINISHED, Store

STORE_FILE = "results.sqlite"


def run_study(spec: StudySpec, run_dir: str | Path, retry_failed: bool = False, report: bool = True) -> Path:
    run_dir = Path(run_dir)
    cells = plan_study(spec)  # fails on an impossible plan before anything is written
    _prepare_run_dir(run_dir, spec)
    store = Store(run_dir / STORE_FILE)
    try:
        corpus = prepare_corpus(*_documents(spec), spec.tokenizer.vocab_size)
        ctx = StudyContext(spec=spec, run_dir=run_dir, corpus=corpus, device=pick_device(spec.device))
        keys = []
        with tqdm(total=len(cells), desc=f"study {spec.name}", unit="cell") as bar:
            for cell in cells:
                keys.append(_run_cell(cell, ctx, store, retry_failed))
                bar.update()
        (run_dir / "plan.json").write_text(json.dumps(keys))
        export_tables(run_dir, store)
    finally:
        store.close()
    if report:
        from overtrain.analysis.report import build_report
        build_report(run_dir)
    return run_dir


def _run_cell(cell: Cell, ctx: StudyContext, store: Store, retry_failed: bool) -> str | None:
    """Run one cell unless it is finished; return its key (None if its input is missing)."""
    if cell.reads and not (ctx.checkpoint_dir / cell.reads / "overtrain.json").exists():
        return None  # the run that makes its checkpoint failed or diverged early
    key = cell_key(cell, ctx)
    status = store.status(key)
    if status in FINISHED or (status == "failed" and not retry_failed):
        return key
    store.start(key, cell.kind, cell.label, cell.config)
    try:
        rows = RUNNERS[cell.kind](cell, key, ctx)
    except Exception:  # noqa: BLE001 - a failed cell is a recorded result, the study goes on
        store.fail(key, traceback.format_exc(limit=8))
        tqdm.write(f"failed: {cell.label} (see `overtrain status`)")
        return key
    store.finish(key, cell.kind, rows, "diverged" if is_diverged(rows) else "done")
    return key


def cell_key(cell: Cell, ctx: StudyContext) -> str:
    inputs = {
        "kind": cell.kind,
        "config": cell.config,
        "corpus": ctx.corpus.folder.name,
        "reads": read_manifest(ctx.checkpoint_dir / cell.reads)["weights_sha256"] if cell.reads else None,
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
    return train, heldout


def _prepare_run_dir(run_dir: Path, spec: StudySpec) -> None:
    """Create the folder, or check that the study it holds is this one (or an edit of it)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise SpecError(f"{run_dir}: output folder is not writable ({err.strerror})") from None
    saved = run_dir / "study.json"
    if saved.exists():
        previous = json.loads(saved.read_text())
        for section in ("data", "tokenizer", "model"):
            if previous.get(section) != spec.model_dump(mode="json")[section]:
                raise SpecError(f"{run_dir}: holds a study with a different `{section}` section; use another --out folder")
    saved.write_text(json.dumps(spec.model_dump(mode="json"), indent=1))


def export_tables(run_dir: Path, store: Store) -> None:
    """The tidy results of the current plan as CSV (and Parquet) beside the store."""
    frame = load_results(run_dir, store=store)
    frame.to_csv(run_dir / "results.csv", index=False)
    frame.to_parquet(run_dir / "results.parquet", index=False)


def load_results(run_dir: str | Path, store: Store | None = None):
    """Tidy results (one row per cell and metric) of the run's current plan, as a DataFrame."""
    run_dir = Path(run_dir)
    if not (run_dir / STORE_FILE).exists():
        raise FileNotFoundError(f"{run_dir}: no {STORE_FILE} (not a run folder)")
    plan_file = run_dir / "plan.json"
    keys = [k for k in json.loads(plan_file.read_text()) if k] if plan_file.exists() else None
    own = store is None
    store = store or Store(run_dir / STORE_FILE)
    try:
        return store.results(keys)
    finally:
        if own:
            store.close()
