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


def grouped_matmul(x: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows of x [N, in] sorted by group, group g = rows up to ends[g], times weights [G, in, out] -> [N, out]."""
    y = F.grouped_mm(x, weights, offs=ends)
    if y.requires_grad:
        y.register_hook(_contiguous_grad)
    return y


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
        if self.router_kind == "sigmoid":
            top_logits, experts = torch.topk(logits, self.top_k, dim=-1)
            return experts, torch.sigmoid(top_logits.float()).to(logits.dtype)
        probs = torch.softmax(logits.float(), dim=-1)
        top_probs, experts = torch.topk(probs, self.top_k, dim=-1)
        return experts, (top_probs / top_probs.sum(-1, keepdim=True)).to(logits.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        B, T, D = x.shape
        tokens = x.reshape(B * T, D)  # [N, D]
        logits = self.router(tokens)  # [N, E]
        experts, scores = self.route(logits)  # [N, k] each

        # Sparse dispatch: sort the N*k (token, expert) assignments by expert, so each expert runs one matmul
        # over exactly the tokens routed to it; compute follows top_k, not n_experts.
        flat_experts = experts.reshape(-1)  # [N*k]
        order = torch.argsort(flat_experts, stable=True)  # [N*k]
        token_index = order // self.top_k  # [N*k] source token of each sorted assignment
        sorted_scores = scores.reshape(-1)[order, None]  # [N*k, 1]
        counts = torch.bincount(flat_experts, minlength=self.n_experts)  # [E]
        ends = counts.cumsum(0).to(torch.int32)

        routed_in = tokens[token_index]  # [N*k, D]
        if self.router_kind == "sigmoid":
            routed_in = routed_in * sorted_scores
        gate, up = grouped_matmul(routed_in, self.gate_up_proj, ends).chunk(2, dim=-1)  # [N*k, F] each
        routed_out = grouped_matmul(F.silu(gate) * up, self.down_proj, ends)  # [N*k, D]
        if self.router_kind == "softmax":
            routed_out = routed_out * sorted_scores

        out = torch.zeros_like(tokens).index_add_(0, token_index, routed_out)  # [N, D]
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.view(B, T, D), self.router_stats(logits, counts)

    def router_stats(self, logits: torch.Tensor, counts: torch.Tensor) -> RouterStats:
        logits = logits.float()
        probs = torch.softmax(logits, dim=-1)  # [N, E]
        load = counts.float() / counts.sum()  # f_e
        load_balance = self.n_experts * torch.sum(load * probs.mean(0))
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        entropy = -(probs * torch.log(probs.clamp_min(1e-9))).sum(-1).mean()
        return RouterStats(load_balance, z_loss, load.detach(), entropy.detach())

    def aux_loss(self, stats: RouterStats) -> torch.Tensor:
        return self.lb_loss_coef * stats.load_balance_loss + self.z_loss_coef * stats.z_loss

