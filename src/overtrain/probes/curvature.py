"""Curvature of the held-out loss: Hessian-vector products and what they buy.

The loss is an `Objective`: a function of named parameters written as a sum of
terms, one per batch, so that gradients and Hessian-vector products (HVPs) are
accumulated term by term and only one batch's graph is alive at a time (solvers
trade that for speed inside `Objective.kept_graph`, see there). For a
causal LM over a fixed list of batches (`causal_lm_objective`) the loss is

    L(theta) = sum over batches, sum over unmasked next-token positions of -log p(y | x)
               -----------------------------------------------------------------
                     N = number of unmasked next-token positions in ALL batches

i.e. the mean over every predicted token of the batch set, not a mean of per-batch
means (the two differ when batches hold different numbers of unmasked tokens).

Built on HVPs (the Hessian is never formed):
- `hessian_eigenvalues`: top-k eigenvalues by Lanczos (scipy `eigsh`, ARPACK, on a
  `LinearOperator`), with HVP count and residuals ||Hv - lambda v||;
- `hessian_trace`: Hutchinson (Rademacher probes) or Hutch++, with a standard error;
- `curvature_along`: u^T H u / ||u||^2 and the first- and second-order terms of the
  Taylor expansion of L along u;
- `forgetting_prediction`: that expansion for u = theta_finetuned - theta_base set
  beside the observed rise in loss.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh
from torch.func import functional_call, grad, jvp

Params = dict[str, torch.Tensor]
LossFn = Callable[[Params], torch.Tensor]
Batch = dict[str, torch.Tensor]

HVP_METHODS = ("double_backward", "jvp_of_grad")


# --------------------------------------------------------------------------- objective


@dataclass
class Objective:
    """A scalar loss of named parameters, evaluated at `params`.

    loss(p) = sum(term(p) for term in terms). `params` are detached views of the
    model's weights (no copy); nothing here writes to them. `context` is entered
    around every evaluation (for HF models: eager attention, eval mode).
    `hvp_method` is "double_backward" (reverse-over-reverse, the default: fastest on
    CPU in benchmarks/bench_hessian.py) or "jvp_of_grad" (forward-over-reverse with
    torch.func).
    """

    params: Params
    terms: list[LossFn]
    context: Callable[[], AbstractContextManager] = nullcontext
    hvp_method: str = "double_backward"
    _kept_graphs: list[tuple[Params, tuple]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.hvp_method not in HVP_METHODS:
            raise ValueError(f"hvp_method={self.hvp_method!r}: choose one of {HVP_METHODS}")

    @classmethod
    def from_loss_fn(cls, loss_fn: LossFn, params: Params, hvp_method: str = "double_backward") -> Objective:
        """A single-term objective from any `loss_fn(params_dict) -> scalar tensor`."""
        return cls({n: p.detach() for n, p in params.items()}, [loss_fn], hvp_method=hvp_method)

    @property
    def dimension(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def value(self, params: Params | None = None) -> float:
        """The loss at `params` (default: at the objective's point), in float64."""
        params = self.params if params is None else params
        with self.context(), torch.no_grad():
            return math.fsum(term(params).double().item() for term in self.terms)

    def gradient(self) -> Params:
        with self.context():
            return _sum_over_terms(self.terms, partial(_term_gradient, self.params))

    def gradient_and_hvp(self, vector: Params) -> tuple[Params, Params]:
        """(gradient g, Hessian-vector product H v) at the objective's point."""
        if self._kept_graphs is not None:
            return _sum_pairs_over_terms(self._kept_graphs, partial(_hvp_from_gradient_graph, vector))
        term_hvp = _term_hvp_double_backward if self.hvp_method == "double_backward" else _term_hvp_jvp_of_grad
        with self.context():
            return _sum_pairs_over_terms(self.terms, partial(term_hvp, self.params, vector))

    @contextmanager
    def kept_graph(self) -> Iterator[None]:
        """Within this block, HVPs by double backward re-use one gradient graph per term.

        A double-backward HVP first builds the gradient with its graph (a forward and a
        backward pass), then differentiates g . v. At a fixed point that graph is the
        same for every v, so a solver that takes many HVPs (Lanczos, Hutchinson) keeps
        it: each further HVP is only the second backward. The price is memory: every
        term's graph is held until the block ends. Writing to the weights inside the
        block makes autograd raise (the saved tensors' versions change), never a stale
        product. jvp-of-grad objectives are unaffected.
        """
        if self.hvp_method != "double_backward" or self._kept_graphs is not None:
            yield
            return
        with self.context():
            self._kept_graphs = [_gradient_graph(self.params, term) for term in self.terms]
        try:
            yield
        finally:
            self._kept_graphs = None

    def hvp(self, vector: Params) -> Params:
        return self.gradient_and_hvp(vector)[1]


def _leaves(params: Params) -> Params:
    # Fresh autograd leaves sharing the weights' storage: gradients flow to them,
    # never to the model's own parameters.
    return {n: p.detach().requires_grad_() for n, p in params.items()}


def _term_gradient(params: Params, term: LossFn) -> Params:
    leaves = _leaves(params)
    grads = torch.autograd.grad(term(leaves), list(leaves.values()), materialize_grads=True)
    return dict(zip(leaves, grads))


def _gradient_graph(params: Params, term: LossFn) -> tuple[Params, tuple]:
    """Fresh leaves and the term's gradient with respect to them, with its graph."""
    leaves = _leaves(params)
    return leaves, torch.autograd.grad(term(leaves), list(leaves.values()), create_graph=True, materialize_grads=True)


def _hvp_from_gradient_graph(vector: Params, graph: tuple[Params, tuple], keep: bool = True) -> tuple[Params, Params]:
    leaves, grads = graph
    grad_dot_vector = sum((g * vector[n]).sum() for n, g in zip(leaves, grads))
    hvps = torch.autograd.grad(grad_dot_vector, list(leaves.values()), retain_graph=keep, materialize_grads=True)
    # A kept graph still holds the gradients: hand out copies, callers add into them.
    gradient = {n: g.detach().clone() if keep else g.detach() for n, g in zip(leaves, grads)}
    return gradient, dict(zip(leaves, hvps))


def _term_hvp_double_backward(params: Params, vector: Params, term: LossFn) -> tuple[Params, Params]:
    return _hvp_from_gradient_graph(vector, _gradient_graph(params, term), keep=False)


def _term_hvp_jvp_of_grad(params: Params, vector: Params, term: LossFn) -> tuple[Params, Params]:
    # The directional derivative of the gradient along v is H v; jvp also returns g.
    return jvp(grad(term), (params,), (vector,))


def _sum_over_terms(terms: list[LossFn], per_term: Callable[[LossFn], Params]) -> Params:
    total = per_term(terms[0])
    for term in terms[1:]:
        for name, value in per_term(term).items():
            total[name] += value
    return total


def _sum_pairs_over_terms(terms: list[LossFn], per_term) -> tuple[Params, Params]:
    first, second = per_term(terms[0])
    for term in terms[1:]:
        more_first, more_second = per_term(term)
        for name in first:
            first[name] += more_first[name]
            second[name] += more_second[name]
    return first, second


# --------------------------------------------------------------------------- HF causal LMs


@contextmanager
def eager_eval(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and eager attention within the block; both restored afterwards.

    SDPA kernels lack forward-mode AD (and, on some devices, double backward); the
    eager implementation is plain differentiable tensor algebra.
    """
    was_training = model.training
    previous = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = previous not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    model.eval()
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)
        model.train(was_training)


def count_predicted_tokens(batches: Sequence[Batch]) -> int:
    """Unmasked next-token positions: labels are shifted inside the loss, so position 0 predicts nothing."""
    return sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)


def causal_lm_objective(model: torch.nn.Module, batches: Sequence[Batch], hvp_method: str = "double_backward") -> Objective:
    """Held-out causal-LM loss of an HF model over a fixed list of batches (see the module docstring).

    Runs the model with eager attention (warns if it was set otherwise; the setting is
    restored after every evaluation) in eval mode.
    """
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in (None, "eager"):
        warnings.warn(f"{type(model).__name__} uses {attention!r} attention: curvature probes run it with 'eager' "
                      "attention (differentiable twice, forward-mode AD) and restore the setting afterwards.",
                      stacklevel=2)
    n_tokens = count_predicted_tokens(batches)
    if n_tokens == 0:
        raise ValueError("the batches hold no unmasked next-token label")
    device = next(model.parameters()).device
    terms = [partial(_summed_token_loss, model, _to_device(batch, device), n_tokens) for batch in batches]
    params = {n: p.detach() for n, p in model.named_parameters()}
    return Objective(params, terms, context=partial(eager_eval, model), hvp_method=hvp_method)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _summed_token_loss(model: torch.nn.Module, batch: Batch, n_tokens: int, params: Params) -> torch.Tensor:
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    logits = functional_call(model, params, (), inputs).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return nats / n_tokens


# --------------------------------------------------------------------------- flat vectors


def flatten(params: Params) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(vector: torch.Tensor, like: Params) -> Params:
    pieces = torch.split(vector, [p.numel() for p in like.values()])
    return {n: piece.view_as(p) for (n, p), piece in zip(like.items(), pieces)}


def dot(a: Params, b: Params) -> float:
    return math.fsum(torch.vdot(a[n].reshape(-1), b[n].reshape(-1)).double().item() for n in a)


class HessianOperator(LinearOperator):
    """The Hessian of an objective as a scipy LinearOperator on flat vectors (float64 by default).

    Each product is one HVP in the parameters' own dtype (float32 in practice,
    float64 when the model was converted); `hvp_count` counts them.
    """

    def __init__(self, objective: Objective, dtype: type = np.float64):
        self.objective = objective
        self.hvp_count = 0
        some_param = next(iter(objective.params.values()))
        self.torch_dtype, self.device = some_param.dtype, some_param.device
        n = objective.dimension
        super().__init__(dtype=np.dtype(dtype), shape=(n, n))

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        vector = torch.from_numpy(np.ascontiguousarray(x, dtype=self.dtype).ravel())
        vector = vector.to(dtype=self.torch_dtype, device=self.device)
        product = self.objective.hvp(unflatten(vector, self.objective.params))
        self.hvp_count += 1
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
    hvp_count: int               # HVPs used by the solver (the residual check costs k more)
    seconds: float
    eigenvectors: np.ndarray = field(repr=False)  # [dimension, k], unit columns

    def to_rows(self) -> list[dict]:
        rows = [{"metric": "hessian_top_eig", "value": self.eigenvalues[0]},
                {"metric": "hvp_count", "value": self.hvp_count},
                {"metric": "hessian_eig_seconds", "value": self.seconds}]
        for rank, (value, residual) in enumerate(zip(self.eigenvalues, self.residuals), start=1):
            rows += [{"metric": "hessian_eig", "rank": rank, "value": value},
                     {"metric": "residual", "rank": rank, "value": residual}]
        return rows


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
        hvp_count = operator.hvp_count
        order = np.argsort(values)[::-1]
        values, vectors = values[order], vectors[:, order]
        residuals = [operator.residual(value, vectors[:, i]) for i, value in enumerate(values)]
    return HessianEigen([float(v) for v in values], residuals, hvp_count, seconds, vectors)


# --------------------------------------------------------------------------- trace


@dataclass
class HessianTrace:
    trace: float
    standard_error: float
    hvp_count: int
    method: str

    def to_rows(self) -> list[dict]:
        return [{"metric": "hessian_trace", "value": self.trace},
                {"metric": "hessian_trace_se", "value": self.standard_error},
                {"metric": "hvp_count", "value": self.hvp_count}]


def hessian_trace(objective: Objective, n_hvps: int = 30, seed: int = 0, method: str = "hutchinson") -> HessianTrace:
    """Stochastic trace estimate from `n_hvps` Hessian-vector products.

    "hutchinson": mean of z^T H z over seeded Rademacher z; memory: one probe.
    "hutch++" (Meyer et al. 2021): the trace of H on a sketched top subspace exactly,
    plus Hutchinson on the rest; lower variance when a few eigenvalues dominate, but
    it holds 2 * n_hvps / 3 parameter-sized vectors. The standard error is that of
    the Hutchinson part (the sketched part is exact given the sketch). The HVPs share
    one kept gradient graph (see `Objective.kept_graph`).
    """
    if method not in ("hutchinson", "hutch++"):
        raise ValueError(f"method={method!r}: choose 'hutchinson' or 'hutch++'")
    if method == "hutch++" and (n_hvps // 3 < 1 or n_hvps - 2 * (n_hvps // 3) < 2):
        raise ValueError(f"hutch++ needs n_hvps >= 4, got {n_hvps}")
    generator = torch.Generator().manual_seed(seed)
    params = objective.params
    some_param = next(iter(params.values()))

    def rademacher() -> torch.Tensor:
        signs = torch.randint(0, 2, (objective.dimension,), generator=generator, dtype=torch.int8)
        return (2 * signs - 1).to(dtype=some_param.dtype, device=some_param.device)

    def hvp(vector: torch.Tensor) -> torch.Tensor:
        return flatten(objective.hvp(unflatten(vector, params)))

    with objective.kept_graph():
        return _trace_estimate(hvp, rademacher, n_hvps, method)


def _trace_estimate(hvp, rademacher, n_hvps: int, method: str) -> HessianTrace:
    if method == "hutchinson":
        samples = []
        for _ in range(n_hvps):
            probe = rademacher()
            samples.append(torch.dot(probe, hvp(probe)).double().item())
        return HessianTrace(float(np.mean(samples)), _standard_error(samples), n_hvps, method)
    n_sketch = n_hvps // 3  # hutch++
    n_residual = n_hvps - 2 * n_sketch
    sketch = torch.stack([hvp(rademacher()) for _ in range(n_sketch)], dim=1)
    basis, _ = torch.linalg.qr(sketch)
    exact_part = sum(torch.dot(basis[:, i], hvp(basis[:, i])).double().item() for i in range(n_sketch))
    samples = []
    for _ in range(n_residual):
        probe = rademacher()
        probe = probe - basis @ (basis.T @ probe)  # project out the sketched subspace
        samples.append(torch.dot(probe, hvp(probe)).double().item())
    return HessianTrace(exact_part + float(np.mean(samples)), _standard_error(samples), n_hvps, method)


def _standard_error(samples: list[float]) -> float:
    return float(np.std(samples, ddof=1) / math.sqrt(len(samples)))


# --------------------------------------------------------------------------- directions


@dataclass
class DirectionalCurvature:
    """Taylor expansion of the loss along u: L(theta + u) ~ L + g^T u + 0.5 u^T H u."""

    curvature: float          # u^T H u / ||u||^2
    direction_norm: float     # ||u||
    first_order_nats: float   # g^T u
    second_order_nats: float  # 0.5 u^T H u

    def to_rows(self) -> list[dict]:
        return [{"metric": "curvature_along_u", "value": self.curvature},
                {"metric": "u_norm", "value": self.direction_norm},
                {"metric": "first_order_term_nats", "value": self.first_order_nats},
                {"metric": "predicted_forgetting_nats", "value": self.second_order_nats}]


def curvature_along(objective: Objective, direction: Params) -> DirectionalCurvature:
    """Curvature and Taylor terms along `direction` (one HVP, which also yields g)."""
    gradient, product = objective.gradient_and_hvp(direction)
    norm_squared = dot(direction, direction)
    if norm_squared == 0:
        raise ValueError("the direction is zero")
    u_h_u = dot(direction, product)
    return DirectionalCurvature(u_h_u / norm_squared, math.sqrt(norm_squared), dot(gradient, direction), 0.5 * u_h_u)


@dataclass
class ForgettingPrediction:
    """Predicted (quadratic model at the base weights) and observed rise of the held-out loss."""

    along_update: DirectionalCurvature
    base_loss_nats: float
    finetuned_loss_nats: float

    @property
    def observed_forgetting_nats(self) -> float:
        return self.finetuned_loss_nats - self.base_loss_nats

    @property
    def predicted_total_nats(self) -> float:
        return self.along_update.first_order_nats + self.along_update.second_order_nats

    def to_rows(self) -> list[dict]:
        return [*self.along_update.to_rows(),
                {"metric": "predicted_forgetting_total_nats", "value": self.predicted_total_nats},
                {"metric": "observed_forgetting_nats", "value": self.observed_forgetting_nats},
                {"metric": "base_loss_nats", "value": self.base_loss_nats},
                {"metric": "finetuned_loss_nats", "value": self.finetuned_loss_nats}]


def weight_difference(finetuned: torch.nn.Module, base: torch.nn.Module) -> Params:
    """theta_finetuned - theta_base by parameter name (the models must share names and shapes)."""
    base_params = dict(base.named_parameters())
    finetuned_params = dict(finetuned.named_parameters())
    if base_params.keys() != finetuned_params.keys():
        missing = sorted(base_params.keys() ^ finetuned_params.keys())[:5]
        raise ValueError(f"the models' parameters differ, e.g. {missing}")
    return {n: (finetuned_params[n].detach() - p.detach()) for n, p in base_params.items()}


def forgetting_prediction(base_model: torch.nn.Module, finetuned_model: torch.nn.Module,
                          batches: Sequence[Batch], hvp_method: str = "double_backward") -> ForgettingPrediction:
    """0.5 u^T H u (and g^T u) at the base weights for u = theta_ft - theta_base, beside
    the observed L(theta_ft) - L(theta_base) on the same batches with the same loss."""
    objective = causal_lm_objective(base_model, batches, hvp_method)
    update = weight_difference(finetuned_model, base_model)
    along_update = curvature_along(objective, update)
    finetuned_params = {n: p.detach() for n, p in finetuned_model.named_parameters()}
    return ForgettingPrediction(along_update, objective.value(), objective.value(finetuned_params))
