"""The Hessian of an `Objective` without forming it: as an operator, its top eigenvalues, its trace.

- `HessianOperator`: H as a scipy `LinearOperator` on flat vectors, one HVP per product;
- `hessian_eigenvalues`: top-k eigenvalues by Lanczos (scipy `eigsh`, ARPACK, on that
  operator), with the HVPs used and the residuals ||Hv - lambda v||;
- `hessian_trace`: Hutchinson (Rademacher probes) or Hutch++ with a standard error,
  by `stochastic_trace`, which takes any symmetric matrix-vector product.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from overtrain.errors import SpecError
from overtrain.probes.objective import Objective, flatten, unflatten

TRACE_METHODS = ("hutchinson", "hutch++")


class HessianOperator(LinearOperator):
    """The Hessian of an objective as a scipy LinearOperator on flat vectors (float64 by default).

    Each product is one HVP in the parameters' own dtype (float32 in practice,
    float64 when the model was converted); `hvps` counts them.
    """

    def __init__(self, objective: Objective, dtype: type = np.float64):
        self.objective = objective
        self.hvps = 0
        some_param = next(iter(objective.params.values()))
        self.torch_dtype, self.device = some_param.dtype, some_param.device
        n = objective.dimension
        super().__init__(dtype=np.dtype(dtype), shape=(n, n))

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        vector = torch.from_numpy(np.ascontiguousarray(x, dtype=self.dtype).ravel())
        vector = vector.to(dtype=self.torch_dtype, device=self.device)
        product = self.objective.hvp(unflatten(vector, self.objective.params))
        self.hvps += 1
        return flatten(product).cpu().numpy().astype(self.dtype, copy=False)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)  # the Hessian is symmetric

    def residual(self, value: float, vector: np.ndarray) -> float:
        """||H v - value v|| for a unit vector v (one HVP)."""
        return float(np.linalg.norm(self.matvec(vector) - value * vector))


# --------------------------------------------------------------------------- eigenvalues


@dataclass
class HessianEigen:
    """Top-k Hessian eigenpairs, largest first."""

    eigenvalues: list[float]
    residuals: list[float]       # ||H v - lambda v|| per eigenpair (unit v)
    hvps: int                    # HVPs used by the solver (the residual check costs k more)
    seconds: float
    eigenvectors: np.ndarray = field(repr=False)  # [dimension, k], unit columns

    def to_rows(self) -> list[dict]:
        """The top eigenvalue, its residual and the solver's HVPs, then eigenvalues 2..k."""
        rows = [{"metric": "hessian_top_eig", "value": self.eigenvalues[0]},
                {"metric": "hessian_eig_residual", "value": self.residuals[0]},
                {"metric": "hessian_eig_hvps", "value": self.hvps}]
        return rows + [{"metric": f"hessian_eig_{rank}", "value": value}
                       for rank, value in enumerate(self.eigenvalues[1:], start=2)]


# The Lanczos basis is ncv parameter-sized vectors (ARPACK holds about ncv + 4). In float64
# that is 8.6 GiB for a 135M-parameter model at ncv 8; above this size it is kept in float32,
# half of that, which still resolves the top eigenvalues far below any tolerance a model's
# float32 HVPs can support.
FLOAT64_BASIS_LIMIT_BYTES = 2**30


def hessian_eigenvalues(objective: Objective, k: int = 1, tol: float = 1e-4, seed: int = 0,
                        ncv: int | None = None, max_restarts: int | None = None) -> HessianEigen:
    """Top-k eigenvalues (largest algebraic) by implicitly restarted Lanczos (ARPACK).

    `tol` is ARPACK's relative accuracy on the Ritz values (the eigenvalues come out
    far more accurate: their error is of the order of the squared residual). `ncv`,
    the Lanczos basis size, defaults to max(2k + 1, 8): scipy's default of 20 spends
    20 HVPs before its first convergence check, where 9-12 HVPs reach 1e-6 on the
    benchmark model. The start vector is a seeded Gaussian: same seed, same numbers.
    The HVPs share one kept gradient graph (see `Objective.kept_graph`). The basis is
    float64 unless that would pass FLOAT64_BASIS_LIMIT_BYTES; then float32, with `tol`
    raised to at least 1e-4 (float32's own precision stops ARPACK short of less).
    """
    dimension = objective.dimension
    ncv = min(dimension, max(2 * k + 1, 8)) if ncv is None else ncv
    basis_dtype = np.float64 if (ncv + 4) * dimension * 8 <= FLOAT64_BASIS_LIMIT_BYTES else np.float32
    if basis_dtype == np.float32:
        tol = max(tol, 1e-4)
    operator = HessianOperator(objective, basis_dtype)
    start_vector = np.random.default_rng(seed).standard_normal(dimension).astype(basis_dtype)
    started = time.perf_counter()
    with objective.kept_graph():
        values, vectors = eigsh(operator, k=k, which="LA", tol=tol, v0=start_vector, ncv=ncv, maxiter=max_restarts)
        seconds = time.perf_counter() - started
        hvps = operator.hvps
        order = np.argsort(values)[::-1]
        values, vectors = values[order], vectors[:, order]
        residuals = [operator.residual(value, vectors[:, i]) for i, value in enumerate(values)]
    return HessianEigen([float(v) for v in values], residuals, hvps, seconds, vectors)


# --------------------------------------------------------------------------- trace


@dataclass
class HessianTrace:
    trace: float
    standard_error: float
    hvps: int
    method: str

    def to_rows(self) -> list[dict]:
        return [{"metric": "hessian_trace", "value": self.trace},
                {"metric": "hessian_trace_se", "value": self.standard_error}]


def hessian_trace(objective: Objective, n_hvps: int = 30, seed: int = 0, method: str = "hutchinson") -> HessianTrace:
    """Stochastic trace estimate from `n_hvps` Hessian-vector products (see `stochastic_trace`).

    The HVPs share one kept gradient graph (see `Objective.kept_graph`).
    """
    params = objective.params
    some_param = next(iter(params.values()))

    def hvp(vector: torch.Tensor) -> torch.Tensor:
        return flatten(objective.hvp(unflatten(vector, params)))

    with objective.kept_graph():
        trace, standard_error = stochastic_trace(hvp, objective.dimension, n_hvps, seed, method,
                                                 some_param.dtype, some_param.device)
    return HessianTrace(trace, standard_error, n_hvps, method)


def stochastic_trace(matvec: Callable[[torch.Tensor], torch.Tensor], dimension: int, n_products: int, seed: int = 0,
                     method: str = "hutchinson", dtype: torch.dtype = torch.float64,
                     device: torch.device | str = "cpu") -> tuple[float, float]:
    """(trace, standard error) of a symmetric operator from `n_products` products `matvec(v)`.

    "hutchinson": mean of z^T A z over seeded Rademacher z; memory: one probe.
    "hutch++" (Meyer et al. 2021): the trace of A on a sketched top subspace exactly,
    plus Hutchinson on the rest; lower variance when a few eigenvalues dominate, but
    it holds 2 * n_products / 3 vectors. The standard error is that of the Hutchinson
    part (the sketched part is exact given the sketch).
    """
    if method not in TRACE_METHODS:
        raise SpecError(f"method={method!r}: choose 'hutchinson' or 'hutch++'")
    if method == "hutch++" and (n_products // 3 < 1 or n_products - 2 * (n_products // 3) < 2):
        raise SpecError(f"hutch++ needs at least 4 products, got {n_products}")
    generator = torch.Generator().manual_seed(seed)

    def rademacher() -> torch.Tensor:
        signs = torch.randint(0, 2, (dimension,), generator=generator, dtype=torch.int8)
        return (2 * signs - 1).to(dtype=dtype, device=device)

    if method == "hutchinson":
        samples = []
        for _ in range(n_products):
            probe = rademacher()
            samples.append(torch.dot(probe, matvec(probe)).double().item())
        return float(np.mean(samples)), _standard_error(samples)
    n_sketch = n_products // 3  # hutch++
    n_residual = n_products - 2 * n_sketch
    sketch = torch.stack([matvec(rademacher()) for _ in range(n_sketch)], dim=1)
    basis, _ = torch.linalg.qr(sketch)
    exact_part = sum(torch.dot(basis[:, i], matvec(basis[:, i])).double().item() for i in range(n_sketch))
    samples = []
    for _ in range(n_residual):
        probe = rademacher()
        probe = probe - basis @ (basis.T @ probe)  # project out the sketched subspace
        samples.append(torch.dot(probe, matvec(probe)).double().item())
    return exact_part + float(np.mean(samples)), _standard_error(samples)


def _standard_error(samples: list[float]) -> float:
    return float(np.std(samples, ddof=1) / math.sqrt(len(samples)))
