"""Activation pruning: remove the MLP and expert channels, and the attention heads, that contribute least on
calibration text; the shapes shrink for real (step `activation`)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from stagelm.compress.base import (
    Calibration,
    Compression,
    backbone_state,
    expert_intermediates,
    expert_multiple,
    keep_count,
    rebuild,
    require_dense,
    slice_experts,
    slice_swiglu,
    swiglu_hidden,
)
from stagelm.model import ModelConfig
from stagelm.model.layers import SwiGLU
from stagelm.model.moe import MoE


class ActivationPrune:
    """Remove the MLP and expert channels, and the attention heads, that contribute least on calibration data.

    A channel's score is its mean |activation| times the norm of its row of the down projection (what it adds to
    the output); a routed expert's channels are scored on the tokens routed to it. A head's score is the mean
    norm of its output after o_proj. Each layer keeps the same count (so the config stays one shape); heads are
    kept in equal numbers per KV group so grouped-query attention still maps query heads to their KV head."""

    def __init__(self, mlp_keep: float = 1.0, expert_keep: float = 1.0, heads_keep: float = 1.0) -> None:
        self.mlp_keep, self.expert_keep, self.heads_keep = mlp_keep, expert_keep, heads_keep

    @torch.no_grad()
    def __call__(self, c: Compression, calib: Calibration) -> Compression:
        require_dense(c, "activation pruning")
        cfg, model = c.config, c.model
        state = backbone_state(model)
        n_ff_dense = keep_count(cfg.d_ff_dense, self.mlp_keep)
        n_ff = keep_count(cfg.d_ff, self.expert_keep, multiple=expert_multiple(cfg))
        group = cfg.n_heads // cfg.n_kv_heads
        n_per_group = keep_count(group, self.heads_keep)
        for i, block in enumerate(model.layers):
            x = calib.ffn_inputs[i]
            p = f"layers.{i}"
            if block.is_moe:
                moe: MoE = block.feed_forward
                logits, hidden, _ = expert_intermediates(moe, x)
                chosen = moe.route(logits.to(x.dtype))[0]  # [N, k]
                keeps = []
                for e in range(moe.n_experts):
                    routed = (chosen == e).any(-1)
                    h = hidden[e][routed] if routed.any() else hidden[e]
                    score = h.abs().mean(0) * moe.down_proj[e].norm(dim=-1)
                    keeps.append(score.topk(n_ff).indices.sort().values)
                slice_experts(state, f"{p}.feed_forward", torch.stack(keeps))
                if moe.shared_expert is not None:
                    keep = self.channel_scores(moe.shared_expert, x).topk(n_ff).indices.sort().values
                    slice_swiglu(state, f"{p}.feed_forward.shared_expert", keep)
            else:
                keep = self.channel_scores(block.feed_forward, x).topk(n_ff_dense).indices.sort().values
                slice_swiglu(state, f"{p}.feed_forward", keep)
            if n_per_group < group:
                self.prune_heads(state, f"{p}.self_attn", block, calib.head_outputs[i], n_per_group, cfg)
        new_cfg = replace(cfg, d_ff=n_ff, d_ff_dense=n_ff_dense, n_heads=n_per_group * cfg.n_kv_heads)
        c.notes.append(
            f"activation pruning: d_ff {cfg.d_ff} -> {n_ff}, d_ff_dense {cfg.d_ff_dense} -> {n_ff_dense}, "
            f"heads {cfg.n_heads} -> {new_cfg.n_heads}"
        )
        return Compression(rebuild(new_cfg, state, model), c.tokenizer, {}, c.notes)

    @staticmethod
    def channel_scores(mlp: SwiGLU, x: Tensor) -> Tensor:
        return swiglu_hidden(mlp, x).abs().mean(0) * mlp.down_proj.weight.norm(dim=0)

    @staticmethod
    def prune_heads(
        state: dict[str, Tensor], prefix: str, block: nn.Module, outputs: Tensor, n_per_group: int, cfg: ModelConfig
    ) -> None:
        hd, H = cfg.head_dim, cfg.n_heads
        o_w = block.self_attn.o_proj.weight  # [D, H * hd]
        contrib = torch.stack(
            [(outputs[:, h] @ o_w[:, h * hd : (h + 1) * hd].t()).norm(dim=-1).mean() for h in range(H)]
        )  # [H]
        group = H // cfg.n_kv_heads
        keep = torch.cat(
            [
                g * group + contrib[g * group : (g + 1) * group].topk(n_per_group).indices.sort().values
                for g in range(cfg.n_kv_heads)
            ]
        )
        cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep.tolist()])
        state[f"{prefix}.q_proj.weight"] = state[f"{prefix}.q_proj.weight"][cols]
        state[f"{prefix}.o_proj.weight"] = state[f"{prefix}.o_proj.weight"][:, cols]
