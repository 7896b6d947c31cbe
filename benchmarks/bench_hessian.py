"""Hessian probes: HVP cost, and the top eigenvalue by Lanczos vs power iteration vs PyHessian.

Same model (briefly pre-trained on the Python docs), same held-out batch, same machine,
one process. Prints, side by side:
  - HVP time / gradient time, for double backward, for jvp-of-grad, and for double
    backward from a kept gradient graph, as the solvers run it (target <= 3x);
  - wall time and HVPs to the top eigenvalue at 1e-3 relative tolerance: overtrain's
    Lanczos (scipy eigsh), power iteration on the same HVPs (PyHessian's stopping rule:
    relative change < tol) and PyHessian's `hessian(...).eigenvalues()` if installed
    (`pip install pyhessian --no-deps`); each one's error against a tight Lanczos reference;
  - peak resident memory of each probe above the memory held before it (Linux VmHWM,
    reset through /proc/self/clear_refs).

    python benchmarks/bench_hessian.py [--train-steps 60] [--threads 2] [--repeats 9] [--solver-repeats 3]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from pydoc_data.topics import topics

import torch
import torch.nn.functional as F

from overtrain.data.corpus import prepare_corpus
from overtrain.models.build import build_model, parameter_count
from overtrain.probes.hessian import hessian_eigenvalues
from overtrain.probes.objective import HVP_METHODS, Objective, causal_lm_objective, dot
from overtrain.runtime.memory import peak_resident_gib, reset_peak_resident
from overtrain.spec import ModelSize

TOL = 1e-3


# --------------------------------------------------------------------------- memory


def measure(function):
    """(result, wall s, CPU s, peak resident MiB above the memory resident at the start).

    CPU time (all threads) is reported beside wall time: on a shared machine it is
    the steadier of the two.
    """
    reset_peak_resident()
    start_gib = peak_resident_gib()
    started, started_cpu = time.perf_counter(), time.process_time()
    result = function()
    wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    return result, wall, cpu, (peak_resident_gib() - start_gib) * 1024


def measure_best_of(solvers: dict, repeats: int) -> dict:
    """measure() of each solver `repeats` times, interleaved; the fastest wall and CPU, the largest peak."""
    runs = {name: [] for name in solvers}
    for _ in range(repeats):
        for name, solver in solvers.items():
            runs[name].append(measure(solver))
    return {name: (results[0][0], min(r[1] for r in results), min(r[2] for r in results),
                   max(r[3] for r in results)) for name, results in runs.items()}


# --------------------------------------------------------------------------- set-up


def pretrained_model_and_batch(steps: int):
    docs = [text for _, text in sorted(topics.items())]
    corpus = prepare_corpus(docs[8:], docs[:8], 4096)
    model = build_model(ModelSize(d_model=64, n_layers=2, n_heads=4), len(corpus.tokenizer), seed=0)
    # A few hundred thousand tokens of training: the curvature of a model that has
    # learned something, not of the random initialisation.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _, batch in zip(range(steps), corpus.train_batches(8, 128, seed=0)):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    heldout = corpus.heldout_batches(8, 128, 8 * 128)[0]
    return model, heldout


# --------------------------------------------------------------------------- HVP vs gradient


def hvp_over_gradient(objective: Objective, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each of `repeats` gradients and HVPs by each method, timed interleaved.

    "kept graph" is a double-backward HVP inside `Objective.kept_graph()`, as the
    Lanczos and trace solvers run them: the gradient graph is built once (before the
    timing, as the solvers amortize it) and each HVP is only the second backward.
    """
    vector = {n: torch.randn_like(p) for n, p in objective.params.items()}
    fresh = {method: Objective(objective.params, objective.terms, objective.context, method) for method in HVP_METHODS}
    kept = Objective(objective.params, objective.terms, objective.context, "double_backward")
    methods = {
        "gradient": objective.gradient,
        "double_backward": lambda: fresh["double_backward"].hvp(vector),
        "jvp_of_grad": lambda: fresh["jvp_of_grad"].hvp(vector),
        "kept graph": lambda: kept.hvp(vector),
    }
    times = {name: [] for name in methods}
    with kept.kept_graph():
        for name, function in methods.items():
            function()  # warm-up
        for _ in range(repeats):  # interleaved: a busy neighbour slows every method alike
            for name, function in methods.items():
                started = time.perf_counter()
                function()
                times[name].append(time.perf_counter() - started)
    return times


# --------------------------------------------------------------------------- eigenvalue solvers


def lanczos_top_eigenvalue(objective: Objective, tol: float) -> tuple[float, int]:
    """(top eigenvalue, HVPs) by hessian_eigenvalues with its default basis size."""
    result = hessian_eigenvalues(objective, k=1, tol=tol, seed=0)
    return result.eigenvalues[0], result.hvps


def power_iteration(objective: Objective, tol: float, seed: int, max_hvps: int = 1000) -> list[float]:
    """Estimates v^T H v after each HVP, until one changes by less than tol (relative).

    PyHessian's rule; it converges to the eigenvalue of largest magnitude.
    """
    generator = torch.Generator().manual_seed(seed)
    vector = {n: torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in objective.params.items()}
    estimates = []
    while len(estimates) < max_hvps:
        norm = dot(vector, vector) ** 0.5
        vector = {n: v / norm for n, v in vector.items()}
        product = objective.hvp(vector)
        estimates.append(dot(vector, product))
        if len(estimates) > 1 and abs(estimates[-1] - estimates[-2]) < tol * abs(estimates[-1]):
            break
        vector = product
    return estimates


def power_iteration_top_eigenvalue(objective: Objective, tol: float) -> tuple[float, int, list[float]]:
    """(last estimate, HVPs, every estimate); the HVPs share one kept graph, as Lanczos' do."""
    with objective.kept_graph():
        estimates = power_iteration(objective, tol, seed=0)
    return estimates[-1], len(estimates), estimates


class LogitsOnly(torch.nn.Module):
    """PyHessian calls criterion(model(x), y): x = input ids, model(x) = logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def masked_lm_criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The HF causal-LM loss: shift, mean over unmasked tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def pyhessian_top_eigenvalue(model: torch.nn.Module, batch: dict, tol: float) -> tuple[float, int]:
    pyhessian_module = importlib.import_module("pyhessian.hessian")  # the module, not the class of that name

    hvps = 0
    original_product = pyhessian_module.hessian_vector_product

    def counted_product(*args, **kwargs):  # counts PyHessian's HVPs; the computation is its own
        nonlocal hvps
        hvps += 1
        return original_product(*args, **kwargs)

    pyhessian_module.hessian_vector_product = counted_product
    previous_attention = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        torch.manual_seed(0)
        computer = pyhessian_module.hessian(LogitsOnly(model), masked_lm_criterion,
                                            data=(batch["input_ids"], batch["labels"]), cuda=False)
        eigenvalues, _ = computer.eigenvalues(maxIter=1000, tol=tol, top_n=1)
    finally:
        pyhessian_module.hessian_vector_product = original_product
        model.set_attn_implementation(previous_attention)
        model.zero_grad(set_to_none=True)  # PyHessian leaves graph-carrying .grad behind
    return eigenvalues[0], hvps


def pyhessian_available() -> bool:
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9, help="timings of a gradient and of an HVP")
    parser.add_argument("--solver-repeats", type=int, default=3, help="runs of each eigenvalue solver")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, batch = pretrained_model_and_batch(args.train_steps)
    objective = causal_lm_objective(model, [batch])
    print(f"model: {parameter_count(model):,} parameters, batch 8x128, torch {torch.__version__}, "
          f"{args.threads} threads, loss {objective.value():.3f} nats\n")

    times = hvp_over_gradient(objective, args.repeats)
    gradient_min, gradient_median = min(times["gradient"]), statistics.median(times["gradient"])
    print(f"{'wall s':<18}{'min':>8}{'median':>8}{'min / grad':>12}{'median / grad':>15}")
    for name, values in times.items():
        low, middle = min(values), statistics.median(values)
        print(f"{name:<18}{low:>8.3f}{middle:>8.3f}{low / gradient_min:>12.2f}{middle / gradient_median:>15.2f}")

    reference = hessian_eigenvalues(objective, k=1, tol=1e-10, seed=123)
    top = reference.eigenvalues[0]
    print(f"\nreference top eigenvalue {top:.6g} (Lanczos tol 1e-10, {reference.hvps} HVPs, "
          f"residual {reference.residuals[0]:.2e})\n")

    solvers = {
        "lanczos (eigsh)": lambda: lanczos_top_eigenvalue(objective, TOL),
        "power iteration": lambda: power_iteration_top_eigenvalue(objective, TOL),
    }
    if pyhessian_available():
        solvers["pyhessian"] = lambda: pyhessian_top_eigenvalue(model, batch, TOL)
    else:
        print("pyhessian not installed: `pip install pyhessian --no-deps` to compare\n")
    results = measure_best_of(solvers, args.solver_repeats)
    ours = results["lanczos (eigsh)"]
    print(f"top eigenvalue, each solver's own stopping rule at tol {TOL:g}; best of {args.solver_repeats} runs")
    print(f"{'':<17}{'value':>10}{'rel err':>9}{'HVPs':>6}{'wall s':>8}{'CPU s':>8}{'wall/ours':>11}"
          f"{'CPU/ours':>10}{'HVPs/ours':>11}{'peak MiB':>10}")
    for name, ((value, hvps, *_), wall, cpu, peak) in results.items():
        print(f"{name:<17}{value:>10.6g}{abs(value - top) / abs(top):>9.1e}{hvps:>6}{wall:>8.2f}{cpu:>8.2f}"
              f"{wall / ours[1]:>11.2f}{cpu / ours[2]:>10.2f}{hvps / ours[0][1]:>11.2f}{peak:>10.1f}")
    estimates = results["power iteration"][0][2]
    within = next((str(i + 1) for i, e in enumerate(estimates) if abs(e - top) <= TOL * abs(top)), "never")
    print(f"\npower iteration came within {TOL:g} of the reference after: {within} (of {len(estimates)} HVPs)")
    print(f"one parameter-sized float32 vector = {parameter_count(model) * 4 / 2**20:.2f} MiB; "
          "both overtrain's solvers and pyhessian keep the gradient graph alive between HVPs "
          "(one backward per HVP after the first)")


if __name__ == "__main__":
    main()
