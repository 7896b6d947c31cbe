"""K same-shaped Llama models computed as one: an ensemble.

A study trains hundreds of tiny models of one shape (every LR and seed of a fine-tune,
every pre-training seed). One at a time, a step of a 48k-parameter model is mostly
per-operation overhead; stacked along a leading member axis, K models cost one set of
operations on K-times larger tensors (batched matrix products, one attention call).

`StackedLlama` holds the K members' parameters in one flat buffer `weights[K, P]`
(and their gradients in `grads[K, P]`), so an optimizer or a gradient-norm clip is a
handful of operations on two matrices whatever the number of tensors. The forward
pass is `LlamaForCausalLM`'s, written for the member axis: same RMSNorm, the same
rotary embedding module, causal scaled-dot-product attention, SwiGLU MLP and tied
output embedding, so a member's loss equals the HF model's to float32 rounding
(tests/test_ensemble.py). Members go in and come out as ordinary HF models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from overtrain.errors import CheckpointError

IGNORE = -100  # the label of a position without loss (prompt, padding), as in transformers

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


def members_that_fit(config: LlamaConfig, tokens_per_step: int, device: torch.device, share: float = 0.7) -> int:
    """How many members of this config training on `tokens_per_step` fit in `share` of the
    device's free memory; unbounded (a large number) off CUDA, where host memory is not the
    limit at the sizes that ensembles are for.

    Per member: weights, gradients and AdamW's two moments (4 x 4 bytes a parameter), and
    the activations autograd keeps, about (10 d + 5 ffn) floats a token per layer plus
    three vocabulary-sized rows a token (logits, softmax, their gradient)."""
    if device.type != "cuda":
        return 1 << 20
    parameters = _padded(_layout(config)[-1].end)
    per_token = config.num_hidden_layers * (10 * config.hidden_size + 5 * config.intermediate_size) + 3 * config.vocab_size
    per_member = 16 * parameters + 4 * tokens_per_step * per_token
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(share * free // per_member))


class StackedLlama:
    """K Llama models of one config with parameters stacked as rows of `weights[K, P]`."""

    def __init__(self, config: LlamaConfig, members: int, device: torch.device | str = "cpu"):
        reason = unsupported_reason(config)
        if reason:
            raise CheckpointError(f"cannot train {config.model_type} models as an ensemble: {reason}")
        self.config = config
        self.device = torch.device(device)
        self.slots = _layout(config)
        self.weights = torch.zeros(members, _padded(self.slots[-1].end), device=self.device)
        self.grads = torch.zeros_like(self.weights)
        self.rotary = LlamaRotaryEmbedding(config).to(self.device)
        self._bind()

    # -- members in and out -------------------------------------------------------

    @classmethod
    def from_models(cls, models: list[torch.nn.Module], device: torch.device | str | None = None) -> StackedLlama:
        """Stack HF models (same config) as members 0..K-1."""
        device = device or next(models[0].parameters()).device
        stacked = cls(models[0].config, len(models), device)
        for member, model in enumerate(models):
            stacked.load_member(member, model)
        return stacked

    def load_member(self, member: int, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for slot in self.slots:
                self.weights[member, slot.start:slot.end] = params[slot.name].detach().reshape(-1).to(self.weights)

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

    def select(self, rows: list[int]) -> StackedLlama:
        """A new stack of copies of these members (e.g. the ones evaluated on one task)."""
        chosen = StackedLlama(self.config, len(rows), self.device)
        with torch.no_grad():
            chosen.weights.copy_(self.weights[rows])
        return chosen

    def keep(self, rows: torch.Tensor | list[int]) -> None:
        """Go on with these members only (e.g. the ones that have not diverged)."""
        rows = torch.as_tensor(rows, device=self.device, dtype=torch.long)
        self.weights = self.weights.index_select(0, rows)
        self.grads = self.grads.index_select(0, rows)
        self._bind()

    def _bind(self) -> None:
        """Make each stacked parameter a leaf view of `weights` whose gradient is a view of `grads`.

        Backward accumulates into an existing `.grad` in place, so every gradient lands in
        `grads[K, P]` with no copy; the optimizer then updates `weights` in place."""
        self.params: dict[str, torch.Tensor] = {}
        for name, (start, end, shape) in _fused(self.config, self.slots).items():
            leaf = self.weights[:, start:end].view(self.members, *shape).requires_grad_(True)
            leaf.grad = self.grads[:, start:end].view(self.members, *shape)
            self.params[name] = leaf

    def matrix_mask(self) -> torch.Tensor:
        """1 where a position of a row belongs to a matrix (weight-decayed, nanoGPT's rule), else 0."""
        mask = torch.zeros(self.weights.shape[1], device=self.device)
        for slot in self.slots:
            if len(slot.shape) >= 2:
                mask[slot.start:slot.end] = 1.0
        return mask

    # -- the forward pass ---------------------------------------------------------

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits [K, B, T, V] for token ids [K, B, T] (or [B, T], shared by every member)."""
        k, config = self.members, self.config
        if input_ids.dim() == 2:
            input_ids = input_ids.expand(k, *input_ids.shape)
        _, batch, length = input_ids.shape
        p = self.params
        embed = p["embed"]
        vocab, width = embed.shape[1], embed.shape[2]
        offsets = torch.arange(k, device=self.device).view(k, 1, 1) * vocab
        x = F.embedding(input_ids + offsets, embed.reshape(k * vocab, width)).view(k, batch * length, width)
        positions = torch.arange(length, device=self.device).unsqueeze(0)
        cos, sin = self.rotary(x, positions)
        heads, head_dim = config.num_attention_heads, width // config.num_attention_heads
        for layer in range(config.num_hidden_layers):
            h = _rms_norm(x, p[f"{layer}.input_norm"], config.rms_norm_eps)
            qkv = torch.bmm(h, p[f"{layer}.qkv"].transpose(1, 2))
            q, key, v = (t.reshape(k * batch, length, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
            q, key = apply_rotary_pos_emb(q, key, cos, sin)
            attended = F.scaled_dot_product_attention(q, key, v, is_causal=True, scale=head_dim ** -0.5)
            attended = attended.transpose(1, 2).reshape(k, batch * length, width)
            x = x + torch.bmm(attended, p[f"{layer}.o"].transpose(1, 2))
            h = _rms_norm(x, p[f"{layer}.post_norm"], config.rms_norm_eps)
            gate, up = torch.bmm(h, p[f"{layer}.gate_up"].transpose(1, 2)).chunk(2, dim=-1)
            x = x + torch.bmm(F.silu(gate) * up, p[f"{layer}.down"].transpose(1, 2))
        x = _rms_norm(x, p["norm"], config.rms_norm_eps)
        return torch.bmm(x, embed.transpose(1, 2)).view(k, batch, length, vocab)

    def token_losses(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token losses [K, B, T-1] in float32 (0 where the label is IGNORE) and the mask of counted ones."""
        logits = self.logits(input_ids)[:, :, :-1].float()
        if labels.dim() == 2:
            labels = labels.expand(self.members, *labels.shape)
        targets = labels[:, :, 1:]
        counted = targets != IGNORE
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                                 reduction="none").view(targets.shape)
        return losses, counted

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each member's mean next-token loss over its counted positions, [K] (HF's causal-LM loss)."""
        losses, counted = self.token_losses(input_ids, labels)
        return losses.sum(dim=(1, 2)) / counted.sum(dim=(1, 2)).clamp(min=1)


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
