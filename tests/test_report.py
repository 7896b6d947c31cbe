"""The report as a person sees it: one self-contained page, every figure there, no errors."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from overtrain.analysis.report import write_report
from overtrain.probes import metrics
from overtrain.study.folder import ReportFolder, RunFolder

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BUDGETS = [4096, 8192, 16384, 32768, 65536]
SCHEDULES = {"cosine": 1, "wsd": 1, "constant": 0}
GAMMAS, NOISE_SEEDS = [0.5, 1.0], [0, 1, 2]
LRS, FINETUNE_SEEDS, STEPS = [1e-4, 1e-3], [0, 1], [0, 5, 10]
BYTES_PER_TOKEN = 3.0
STUDY = {"name": "synthetic", "data": {"corpus": "default"}, "tokenizer": {"vocab_size": 1024},
         "model": {"preset": "nano"},
         "pretrain": {"budgets": BUDGETS, "schedules": list(SCHEDULES), "peak_lr": 3e-3},
         "sensitivity": {"gammas": GAMMAS, "seeds": NOISE_SEEDS},
         "finetune": {"tasks": ["math"], "lrs": LRS, "steps": STEPS[-1], "seeds": FINETUNE_SEEDS}}


def synthetic_results(seed: int = 0) -> pd.DataFrame:
    """Tidy rows shaped like a real study's: base bpb falls, sensitivity grows, fine-tuning forgets more late."""
    rng = np.random.default_rng(seed)
    rows = []
    for schedule, decayed in SCHEDULES.items():
        for tokens in BUDGETS:
            x = np.log2(tokens / BUDGETS[0])
            checkpoint = {"checkpoint": f"{schedule}-{tokens}", "schedule": schedule, "decayed": decayed, "tokens": tokens}
            base_nats = 6.0 - 0.25 * x - 0.1 * decayed
            probe = {**checkpoint, "kind": "probe", "cell": f"probe-{schedule}-{tokens}", "step": np.nan}
            rows += [{**probe, "metric": "loss_nats", "value": base_nats},
                     {**probe, "metric": "bpb", "value": _bpb(base_nats)}]
            for gamma in GAMMAS:
                for noise_seed in NOISE_SEEDS:
                    delta = gamma * 0.02 * 2**x * (1 + 0.5 * decayed) * rng.lognormal(0, 0.1)
                    rows += [{**probe, "gamma": gamma, "seed": noise_seed, "metric": "delta_bpb", "value": delta},
                             {**probe, "gamma": gamma, "seed": noise_seed, "metric": "perturbed_bpb",
                              "value": _bpb(base_nats) + delta}]
            for lr in LRS:
                for ft_seed in FINETUNE_SEEDS:
                    cell = {**checkpoint, "kind": "finetune", "cell": f"ft-{schedule}-{tokens}-{lr}-{ft_seed}",
                            "task": "math", "lr": lr, "seed": ft_seed}
                    for step in STEPS:
                        progress = step / STEPS[-1]
                        id_nats = 5.5 - 0.2 * x - progress * (1 + 300 * lr) + rng.normal(0, 0.02)
                        ood_nats = base_nats + progress * lr * 40 * 2**x + rng.normal(0, 0.01)
                        for metric, value in (("id_loss_nats", id_nats), ("id_bpb", _bpb(id_nats)),
                                              ("ood_loss_nats", ood_nats), ("ood_bpb", _bpb(ood_nats))):
                            rows.append({**cell, "step": step, "metric": metric, "value": value})
    frame = pd.DataFrame(rows)
    frame["weights"] = frame["checkpoint"]
    return frame


def _bpb(nats: float) -> float:
    return nats / np.log(2) / BYTES_PER_TOKEN


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    return write_report(synthetic_results(), STUDY, tmp_path_factory.mktemp("run") / "report", n_boot=200)


def test_page_is_self_contained_with_every_figure_embedded(report_dir):
    page = (report_dir / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    pngs = sorted(report_dir.glob("*.png"))
    assert len(sources) == len(pngs) >= 8
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from disk or network


def test_page_leads_with_the_recommendation_then_the_sections_in_order(report_dir):
    page = (report_dir / "index.html").read_text()
    titles = re.findall(r"<h2>([^<]+)</h2>", page)
    assert titles[0] == "Recommendation"
    assert titles[1:] == ["Base model", "Sensitivity to Gaussian perturbation", "Fine-tuning on math at a fixed LR",
                          "Fine-tuning on math at the tuned LR"]  # no sharpness, theory or mitigation data yet
    assert "fine-tune the" in page and "within +0.1 of the best base checkpoint" in page


def test_tables_and_summary_are_written(report_dir):
    names = {p.stem for p in ReportFolder(report_dir).tables.glob("*.csv")}
    assert {"base_model", "sensitivity_rank_trend", "inflection_T_pre_by_gamma", "tuned_lr_math",
            "matched_loss_checkpoints_math", "matched_loss_lrs_math", "recommendation_math"} <= names
    trend = pd.read_csv(ReportFolder(report_dir).table("sensitivity_rank_trend"))
    assert (trend["rho"] > 0.9).all()  # the synthetic sensitivity grows with tokens
    summary = (report_dir / "summary.md").read_text()
    assert summary.startswith("# overtrain report: synthetic") and "![base_bpb](base_bpb.png)" in summary


def probe_results_only() -> pd.DataFrame:
    """Enough for a small, quick report: the probes of every checkpoint, no fine-tuning."""
    results = synthetic_results()
    return results[results["kind"] == "probe"]


def test_rebuild_drops_stale_figures_and_shows_sharpness_once_measured(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "old_figure.png").write_bytes(b"")
    probes = probe_results_only()
    base = probes[probes["metric"] == "bpb"]
    sharpness = base.assign(metric="hessian_top_eig", value=lambda f: 10 * f["tokens"] ** 0.3)
    write_report(pd.concat([probes, sharpness]), STUDY, out, n_boot=50)
    page = (out / "index.html").read_text()
    assert not (out / "old_figure.png").exists()
    assert "<h2>Sharpness</h2>" in page and (out / "sharpness_hessian_top_eig.png").exists()
    assert "No fine-tuning results yet" in page


def test_benchmark_accuracy_appears_once_measured(tmp_path):
    results = synthetic_results()
    final = results[(results["metric"] == "ood_bpb") & (results["step"] == STEPS[-1])]
    benchmark = final.assign(metric="bench_arc_acc", value=lambda f: 1 - f["value"] / 4)
    small = pd.concat([results, benchmark])
    small = small[small["schedule"] == "cosine"]
    out = write_report(small, STUDY, tmp_path / "report", n_boot=50)
    assert (out / "bench_arc_acc_math.png").exists() and "Benchmark arc" in (out / "index.html").read_text()


def test_report_builds_from_a_run_folder_store(tmp_path):
    from overtrain.analysis.report import build_report
    from overtrain.study.store import Store

    store = Store(RunFolder(tmp_path).store)
    cells = list(probe_results_only().groupby("cell"))
    store.set_plan([(cell, rows["kind"].iloc[0], None) for cell, rows in cells])
    for cell, rows in cells:
        store.set_plan_key(cell, cell)
        store.start(cell, rows["kind"].iloc[0], cell, {})
        store.finish(cell, rows["kind"].iloc[0], rows.to_dict("records"))
    store.close()
    (tmp_path / "study.json").write_text(json.dumps(STUDY))
    out = build_report(tmp_path, n_boot=50)
    page = (out / "index.html").read_text()
    assert "<h2>Sensitivity to Gaussian perturbation</h2>" in page and page.count("<img ") == 3


# -- in a real browser ----------------------------------------------------------------------

# Appended to a copy of the page: after load, record every image's state and any error in the DOM.
PROBE_SCRIPT = """
<script>
  window.__errors = [];
  window.addEventListener("error", e => window.__errors.push(String(e.message || e.target.src || e)), true);
  const originalError = console.error;
  console.error = (...args) => { window.__errors.push(args.join(" ")); originalError(...args); };
  window.addEventListener("load", () => {
    const images = [...document.images];
    const loaded = images.filter(img => img.complete && img.naturalWidth > 0).length;
    const marker = document.createElement("pre");
    marker.id = "probe";
    marker.textContent = JSON.stringify({images: images.length, loaded: loaded, errors: window.__errors});
    document.body.appendChild(marker);
  });
</script>
"""
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


def chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_page_renders_in_chromium_with_every_image_loaded_and_no_console_error(report_dir, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text((report_dir / "index.html").read_text().replace("</body>", PROBE_SCRIPT + "</body>"))
    dom = chromium(probed, tmp_path / "profile", "--dump-dom")
    marker = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout)
    assert marker, dom.stderr[-2000:]
    state = json.loads(marker.group(1).replace("&quot;", '"'))
    assert state["images"] >= 8 and state["loaded"] == state["images"], state
    assert state["errors"] == []
    assert not re.search(r"CONSOLE.*(error|Uncaught)", dom.stderr, re.IGNORECASE)

    # A screenshot of the top of the page, kept where a person can look at it.
    shots = Path(os.environ.get("OVERTRAIN_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    screenshot = shots / "report_top.png"
    chromium(report_dir / "index.html", tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,2000")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 50_000


def test_each_task_is_judged_by_its_own_metric(tmp_path):
    """One task with informative accuracy, one with none: each gets its own task metric, no empty plot."""
    math = synthetic_results()
    math = math[math["schedule"] == "cosine"]
    qa = math[math["kind"] == "finetune"].assign(task="qa", cell=lambda f: "qa-" + f["cell"])
    final = qa[(qa["metric"] == "id_bpb") & (qa["step"] == STEPS[-1])]
    accuracy = final.assign(metric="id_acc", value=lambda f: 1 / f["value"])
    out = write_report(pd.concat([math, qa, accuracy]), STUDY, tmp_path / "report", n_boot=20)
    summary = (out / "summary.md").read_text()
    answer = {line.split(":")[0]: line for line in summary.splitlines() if ": fine-tune" in line}
    assert "task accuracy" in answer["qa"] and "bpb" not in answer["qa"].split(";")[0]
    assert "task held-out bpb" in answer["math"]
    assert (out / "fixed_lr_id_math.png").exists() and (out / "fixed_lr_id_qa.png").exists()


# -- divergence, pre-training seeds, sharpness against forgetting, significant figures ----------

def with_a_diverged_run(results: pd.DataFrame, cell: str, at_step: int = 3) -> pd.DataFrame:
    """The rows a real diverged fine-tune leaves: step 0 evaluated, a `diverged_at_step` row (step NaN),
    nothing evaluated from the step it diverged at on."""
    run = results["cell"] == cell
    kept = results[~run | (results["step"] < at_step)]
    divergence = results[run].iloc[[0]].assign(step=np.nan, metric="diverged_at_step", value=at_step)
    return pd.concat([kept, divergence], ignore_index=True)


@pytest.fixture(scope="module")
def diverged_report(tmp_path_factory) -> Path:
    results = synthetic_results()
    probes = results[(results["kind"] == "probe") & (results["metric"] == "bpb")]
    sharpness = probes.assign(metric="hessian_top_eig", value=lambda f: 10 * f["tokens"] ** 0.3)
    results = with_a_diverged_run(pd.concat([results, sharpness], ignore_index=True), "ft-cosine-16384-0.001-1")
    return write_report(results, STUDY, tmp_path_factory.mktemp("diverged") / "report", n_boot=50)


def test_a_diverged_run_is_listed_counted_and_named_in_the_captions(diverged_report):
    listed = pd.read_csv(ReportFolder(diverged_report).table("diverged_runs"))
    assert listed[["checkpoint", "lr", "seed", "diverged_at_step"]].values.tolist() == [["cosine-16384", 0.001, 1, 3]]
    fixed = pd.read_csv(ReportFolder(diverged_report).table("fixed_lr_ood_math"))
    point = fixed[(fixed["schedule"] == "cosine") & (fixed["tokens"] == 16384) & (fixed["lr"] == 1e-3)].iloc[0]
    assert point["diverged"] == 1 and point["n"] == 1  # the mean rests on the seed that finished
    assert fixed["diverged"].sum() == 1
    summary = (diverged_report / "summary.md").read_text()
    assert "## Diverged runs" in summary and "1 run diverged (1 fine-tune)" in summary
    assert "Contains 1 diverged run (cosine, 16.4k tokens, LR 0.001: 1)" in summary


def test_intervals_say_they_miss_the_pretraining_runs_luck_with_one_pretraining_seed(diverged_report):
    summary = (diverged_report / "summary.md").read_text()
    note = "only, not the pre-training run's own luck (one pre-training seed; add pretrain.seeds)."
    for section in ("## Sensitivity", "## Fine-tuning on math at a fixed LR", "## Fine-tuning on math at the tuned LR"):
        text = summary.split(section, 1)[1].split("\n## ", 1)[0]
        assert note in text, section


def test_sharpness_meets_forgetting_once_per_checkpoint_within_each_task_and_lr(diverged_report):
    found = pd.read_csv(ReportFolder(diverged_report).table("sharpness_vs_forgetting_hessian_top_eig_rho"))
    assert sorted(found["lr"]) == LRS and (found["n"] == len(BUDGETS) * len(SCHEDULES)).all()
    points = pd.read_csv(ReportFolder(diverged_report).table("sharpness_vs_forgetting_hessian_top_eig"))
    assert len(points) == len(BUDGETS) * len(SCHEDULES) * len(LRS)  # not one per fine-tuning run
    summary = (diverged_report / "summary.md").read_text()
    assert f"Spearman rho of {metrics.label('hessian_top_eig')} with forgetting within each (task, LR)" in summary
    assert "Median rho" in summary and "(n = 15, p = " in summary


def test_words_and_tables_carry_three_significant_figures(diverged_report):
    summary = (diverged_report / "summary.md").read_text()
    decimals = re.findall(r"\d[\d,]*\.\d+", summary)
    figures = {number: len(number.replace(",", "").replace(".", "").lstrip("0")) for number in decimals}
    assert decimals and max(figures.values()) <= 3, {n: f for n, f in figures.items() if f > 3}


def test_a_tuned_lr_at_an_end_of_the_grid_is_called_a_bound():
    import pandas as pd

    from overtrain.analysis.report import grid_edge_note

    tuned = pd.DataFrame({"tokens": [1, 2, 3], "lr": [1e-3, 3e-3, 1e-2]})
    assert grid_edge_note(tuned, [1e-3, 3e-3, 1e-2]).startswith(" At 2 of 3 budgets the tuned LR is at an end")
    assert grid_edge_note(tuned[tuned["lr"] == 3e-3], [1e-3, 3e-3, 1e-2]) == ""
