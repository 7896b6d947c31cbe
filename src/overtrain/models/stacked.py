"""K same-shaped Llama models computed as one: an ensemble.

A study trains hundreds of tiny models of one shape (every LR and seed of a fine-tune,
every pre-training seed). `StackedLlama` holds the K members' parameters in one flat
buffer `weights[K, P]` (and their gradients in `grads[K, P]`), so an optimizer or a
gradient-norm clip is a handful of operations on two matrices whatever the number of
tensors, and members are saved, loaded and evaluated as ordinary HF models.

The forward pass is `LlamaForCausalLM`'s, written for a member axis: same RMSNorm, the
same rotary embedding module, causal scaled-dot-product attention, SwiGLU MLP and tied
output embedding, so a member's loss equals the HF model's to float32 rounding
(tests/test_ensemble.py). It is compiled once per process (`torch.compile`, eager where
compilation fails) and run in passes whose shape suits the device (`pass_shape`): on a
GPU every member at once, filling the device; on a CPU one member and a cache-sized
slice of the batch at a time, since a CPU is compute-bound already at one member.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from overtrain.errors import CheckpointError

IGNORE = -100  # the label of a position without loss (prompt, padding), as in transformers

# On a CPU, a pass is one member over at most this many tokens: its activations then stay in a
# core's L2 cache (benchmarks/bench_ensemble.py: ~1.1x over the whole 16 x 256 batch at once,
# ~1.2x over stacking 8 members).
CPU_TOKENS_PER_PASS = 2048

# On CUDA, a pass is every member over at most this many tokens each (and at least one sequence):
# hundreds of members fill a device, and the activations stay bounded whatever the batch (a
# held-out batch is often larger than a training one). `members_that_fit` sizes jobs for it.
CUDA_TOKENS_PER_MEMBER = 4096

# Sequence lengths are padded up to a multiple of this, so that a compiled forward sees few
# shapes (a compiled graph is specialized to its shapes; one for every length would recompile).
LENGTH_STEP = 64

# Gradients are views of the rows of `grads`, strided like the parameters they belong to;
# autograd warns that such (non-dense) views are not laid out as it would lay them out.
LAYOUT_WARNING = "grad and param do not obey the gradient layout contract"


@dataclass(frozen=True)
class Slot:
    """Where one HF parameter lives in a member's row of the flat buffer."""

    name: str
    shape: tuple[int, ...]
    start: int

    @property
    def end(self) -> int:
        return self.start + _numel(self.shape)


def _padded(size: int) -> int:
    """A row's length: the parameters, then zeros up to a multiple of 64 floats. Every row then
    starts and ends on a boundary of the vectorized element-wise loops, so a member's arithmetic
    is bit for bit the same whatever the number of members beside it (no element falls in a
    loop's scalar tail, where a multiply-add may round differently)."""
    return -(-size // 64) * 64


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def unsupported_reason(config) -> str | None:
    """Why a model of this config cannot be stacked (None when it can): the forward below is
    the plain Llama of `models/build.py`, nothing more."""
    checks = {
        "not a Llama model": getattr(config, "model_type", None) != "llama",
        "untied output embedding": not getattr(config, "tie_word_embeddings", False),
        "biases": getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False),
        "grouped-query attention": config.num_key_value_heads != config.num_attention_heads,
        "an activation other than SiLU": getattr(config, "hidden_act", "silu") != "silu",
        "dropout": getattr(config, "attention_dropout", 0.0) != 0.0,
    }
    found = [why for why, bad in checks.items() if bad]
    return ", ".join(found) or None


def members_that_fit(config: LlamaConfig, sequences: int, length: int, device: torch.device, share: float = 0.7) -> int:
    """How many members of this config training on batches of `sequences` x `length` tokens fit
    in `share` of the device's free memory; unbounded (a large number) off CUDA, where host
    memory is not the limit at the sizes that ensembles are for.

    Per member: weights, gradients and AdamW's two moments (4 x 4 bytes a parameter), and
    the activations autograd keeps for one pass (`pass_shape`), about (10 d + 5 ffn) floats
    a token per layer plus three vocabulary-sized rows a token (logits, softmax, their gradient)."""
    if device.type != "cuda":
        return 1 << 20
    parameters = _padded(_layout(config)[-1].end)
    per_token = config.num_hidden_layers * (10 * config.hidden_size + 5 * config.intermediate_size) + 3 * config.vocab_size
    per_member = 16 * parameters + 4 * pass_shape(device, 1, sequences, length)[1] * length * per_token
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(share * free // per_member))


def pass_shape(device: torch.device, members: int, sequences: int, length: int) -> tuple[int, int]:
    """How many members and sequences one forward (and backward) pass computes.

    On CUDA every member and at most CUDA_TOKENS_PER_MEMBER tokens of each: members fill the
    device (`members_that_fit` sizes them). On a CPU one member and at most
    CPU_TOKENS_PER_PASS tokens: at this model size a CPU is compute-bound already with one
    member, and stacking more only spills the activations out of cache."""
    if device.type == "cuda":
        return members, max(1, min(sequences, CUDA_TOKENS_PER_MEMBER // length))
    return 1, max(1, min(sequences, CPU_TOKENS_PER_PASS // length))


class StackedLlama:
    """K Llama models of one config with parameters stacked as rows of `weights[K, P]`."""

    def __init__(self, config: LlamaConfig, members: int, device: torch.device | str = "cpu", compile: bool = True):
        """compile: run the forward pass through `torch.compile` (the same numbers to float32
        rounding, ~1.5x faster on a CPU after a compilation of seconds per process)."""
        reason = unsupported_reason(config)
        if reason:
            raise CheckpointError(f"cannot train {config.model_type} models as an ensemble: {reason}")
        self.config = config
        self.device = torch.device(device)
        self.slots = _layout(config)
        self.weights = torch.zeros(members, _padded(self.slots[-1].end), device=self.device)
        self.grads = torch.zeros_like(self.weights)
        self.rotary = LlamaRotaryEmbedding(config).to(self.device)
        self.compile = compile

    # -- members in and out -------------------------------------------------------

    @classmethod
    def from_models(cls, models: list[torch.nn.Module], device: torch.device | str | None = None,
                    compile: bool = True) -> StackedLlama:
        """Stack HF models (same config) as members 0..K-1."""
        device = device or next(models[0].parameters()).device
        stacked = cls(models[0].config, len(models), device, compile)
        for member, model in enumerate(models):
            stacked.load_member(member, dict(model.named_parameters()))
        return stacked

    def load_member(self, member: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Set these of a member's parameters (by HF name; the others are left as they are)."""
        with torch.no_grad():
            for slot in self.slots:
                if slot.name in tensors:
                    self.weights[member, slot.start:slot.end] = tensors[slot.name].detach().reshape(-1).to(self.weights)

    def member_state(self, member: int) -> dict[str, torch.Tensor]:
        """One member's parameters by HF name (copies)."""
        return {slot.name: self.weights[member, slot.start:slot.end].reshape(slot.shape).clone() for slot in self.slots}

    def member_model(self, member: int) -> LlamaForCausalLM:
        """One member as an ordinary HF model (a copy of its weights), e.g. to save or score it."""
        model = LlamaForCausalLM(self.config).to(self.device)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in self.member_state(member).items():
                params[name].copy_(value)
        return model

    @property
    def members(self) -> int:
        return self.weights.shape[0]

    def row_blocks(self) -> list[slice]:
        """The members a forward pass or an update of `weights` or `grads` handles at once: all of
        them on CUDA, one at a time on a CPU (`pass_shape`), where a row's arithmetic then does not depend
        on the other rows whatever the number of threads (a multi-threaded element-wise loop
        splits its range where it likes, and a row cut there rounds differently)."""
        at_once = pass_shape(self.device, self.members, 1, 1)[0]
        return [slice(first, min(first + at_once, self.members)) for first in range(0, self.members, at_once)]

    def select(self, rows: list[int]) -> StackedLlama:
        """A new stack of copies of these members (e.g. the ones evaluated on one task)."""
        chosen = StackedLlama(self.config, len(rows), self.device, self.compile)
        with torch.no_grad():
            chosen.weights.copy_(self.weights[rows])
        return chosen

    def keep(self, rows: torch.Tensor | list[int]) -> None:
        """Go on with these members only (e.g. the ones that have not diverged)."""
        rows = torch.as_tensor(rows, device=self.device, dtype=torch.long)
        self.weights = self.weights.index_select(0, rows)
        self.grads = self.grads.index_select(0, rows)

    def member_params(self, first: int, last: int) -> dict[str, torch.Tensor]:
        """The forward pass's tensors of members first..last-1, each a leaf view of `weights`
        whose gradient is a view of `grads`.

        Backward accumulates into an existing `.grad` in place, so every gradient lands in
        `grads[K, P]` with no copy; the optimizer then updates `weights` in place."""
        params = {}
        for name, (start, end, shape) in _fused(self.config, self.slots).items():
            leaf = self.weights[first:last, start:end].view(last - first, *shape).requires_grad_(True)
            leaf.grad = self.grads[first:last, start:end].view(last - first, *shape)
            params[name] = leaf
        return params

    def matrix_mask(self) -> torch.Tensor:
        """1 where a position of a row belongs to a matrix (weight-decayed, nanoGPT's rule), else 0."""
        mask = torch.zeros(self.weights.shape[1], device=self.device)
        for slot in self.slots:
            if len(slot.shape) >= 2:
                mask[slot.start:slot.end] = 1.0
        return mask

    # -- the forward pass ---------------------------------------------------------

    def passes(self, input_ids: torch.Tensor, labels: torch.Tensor
               ) -> Iterator[tuple[slice, slice, torch.Tensor]]:
        """Next-token losses of ids and labels [K, B, T] (or [B, T], shared by every member), pass
        by pass (`pass_shape`): (members, sequences, their losses [k, b, T-1] in float32, 0 where
        the label is IGNORE). A caller may call backward on each pass's losses as it comes."""
        input_ids, labels = (t.expand(self.members, *t.shape) if t.dim() == 2 else t for t in (input_ids, labels))
        members, sequences, length = input_ids.shape
        padded = -(-length // LENGTH_STEP) * LENGTH_STEP if self.compile else length
        # Padding at the end changes no other position: attention is causal and the padding has no loss.
        input_ids = F.pad(input_ids, (0, padded - length), value=0)
        labels = F.pad(labels, (0, padded - length), value=IGNORE)
        cos, sin = self.rotary(self.weights, torch.arange(padded, device=self.device).unsqueeze(0))
        forward = _compiled_token_losses() if self.compile else _token_losses
        config = self.config
        _, per_pass = pass_shape(self.device, members, sequences, padded)
        for rows in self.row_blocks():
            params = self.member_params(rows.start, rows.stop)
            for start in range(0, sequences, per_pass):
                part = slice(start, min(start + per_pass, sequences))
                # The lookup stays eager: its backward is a scatter-add that, compiled for several
                # CPU threads, adds in a varying order (the same run would not repeat bit for bit).
                embedded = _embed(params["embed"], input_ids[rows, part])
                losses = forward(params, embedded, labels[rows, part], cos, sin,
                                 config.num_hidden_layers, config.num_attention_heads, config.rms_norm_eps)
                yield rows, part, losses[:, :, :length - 1]

    def token_losses(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token losses [K, B, T-1] in float32 (0 where the label is IGNORE) and the mask of counted ones."""
        if labels.dim() == 2:
            labels = labels.expand(self.members, *labels.shape)
        losses = torch.zeros(labels.shape[0], labels.shape[1], labels.shape[2] - 1, device=self.device)
        for rows, part, found in self.passes(input_ids, labels):
            losses[rows, part] = found
        return losses, labels[:, :, 1:] != IGNORE

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each member's mean next-token loss over its counted positions, [K] (HF's causal-LM loss)."""
        losses, counted = self.token_losses(input_ids, labels)
        return losses.sum(dim=(1, 2)) / counted.sum(dim=(1, 2)).clamp(min=1)


def _embed(embed: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings [k, B * T, d] of ids [k, B, T], each member looking up its own table [k, V, d]."""
    k, vocab, width = embed.shape
    offsets = torch.arange(k, device=input_ids.device).view(k, 1, 1) * vocab
    return F.embedding(input_ids + offsets, embed.reshape(k * vocab, width)).view(k, -1, width)


def _token_losses(params: dict[str, torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, layers: int, heads: int, eps: float) -> torch.Tensor:
    """Next-token losses [k, B, T-1] of the k members whose tensors are `params`, from their token
    embeddings x [k, B * T, d] and labels [k, B, T]: `LlamaForCausalLM` after its embedding, with a
    member axis (batched matrix products, one attention call)."""
    k, batch, length = labels.shape
    embed = params["embed"]
    vocab, width = embed.shape[1], embed.shape[2]
    head_dim = width // heads
    for layer in range(layers):
        h = _rms_norm(x, params[f"{layer}.input_norm"], eps)
        qkv = torch.bmm(h, params[f"{layer}.qkv"].transpose(1, 2))
        q, key, v = (t.reshape(k * batch, length, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        q, key = apply_rotary_pos_emb(q, key, cos, sin)
        attended = F.scaled_dot_product_attention(q, key, v, is_causal=True, scale=head_dim ** -0.5)
        attended = attended.transpose(1, 2).reshape(k, batch * length, width)
        x = x + torch.bmm(attended, params[f"{layer}.o"].transpose(1, 2))
        h = _rms_norm(x, params[f"{layer}.post_norm"], eps)
        gate, up = torch.bmm(h, params[f"{layer}.gate_up"].transpose(1, 2)).chunk(2, dim=-1)
        x = x + torch.bmm(F.silu(gate) * up, params[f"{layer}.down"].transpose(1, 2))
    x = _rms_norm(x, params["norm"], eps)
    logits = torch.bmm(x, embed.transpose(1, 2)).view(k, batch, length, vocab)[:, :, :-1].float()
    targets = labels[:, :, 1:]
    return F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="none").view(targets.shape)


@functools.cache
def _compiled_token_losses():
    """`_token_losses` compiled once per process for fixed shapes (dynamic shapes were ~1.4x
    slower on a CPU); it runs eagerly wherever compilation fails (e.g. no C++ compiler)."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    # One graph per (members, sequences, padded length, training or not) of a pass: more than the default 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(_token_losses, dynamic=False)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm for x [K, N, d] and per-member gains [K, d], in float32 as HF computes it."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight.unsqueeze(1) * x.to(dtype)


def _layout(config: LlamaConfig) -> list[Slot]:
    """Every HF parameter's place in a row, in the order of `named_parameters()` (q, k, v adjacent,
    gate and up adjacent, so that each pair or triple is one matrix for the forward pass)."""
    d, ffn = config.hidden_size, config.intermediate_size
    shapes = [("model.embed_tokens.weight", (config.vocab_size, d))]
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        shapes += [(f"{prefix}.self_attn.{name}.weight", (d, d)) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        shapes += [(f"{prefix}.mlp.gate_proj.weight", (ffn, d)), (f"{prefix}.mlp.up_proj.weight", (ffn, d)),
                   (f"{prefix}.mlp.down_proj.weight", (d, ffn)),
                   (f"{prefix}.input_layernorm.weight", (d,)), (f"{prefix}.post_attention_layernorm.weight", (d,))]
    shapes.append(("model.norm.weight", (d,)))
    slots, start = [], 0
    for name, shape in shapes:
        slots.append(Slot(name, shape, start))
        start += _numel(shape)
    return slots


def _fused(config: LlamaConfig, slots: list[Slot]) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """The tensors the forward pass uses: (start, end, per-member shape) of each, fusing q|k|v and gate|up."""
    at = {slot.name: slot for slot in slots}
    d, ffn = config.hidden_size, config.intermediate_size

    def span(first: str, last: str, shape: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
        return at[first].start, at[last].end, shape

    views = {"embed": span("model.embed_tokens.weight", "model.embed_tokens.weight", (config.vocab_size, d)),
             "norm": span("model.norm.weight", "model.norm.weight", (d,))}
    for layer in range(config.num_hidden_layers):
        weight = f"model.layers.{layer}.{{}}.weight".format
        views |= {f"{layer}.qkv": span(weight("self_attn.q_proj"), weight("self_attn.v_proj"), (3 * d, d)),
                  f"{layer}.o": span(weight("self_attn.o_proj"), weight("self_attn.o_proj"), (d, d)),
                  f"{layer}.gate_up": span(weight("mlp.gate_proj"), weight("mlp.up_proj"), (2 * ffn, d)),
                  f"{layer}.down": span(weight("mlp.down_proj"), weight("mlp.down_proj"), (d, ffn)),
                  f"{layer}.input_norm": span(weight("input_layernorm"), weight("input_layernorm"), (d,)),
                  f"{layer}.post_norm": span(weight("post_attention_layernorm"), weight("post_attention_layernorm"), (d,))}
    return views
