"""The held-out loss as a function of the parameters, over a fixed list of batches.

An `Objective` is a scalar loss of named parameters written as a sum of terms, one
per batch, so that gradients and Hessian-vector products (HVPs) are accumulated term
by term and only one batch's graph is alive at a time (solvers trade that for speed
inside `Objective.kept_graph`, see there). For a causal LM over a fixed list of
batches (`causal_lm_objective`) the loss is

    L(theta) = sum over batches, sum over unmasked next-token positions of -log p(y | x)
               -----------------------------------------------------------------
                     N = number of unmasked next-token positions in ALL batches

i.e. the mean over every predicted token of the batch set, not a mean of per-batch
means (the two differ when batches hold different numbers of unmasked tokens).

Parameters travel as dicts of tensors by name (`Params`); `flatten`, `unflatten` and
`dot` move between those and flat vectors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp

from overtrain.errors import SpecError
from overtrain.probes.scoring import count_next_token_targets, full_precision, next_token_targets

Params = dict[str, torch.Tensor]
LossFn = Callable[[Params], torch.Tensor]
Batch = dict[str, torch.Tensor]

HVP_METHODS = ("double_backward", "jvp_of_grad")


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
            raise SpecError(f"hvp_method={self.hvp_method!r}: choose one of {HVP_METHODS}")

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
    """Eval mode, eager attention and autocast off within the block; all restored afterwards.

    SDPA kernels lack forward-mode AD (and, on some devices, double backward); the
    eager implementation is plain differentiable tensor algebra. Curvature is measured
    in the weights' float32, never in a caller's bf16 autocast.
    """
    was_training = model.training
    previous = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = previous not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    model.eval()
    try:
        with full_precision(next(model.parameters()).device):
            yield
    finally:
        if switch:
            model.set_attn_implementation(previous)
        model.train(was_training)


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
    n_tokens = sum(count_next_token_targets(batch["labels"]) for batch in batches)
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
    logits, targets = next_token_targets(functional_call(model, params, (), inputs).logits, batch["labels"])
    return F.cross_entropy(logits, targets, reduction="sum") / n_tokens


# --------------------------------------------------------------------------- flat vectors


def flatten(params: Params) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(vector: torch.Tensor, like: Params) -> Params:
    pieces = torch.split(vector, [p.numel() for p in like.values()])
    return {n: piece.view_as(p) for (n, p), piece in zip(like.items(), pieces)}


def dot(a: Params, b: Params) -> float:
    return math.fsum(torch.vdot(a[n].reshape(-1), b[n].reshape(-1)).double().item() for n in a)
