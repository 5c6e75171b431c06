"""Mixture-of-Experts feed-forward layer: a router, routed SwiGLU experts with sparse dispatch, an optional
shared expert, and the auxiliary losses that keep the experts balanced.

Routers:
- "sigmoid" (Llama 4): top-k on the raw logits, score = sigmoid(logit) without renormalisation, and the score
  scales the expert's *input*: `out = shared(x) + sum_k E_k(s_k * x)`.
- "softmax" (Mixtral): softmax, top-k, renormalise; the weight scales the expert's *output*.

Auxiliary losses: Switch Transformer load balancing `E * sum_e f_e P_e` (Fedus et al. 2021) and the
ST-MoE router z-loss `mean(logsumexp(logits)^2)` (Zoph et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stagelm.model.config import ModelConfig
from stagelm.model.layers import SwiGLU, use_custom_autograd


@dataclass
class RouterStats:
    """What one MoE layer reports besides its output (all detached except the losses)."""

    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_load: torch.Tensor  # [E] share of routed assignments per expert, sums to 1
    router_entropy: torch.Tensor  # mean entropy (nats) of the softmax over router logits


def _contiguous_grad(grad: torch.Tensor) -> torch.Tensor:
    # grouped_mm's CPU backward rejects the stride-0 gradients that e.g. `.sum().backward()` produces
    return grad.contiguous()


def grouped_matmul(x: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows of x [N, in] sorted by group, group g = rows up to ends[g], times weights [G, in, out] -> [N, out]."""
    y = F.grouped_mm(x, weights, offs=ends)
    if y.requires_grad:
        y.register_hook(_contiguous_grad)
    return y


class _GroupedSwiGLU(torch.autograd.Function):
    """All experts' SwiGLU over expert-sorted rows, with a hand-written backward that keeps memory traffic low.

    Only the inputs and the gate|up activations are saved: silu(gate) and the product are recomputed in the
    backward (one cheap element-wise pass each) rather than stored, which halves the activations an MoE layer
    holds and, on CPU, the fresh pages the allocator must fault in every step. The gate|up gradient is then
    written over the saved activations themselves, so the backward allocates no [N, 2F] buffer and the
    gate_up matmul's backward needs no concatenation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        gu = F.grouped_mm(x, gate_up, offs=ends)  # [N, 2F]
        f = gu.shape[-1] // 2
        h = F.silu(gu[:, :f]).mul_(gu[:, f:])  # [N, F]
        ctx.save_for_backward(x, gate_up, down, ends, gu)
        return F.grouped_mm(h, down, offs=ends)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, gate_up, down, ends, gu = ctx.saved_tensors
        dy = dy.contiguous()  # grouped_mm rejects the stride-0 gradients of e.g. `.sum().backward()`
        f = gu.shape[-1] // 2
        gate, up = gu[:, :f], gu[:, f:]  # [N, F] views
        s = F.silu(gate)
        h = s * up
        d_down = F.grouped_mm(h.t(), dy, offs=ends) if ctx.needs_input_grad[2] else None  # [G, F, D]
        dh = F.grouped_mm(dy, down.transpose(1, 2), offs=ends)  # [N, F]
        dh_up = torch.mul(dh, up, out=h)  # h is spent
        torch.mul(dh, s, out=up)  # d up, over up (spent)
        torch.ops.aten.silu_backward.grad_input(dh_up, gate, grad_input=gate)  # d gate, over gate
        dgu = gu  # [N, 2F] now the gate|up gradient
        dx = F.grouped_mm(dgu, gate_up.transpose(1, 2), offs=ends) if ctx.needs_input_grad[0] else None
        d_gate_up = F.grouped_mm(x.t(), dgu, offs=ends) if ctx.needs_input_grad[1] else None  # [G, D, 2F]
        return dx, d_gate_up, d_down, None


def experts_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """SwiGLU of each group of expert-sorted rows x [N, D] with its expert's weights -> [N, D]."""
    if use_custom_autograd(x):
        return _GroupedSwiGLU.apply(x, gate_up, down, ends)
    gate, up = grouped_matmul(x, gate_up, ends).chunk(2, dim=-1)  # [N, F] each
    return grouped_matmul(F.silu(gate) * up, down, ends)


# torch.compile traces grouped_mm through a meta kernel that accepts bf16 only; other dtypes run it eagerly
_experts_swiglu_eager = torch.compiler.disable(experts_swiglu)


class _RowGather(torch.autograd.Function):
    """`x[index]` for an index that is a permutation of the rows of x repeated `k` times (each row of x
    appears exactly k times): the backward is a gather by the inverse permutation and a sum over the k
    copies, instead of the scattered accumulation that indexing needs in general."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inverse,) = ctx.saved_tensors
        dx = dy.index_select(0, inverse)  # [N*k, D] in (token, slot) order
        if ctx.k > 1:
            dx = dx.view(-1, ctx.k, dx.shape[-1]).sum(1)
        return dx, None, None, None


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.router_kind = config.n_experts, config.top_k, config.router
        self.lb_loss_coef, self.z_loss_coef = config.lb_loss_coef, config.z_loss_coef
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        # Stored as Llama 4 stores them, so x @ W needs no transpose: gate and up side by side, then down.
        self.gate_up_proj = nn.Parameter(torch.empty(config.n_experts, config.d_model, 2 * config.d_ff))
        self.down_proj = nn.Parameter(torch.empty(config.n_experts, config.d_ff, config.d_model))
        self.shared_expert = SwiGLU(config.d_model, config.d_ff) if config.shared_expert else None

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [N, E] -> (chosen experts [N, k], their scores [N, k])."""
        experts, scores, _ = self._route(logits)
        return experts, scores

    def _route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`route`, plus the fp32 softmax over all experts when the router computed it (the stats reuse it)."""
        if self.router_kind == "sigmoid":
            top_logits, experts = torch.topk(logits, self.top_k, dim=-1)
            return experts, torch.sigmoid(top_logits.float()).to(logits.dtype), None
        probs = torch.softmax(logits.float(), dim=-1)
        top_probs, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.top_k == 1:
            return experts, torch.ones_like(top_probs, dtype=logits.dtype), probs  # p / p is exactly 1
        return experts, (top_probs / top_probs.sum(-1, keepdim=True)).to(logits.dtype), probs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        B, T, D = x.shape
        N, k = B * T, self.top_k
        tokens = x.reshape(N, D)  # [N, D]
        logits = self.router(tokens)  # [N, E]
        experts, scores, probs = self._route(logits)  # [N, k], [N, k], [N, E] or None

        # Sparse dispatch: sort the N*k (token, expert) assignments by expert, so each expert runs one matmul
        # over exactly the tokens routed to it; compute follows top_k, not n_experts.
        flat_experts = experts.reshape(-1)  # [N*k]
        order = torch.argsort(flat_experts, stable=True)  # [N*k]
        token_index = order // k if k > 1 else order  # [N*k] source token of each sorted assignment
        counts = torch.bincount(flat_experts, minlength=self.n_experts)  # [E]
        ends = counts.cumsum(0).to(torch.int32)

        custom = use_custom_autograd(tokens)
        if custom:
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            routed_in = _RowGather.apply(tokens, token_index, inverse, k)  # [N*k, D]
        else:
            routed_in = tokens.index_select(0, token_index)
        if self.router_kind == "sigmoid":
            routed_in = routed_in * scores.reshape(-1).index_select(0, order)[:, None]
        eager = torch.compiler.is_compiling() and x.dtype != torch.bfloat16
        swiglu = _experts_swiglu_eager if eager else experts_swiglu
        routed_out = swiglu(routed_in, self.gate_up_proj, self.down_proj, ends)  # [N*k, D]

        weighted = self.router_kind == "softmax" and k > 1  # top-1 softmax weights are exactly 1
        if custom:
            # back to (token, slot) order by the inverse permutation, then weight and sum the k slots
            out = _RowGather.apply(routed_out, inverse, order, 1)  # [N*k, D]
            if k > 1:
                out = out.view(N, k, D)
                out = (out * scores[..., None] if weighted else out).sum(1)  # [N, D]
        else:
            if weighted:
                routed_out = routed_out * scores.reshape(-1).index_select(0, order)[:, None]
            out = torch.zeros_like(tokens).index_add_(0, token_index, routed_out)  # [N, D]
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.view(B, T, D), self.router_stats(logits, counts, probs)

    def router_stats(
        self, logits: torch.Tensor, counts: torch.Tensor, probs: torch.Tensor | None = None
    ) -> RouterStats:
        """Losses and statistics from router logits [N, E] and assignment counts [E]; probs: their softmax."""
        logits = logits.float()
        if probs is None:
            probs = torch.softmax(logits, dim=-1)  # [N, E]
        load = counts.float() / counts.sum()  # f_e
        load_balance = self.n_experts * torch.sum(load * probs.mean(0))
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        with torch.no_grad():
            entropy = -(probs * torch.log(probs.clamp_min(1e-9))).sum(-1).mean()
        return RouterStats(load_balance, z_loss, load.detach(), entropy)

    def aux_loss(self, stats: RouterStats) -> torch.Tensor:
        return self.lb_loss_coef * stats.load_balance_loss + self.z_loss_coef * stats.z_loss
