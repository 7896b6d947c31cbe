"""Probe one model outside a study: curvature and sharpness of its held-out loss, and,
given the model it was fine-tuned from, the curvature along that update and the drift."""

from __future__ import annotations

import pandas as pd

from overtrain.data.corpus import default_heldout_batches
from overtrain.errors import CheckpointError
from overtrain.models.series import SeriesCheckpoint, load_series_model
from overtrain.probes.drift import representation_drift
from overtrain.probes.metrics import check_rows
from overtrain.probes.suite import sharpness_rows, update_rows
from overtrain.runtime.hashing import weights_sha256


def probe_model(checkpoint: SeriesCheckpoint, options: dict, tokens: int, seq_len: int = 128, batch_size: int = 8,
                base: SeriesCheckpoint | None = None) -> pd.DataFrame:
    """Tidy rows {metric, value} of the sharpness probes (options: the study's `sharpness:` keys)
    on the first `tokens` of the default held-out text; with `base`, also u = theta - theta_base."""
    model, tokenizer = load_series_model(checkpoint)
    batches = default_heldout_batches(tokenizer, tokens, seq_len, batch_size)
    rows = sharpness_rows(model, batches, options)
    if base is not None:
        base_model, _ = load_series_model(base)
        if weights_sha256(base_model) == weights_sha256(model):
            raise CheckpointError(f"--base {base.label}: holds the same weights as {checkpoint.label}; "
                                  "there is no update to measure along")
        rows += update_rows(base_model, model, batches)
        rows += representation_drift(base_model, model, batches).to_rows()
    check_rows(rows)
    return pd.DataFrame(rows).assign(model=checkpoint.label)
