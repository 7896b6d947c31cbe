"""The adaptability monitor for any training loop: measure a model as it trains.

    import overtrain.monitor
    found = overtrain.monitor.measure(model, tokenizer, heldout_texts, run_dir="runs/monitor", step=s, tokens=t)

One measurement, on the first `heldout_tokens` of fixed held-out texts in the model's own
tokenizer, with the probes a study uses (probes/suite.py):
- held-out loss and bits per byte;
- Gaussian sensitivity: the bpb rise under noise gamma x each tensor's init std, for each
  gamma and noise seed, added in place and taken away bit for bit (no copy of the model);
- the KL sharpness proxy at `kl_gamma`, on the first batch of the held-out windows.

It returns the numbers as a dict and, given a run folder, appends the rows to its results
store in a study's format (kind "probe", one "checkpoint" per step, schedule "monitored"),
so that `overtrain report RUN_DIR` draws them against tokens. The model's training mode,
its weights and the global random state are as they were before the call.
`overtrain.callbacks.AdaptabilityCallback` calls this from a `transformers.Trainer`;
docs/MONITOR.md gives the cost and the default settings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from overtrain.data.corpus import text_batches
from overtrain.data.tokenizer import token_byte_lengths
from overtrain.errors import DataError, SpecError
from overtrain.probes.metrics import check_rows
from overtrain.probes.suite import kl_rows, probe_rows
from overtrain.study.folder import RunFolder
from overtrain.study.plan import MONITORED
from overtrain.study.store import Store, export_tables

# The defaults docs/MONITOR.md measures: a measurement costs about 7 training steps of a 135M
# model (batches of 4 x 256), under 1% of training when taken every `callbacks.EVERY_STEPS` steps.
GAMMAS = (0.5, 1.0)
SEEDS = (0, 1)
KL_GAMMA = 0.5
HELDOUT_TOKENS = 4096
SEQ_LEN = 256
BATCH_SIZE = 4


def measure(model: torch.nn.Module, tokenizer, heldout: Sequence[str], *, run_dir: str | Path | None = None,
            step: int | None = None, tokens: int | None = None, gammas: Sequence[float] = GAMMAS,
            seeds: Sequence[int] = SEEDS, kl_gamma: float = KL_GAMMA, heldout_tokens: int = HELDOUT_TOKENS,
            seq_len: int = SEQ_LEN, batch_size: int = BATCH_SIZE,
            tokens_counted: str = "given by the caller") -> dict[str, float]:
    """Measure `model` now; return {step, tokens, bpb, loss_nats, delta_bpb_gamma<g> (mean over the
    seeds), kl_sharpness_gamma<g>, seconds}, and append its rows to `run_dir` when given.

    heldout: texts the model does not train on, the same at every call (at least one window of
    `seq_len` tokens; windows are shortened to the model's longest sequence).
    step, tokens: where the run is; `run_dir` needs `tokens` (the report's x axis).
    tokens_counted: how `tokens` was counted, written beside the results.
    """
    started = time.perf_counter()
    if run_dir is not None and tokens is None:
        raise SpecError(f"measure(run_dir={str(run_dir)!r}): give tokens=, the tokens seen so far (the report's x axis)")
    seq_len = window_length(model, seq_len)
    batches = heldout_batches(tokenizer, heldout, heldout_tokens, seq_len, batch_size)
    byte_lengths = token_byte_lengths(tokenizer)
    sensitivity = {"gammas": list(gammas), "seeds": list(seeds)}
    rows = probe_rows(model, batches, byte_lengths, sensitivity, None)
    rows += kl_rows(model, batches[:1], kl_gamma, seeds)
    check_rows(rows)
    found = {"step": step, "tokens": tokens, **summary(rows), "seconds": time.perf_counter() - started}
    if run_dir is not None:
        settings = {"model": model_name(model), "heldout_tokens": sum(b["input_ids"].numel() for b in batches),
                    "seq_len": seq_len, "kl_gamma": kl_gamma, "tokens_counted": tokens_counted}
        append_rows(run_dir, rows, step, tokens, settings, sensitivity)
    return found


def window_length(model: torch.nn.Module, seq_len: int) -> int:
    """`seq_len`, or the model's longest sequence when that is shorter."""
    return min(seq_len, getattr(model.config, "max_position_embeddings", None) or seq_len)


def heldout_batches(tokenizer, texts: Sequence[str], tokens: int, seq_len: int, batch_size: int) -> list[dict]:
    """The held-out windows; a one-line error when the texts are not texts or too short."""
    if isinstance(texts, str) or not texts or not all(isinstance(text, str) for text in texts):
        raise DataError("heldout: expected a non-empty list of texts (strings)")
    batches = text_batches(list(texts), tokenizer, tokens, seq_len, batch_size)
    if not batches:
        raise DataError(f"heldout: {len(texts)} texts give fewer than one window of {seq_len} tokens "
                        "in this tokenizer; give more held-out text")
    return batches


def summary(rows: list[dict]) -> dict[str, float]:
    """The numbers a person follows along a run: bpb, its rise under each noise size (mean over
    seeds), the KL sharpness."""
    frame = pd.DataFrame(rows)
    found = {metric: frame.loc[frame["metric"] == metric, "value"].iloc[0] for metric in ("bpb", "loss_nats")}
    rises = frame[frame["metric"] == "delta_bpb"].groupby("gamma")["value"].mean()
    found |= {f"delta_bpb_gamma{gamma:g}": rise for gamma, rise in rises.items()}
    kl = frame[frame["metric"] == "kl_sharpness"].iloc[0]
    found[f"kl_sharpness_gamma{kl['gamma']:g}"] = kl["value"]
    return {name: float(value) for name, value in found.items()}  # plain floats: loggers serialise them


def describe(found: dict[str, float]) -> str:
    """One line for a log: where the run is, what was measured and what it cost."""
    where = f"step {found['step']}" if found.get("step") is not None else "now"
    if found.get("tokens") is not None:
        where += f" ({found['tokens']:,} tokens)"
    rises = ", ".join(f"{value:+.4f} at gamma {name.removeprefix('delta_bpb_gamma')}"
                      for name, value in found.items() if name.startswith("delta_bpb_gamma"))
    kl = next(f"{value:.4g} (gamma {name.removeprefix('kl_sharpness_gamma')})"
              for name, value in found.items() if name.startswith("kl_sharpness_gamma"))
    return (f"overtrain monitor, {where}: held-out bpb {found['bpb']:.4f}; bpb rise under noise {rises}; "
            f"KL sharpness {kl}; measured in {found['seconds']:.2f} s")


def model_name(model: torch.nn.Module) -> str:
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


def append_rows(run_dir: str | Path, rows: list[dict], step: int | None, tokens: int, settings: dict,
                sensitivity: dict) -> None:
    """One measurement as one finished probe cell of the run folder's store, named by its step
    (a step measured again, by a resumed run, replaces the earlier rows), then results.csv."""
    folder = RunFolder(run_dir)
    try:
        folder.path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError(f"{folder}: run folder is not writable ({err.strerror})") from None
    if folder.study.exists():
        raise SpecError(f"{folder}: holds a study (study.json); give the monitor a run folder of its own")
    folder.monitor.write_text(json.dumps({"name": f"{settings['model']}, monitored while training",
                                          "monitor": settings, "sensitivity": sensitivity}, indent=1))
    label = f"step-{step}" if step is not None else f"tokens-{tokens}"
    key = f"monitor-{label}"
    context = {"checkpoint": label, "schedule": MONITORED, "decayed": 0, "tokens": tokens, "step": step}
    store = Store(folder.store)
    try:
        store.start(key, "probe", label, {"step": step, "tokens": tokens, **settings, **sensitivity})
        store.finish(key, "probe", [{**context, **row} for row in rows])
        store.add_to_plan(label, "probe", key)
        export_tables(folder, store)
    finally:
        store.close()
