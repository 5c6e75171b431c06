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
from stagelm.model.layers import SwiGLU


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


@torch.library.custom_op("stagelm::grouped_mm", mutates_args=())
def compiled_grouped_mm(x: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """`F.grouped_mm(x, weights, offs=ends)` as an opaque op: torch.compile then keeps it inside the graph in any
    dtype (compile's own tracing of grouped_mm accepts bf16 only), so an MoE layer does not split the graph."""
    return F.grouped_mm(x, weights, offs=ends)


@compiled_grouped_mm.register_fake
def _(x: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    if weights.dim() == 3:  # rows grouped: [N, in] x [G, in, out] -> [N, out]
        return x.new_empty(x.shape[0], weights.shape[-1])
    return x.new_empty(ends.shape[0], x.shape[0], weights.shape[-1])  # inner dim grouped: -> [G, in, out]


def _compiled_grouped_mm_setup(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _compiled_grouped_mm_backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weights, ends = ctx.saved_tensors
    dy = dy.contiguous()  # grouped_mm rejects the stride-0 gradients of e.g. `.sum().backward()`
    dx = compiled_grouped_mm(dy, weights.transpose(1, 2), ends) if ctx.needs_input_grad[0] else None
    dw = compiled_grouped_mm(x.t(), dy, ends) if ctx.needs_input_grad[1] else None  # [G, in, out]
    return dx, dw, None


compiled_grouped_mm.register_autograd(_compiled_grouped_mm_backward, setup_context=_compiled_grouped_mm_setup)


def grouped_matmul(x: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows of x [N, in] sorted by group, group g = rows up to ends[g], times weights [G, in, out] -> [N, out]."""
    if torch.compiler.is_compiling():
        return compiled_grouped_mm(x, weights, ends)
    y = F.grouped_mm(x, weights, offs=ends)
    if y.requires_grad:
        y.register_hook(_contiguous_grad)
    return y


def experts_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """SwiGLU of each group of expert-sorted rows x [N, D] with its expert's weights -> [N, D]."""
    gate, up = grouped_matmul(x, gate_up, ends).chunk(2, dim=-1)  # [N, F] each
    return grouped_matmul(F.silu(gate) * up, down, ends)


# Autocast does not cover grouped_mm, so under CPU bf16 autocast the experts would compute in fp32 beside bf16 linears.
# In bf16, oneDNN builds a matmul kernel for each new shape (measured: a [1000, 128] x [128, 512] took 2.7 ms for a new
# row count against 0.1 ms for a cached one, and 0.47 ms in fp32), and routing changes every expert's row count every
# step; padding each expert's rows to a multiple of this bounds the shapes to a few dozen per matmul, all cached after
# the first steps of a run.
CPU_BF16_GROUP_ROWS = 32


def cpu_bf16_autocast(x: torch.Tensor) -> bool:
    """Whether x's matmuls run under CPU autocast to bf16 (bf16-mixed training on a CPU)."""
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


def padded_bf16_experts_swiglu(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """`experts_swiglu` in bf16 with each expert's rows padded with zeros to a multiple of CPU_BF16_GROUP_ROWS:
    expert-sorted rows x [R, D] and rows per expert counts [E] -> [R, D] in x's dtype. The padded buffer's size
    depends only on R and E (the last group takes the slack), so a compiled graph sees static shapes."""
    rows, pad = x.shape[0], CPU_BF16_GROUP_ROWS
    n_experts = counts.shape[0]
    total = (rows + n_experts * (pad - 1) + pad - 1) // pad * pad
    padded_counts = (counts + pad - 1) // pad * pad  # [E]
    padded_ends = padded_counts.cumsum(0)  # [E]
    # row i of expert e moves by (e's padded start - its start)
    shift = (padded_ends - padded_counts) - (counts.cumsum(0) - counts)  # [E]
    expert_of_row = torch.repeat_interleave(torch.arange(n_experts, device=x.device), counts, output_size=rows)  # [R]
    dest = torch.arange(rows, device=x.device) + shift.index_select(0, expert_of_row)  # [R]
    ends = torch.cat([padded_ends[:-1], padded_ends.new_full((1,), total)]).to(torch.int32)  # [E]
    padded = x.new_zeros(total, x.shape[1], dtype=torch.bfloat16).index_copy(0, dest, x.to(torch.bfloat16))
    out = experts_swiglu(padded, gate_up.to(torch.bfloat16), down.to(torch.bfloat16), ends)  # [total, D]
    return out.index_select(0, dest).to(x.dtype)  # [R, D]


# Under torch.compile, an MoE layer with at most this many token-expert pairs (a decode step of a few rows) runs
# every expert on every token: measured on CPU, a compiled batch-1 decode step is 1.7x faster that way than with
# sorted dispatch, whose small grouped matmuls have a high fixed cost.
COMPILED_ALL_EXPERTS_MAX_PAIRS = 256


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.router_kind = config.n_experts, config.top_k, config.router
        self.lb_loss_coef, self.z_loss_coef = config.lb_loss_coef, config.z_loss_coef
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        # Stored as Llama 4 stores them, so x @ W needs no transpose: gate and up side by side, then down.
        # Zeros, not torch.empty: the Transformer initializes them (reset_parameters), and a stand-alone MoE must
        # never compute with whatever memory held (NaNs made a gradient test flaky); zeros draw no random numbers,
        # so a seed gives the same model as before.
        self.gate_up_proj = nn.Parameter(torch.zeros(config.n_experts, config.d_model, 2 * config.d_ff))
        self.down_proj = nn.Parameter(torch.zeros(config.n_experts, config.d_ff, config.d_model))
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

    def forward(self, x: torch.Tensor, with_stats: bool = True) -> tuple[torch.Tensor, RouterStats | None]:
        """x [B, T, D] -> (output [B, T, D], router statistics, or None when with_stats is False)."""
        B, T, D = x.shape
        N = B * T
        tokens = x.reshape(N, D)  # [N, D]
        logits = self.router(tokens)  # [N, E]
        experts, scores, probs = self._route(logits)  # [N, k], [N, k], [N, E] or None
        all_experts = torch.compiler.is_compiling() and N * self.n_experts <= COMPILED_ALL_EXPERTS_MAX_PAIRS
        # assignments per expert: the sorted dispatch's group ends and the load statistic, counted once
        counts = self._expert_counts(experts.reshape(-1)) if with_stats or not all_experts else None  # [E]
        if all_experts:
            out = self._all_experts(tokens, experts, scores)  # [N, D]
        else:
            out = self._routed_experts(tokens, experts, scores, counts)  # [N, D]
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        if not with_stats:
            return out.view(B, T, D), None
        return out.view(B, T, D), self.router_stats(logits, counts, probs)

    def _expert_counts(self, flat_experts: torch.Tensor) -> torch.Tensor:
        """Assignments per expert [E] (long)."""
        if torch.compiler.is_compiling():  # bincount's output size depends on the data; this one's does not
            ones = torch.ones_like(flat_experts)
            return torch.zeros(self.n_experts, dtype=torch.long, device=ones.device).scatter_add_(0, flat_experts, ones)
        return torch.bincount(flat_experts, minlength=self.n_experts)

    def _routed_experts(
        self, tokens: torch.Tensor, experts: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """Routed experts' output [N, D]: each expert runs one matmul over exactly the tokens routed to it.
        counts [E]: assignments per expert."""
        N, D = tokens.shape
        k = self.top_k
        # Sort the N*k (token, expert) assignments by expert; compute follows top_k, not n_experts.
        flat_experts = experts.reshape(-1)  # [N*k]
        order = torch.argsort(flat_experts, stable=True)  # [N*k]
        token_index = order // k if k > 1 else order  # [N*k] source token of each sorted assignment
        ends = counts.cumsum(0).to(torch.int32)  # [E]

        routed_in = tokens.index_select(0, token_index)  # [N*k, D]
        if self.router_kind == "sigmoid":
            routed_in = routed_in * scores.reshape(-1).index_select(0, order)[:, None]
        if cpu_bf16_autocast(tokens):
            routed_out = padded_bf16_experts_swiglu(routed_in, self.gate_up_proj, self.down_proj, counts)
        else:
            routed_out = experts_swiglu(routed_in, self.gate_up_proj, self.down_proj, ends)  # [N*k, D]
        if self.router_kind == "softmax" and k > 1:  # top-1 softmax weights are exactly 1
            routed_out = routed_out * scores.reshape(-1).index_select(0, order)[:, None]
        return torch.zeros_like(tokens).index_add_(0, token_index, routed_out)  # [N, D]

    def _all_experts(self, tokens: torch.Tensor, experts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Routed experts' output [N, D] with every expert applied to every token and weighted 0 where not chosen:
        the same result as `_routed_experts` (an expert not chosen sees a zero input under the sigmoid router,
        or has its output multiplied by 0 under softmax, and SwiGLU(0) = 0) with no sorting, so a compiled decode
        step is a few fused kernels around two batched matmuls."""
        weights = scores.new_zeros(scores.shape[0], self.n_experts).scatter_(1, experts, scores)  # [N, E]
        weights = weights.t()[:, :, None]  # [E, N, 1]
        if self.router_kind == "sigmoid":
            inputs = weights * tokens  # [E, N, D]: Llama 4 scales each expert's input
        else:
            inputs = tokens.expand(self.n_experts, -1, -1)  # [E, N, D]
        gate, up = torch.bmm(inputs, self.gate_up_proj).chunk(2, dim=-1)  # [E, N, F] each
        out = torch.bmm(F.silu(gate) * up, self.down_proj)  # [E, N, D]
        if self.router_kind == "softmax":
            out = out * weights
        return out.sum(0)  # [N, D]

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
