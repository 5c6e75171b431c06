"""What every compression step shares: the `Compression` being built (the model it computes with and how its
tensors will be stored), the calibration statistics the scoring steps read, and the helpers that slice a state
dict into a smaller model of the same architecture.

Every step takes a `Compression` (and a `Calibration`) and returns a new `Compression`. Structured steps build a
smaller `Transformer` whose shapes are in its `ModelConfig`: every layer keeps the same number of channels, heads
and experts (each layer chooses which), so the config stays one Llama 4 shape and export stays exact. The other
steps change values and storage only, and set the in-memory weights to exactly what loading the stored encoding
gives, so every measurement is of the model that ships."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stagelm.compress.storage import Encoded
from stagelm.model import ModelConfig, Transformer
from stagelm.model.layers import SwiGLU
from stagelm.model.moe import MoE
from stagelm.tokenizer import Tokenizer


@dataclass
class Compression:
    """A model being compressed: the dense weights it computes with, and how some of them are stored."""

    model: Transformer
    tokenizer: Tokenizer
    encodings: dict[str, Encoded] = field(default_factory=dict)  # backbone state-dict key -> its stored form
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


# --- calibration ------------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """What the structured and low-rank steps need from a forward pass over calibration text, per layer."""

    ffn_inputs: dict[int, Tensor]  # layer -> [N, D] inputs of the feed-forward (after post_attention_layernorm)
    head_outputs: dict[int, Tensor]  # layer -> [N, H, head_dim] attention output per head, before o_proj
    grams: dict[str, Tensor]  # nn.Linear weight key -> [in, in] mean of x x^T over its inputs
    tokens: int


@torch.no_grad()
def calibrate(model: Transformer, batches: Sequence[Tensor]) -> Calibration:
    """Run `model` over token batches [B, T] (no padding) and keep the per-layer inputs the steps score with."""
    ffn: dict[int, list[Tensor]] = {}
    heads: dict[int, list[Tensor]] = {}
    grams: dict[str, Tensor] = {}
    hooks = []
    for i, block in enumerate(model.layers):
        hooks.append(
            block.feed_forward.register_forward_pre_hook(
                lambda _m, args, i=i: ffn.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]))
            )
        )
        attn = block.self_attn
        hooks.append(
            attn.o_proj.register_forward_pre_hook(
                lambda _m, args, i=i, a=attn: heads.setdefault(i, []).append(args[0].reshape(-1, a.n_heads, a.head_dim))
            )
        )
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("router"):

            def gram_hook(_m: nn.Module, args: tuple[Tensor, ...], key: str = f"{name}.weight") -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                grams[key] = grams.get(key, 0) + x.t() @ x

            hooks.append(module.register_forward_pre_hook(gram_hook))
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for batch in batches:
            model(batch, with_router_stats=False)
            tokens += batch.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return Calibration(
        {i: torch.cat(v) for i, v in ffn.items()},
        {i: torch.cat(v) for i, v in heads.items()},
        {k: g / tokens for k, g in grams.items()},
        tokens,
    )


def expert_intermediates(moe: MoE, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every expert on every token x [N, D], as the router would scale it had it chosen that expert:
    (router logits [N, E], SwiGLU intermediates [E, N, F], expert outputs [E, N, D], unweighted for softmax)."""
    logits = moe.router(x).float()  # [N, E]
    E = moe.n_experts
    if moe.router_kind == "sigmoid":
        inputs = torch.sigmoid(logits).t()[:, :, None] * x  # [E, N, D]: Llama 4 scales each expert's input
    else:
        inputs = x.expand(E, -1, -1)
    gate, up = torch.bmm(inputs, moe.gate_up_proj).chunk(2, dim=-1)
    hidden = F.silu(gate) * up  # [E, N, F]
    return logits, hidden, torch.bmm(hidden, moe.down_proj)


def routed_output(moe_kind: str, top_k: int, logits: Tensor, outputs: Tensor, keep: Sequence[int]) -> Tensor:
    """The routed experts' output [N, D] when only experts `keep` exist: top-k among their logits (the router
    with the other rows deleted), outputs [E, N, D] from `expert_intermediates`."""
    keep_t = torch.tensor(list(keep))
    sub = logits[:, keep_t]  # [N, K]
    k = min(top_k, len(keep))
    if moe_kind == "sigmoid":
        top, idx = sub.topk(k, dim=-1)
        weights = torch.ones_like(top)  # the sigmoid score already scaled the input
    else:
        probs = torch.softmax(sub, dim=-1)
        top, idx = probs.topk(k, dim=-1)
        weights = top / top.sum(-1, keepdim=True) if k > 1 else torch.ones_like(top)
    chosen = keep_t[idx]  # [N, k] original expert ids
    N = logits.shape[0]
    picked = outputs[chosen, torch.arange(N)[:, None]]  # [N, k, D]
    return (picked * weights[..., None]).sum(1)


# --- helpers for structured pruning -----------------------------------------------------------------------------


def backbone_state(model: Transformer) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rebuild(config: ModelConfig, state: dict[str, Tensor], like: Transformer) -> Transformer:
    model = Transformer(config)
    model.load_state_dict(state)
    model.train(like.training)
    return model


def require_dense(c: Compression, step: str) -> None:
    if c.encodings:
        raise ValueError(
            f"{step} changes the model's shapes, so it must come before the steps that choose storage "
            f"(already encoded: {sorted({e.kind for e in c.encodings.values()})})"
        )


def expert_multiple(cfg: ModelConfig) -> int:
    """Routed experts run grouped matmuls, which want widths in multiples of 16 bytes: 4 fp32 or 8 bf16 values
    (8 for any width that allows it, so a pruned model still runs in bf16)."""
    if not cfg.n_experts:
        return 1
    return 8 if cfg.d_ff >= 64 else 4


def keep_count(total: int, keep: float, multiple: int = 1) -> int:
    n = max(multiple, int(round(total * keep / multiple)) * multiple)
    return min(total, n)


def slice_swiglu(state: dict[str, Tensor], prefix: str, keep: Tensor) -> None:
    """Keep hidden channels `keep` of the SwiGLU whose weights are `prefix.{gate,up,down}_proj.weight`."""
    state[f"{prefix}.gate_proj.weight"] = state[f"{prefix}.gate_proj.weight"][keep]
    state[f"{prefix}.up_proj.weight"] = state[f"{prefix}.up_proj.weight"][keep]
    state[f"{prefix}.down_proj.weight"] = state[f"{prefix}.down_proj.weight"][:, keep]


def slice_experts(state: dict[str, Tensor], prefix: str, keep: Tensor) -> None:
    """Keep hidden channels keep [E, F'] of each routed expert (`prefix.gate_up_proj` [E, D, 2F], `down_proj`)."""
    gate_up = state[f"{prefix}.gate_up_proj"]
    F_old = gate_up.shape[-1] // 2
    idx = keep[:, None, :].expand(-1, gate_up.shape[1], -1)
    gate = gate_up[..., :F_old].gather(2, idx)
    up = gate_up[..., F_old:].gather(2, idx)
    state[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=-1)
    down = state[f"{prefix}.down_proj"]
    state[f"{prefix}.down_proj"] = down.gather(1, keep[:, :, None].expand(-1, -1, down.shape[-1]))


def swiglu_hidden(mlp: SwiGLU, x: Tensor) -> Tensor:
    return F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)


def magnitude_targets(model: Transformer, include_lm_head: bool) -> list[str]:
    """The weight matrices the value steps act on: attention, MLP, shared and routed experts (not embeddings,
    norms or routers), plus the LM head when asked."""
    names = []
    for name, _ in model.named_parameters():
        if (
            name.endswith(("norm.weight", "layernorm.weight"))
            or "embed_tokens" in name
            or name.endswith("router.weight")
        ):
            continue
        if name == "lm_head.weight" and not include_lm_head:
            continue
        names.append(name)
    return names


def stored_numel(model: Transformer, encodings: dict[str, Encoded]) -> tuple[int, int]:
    """(stored parameters, of which active per token): nonzeros of sparse tensors, factor sizes of low-rank
    ones; routed experts count top_k / n_experts of theirs as active."""
    cfg = model.config
    total = active = 0
    for name, p in model.named_parameters():
        e = encodings.get(name)
        n = p.numel()
        if e is not None and e.kind == "sparse":
            n = e.tensors["values"].numel()
        elif e is not None and e.kind == "lowrank":
            n = sum(math.prod(part.shape) for part in e.parts.values())
        total += n
        routed = name.endswith(("feed_forward.gate_up_proj", "feed_forward.down_proj")) and p.dim() == 3
        active += n * cfg.top_k / cfg.n_experts if routed else n
    return total, int(active)
