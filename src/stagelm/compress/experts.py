"""MoE expert pruning by routing statistics, with every calibration token run through every expert (step `experts`)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from stagelm.compress.base import (
    Calibration,
    Compression,
    backbone_state,
    expert_intermediates,
    rebuild,
    require_dense,
    routed_output,
)
from stagelm.model.moe import MoE


class ExpertPrune:
    """Drop routed experts by what removing them changes, scored with every token run through every expert.

    Greedy, per MoE layer: remove the expert whose removal (its tokens then go to their next choice among the
    experts left, i.e. the router with that row deleted) changes the layer's routed output least on the
    calibration tokens, until `keep` experts remain. The shared expert always stays."""

    def __init__(self, keep: int) -> None:
        self.keep = keep

    @torch.no_grad()
    def __call__(self, c: Compression, calib: Calibration) -> Compression:
        require_dense(c, "expert pruning")
        cfg = c.config
        if not cfg.n_experts or self.keep >= cfg.n_experts:
            c.notes.append("expert pruning: nothing to prune")
            return c
        if self.keep < cfg.top_k:
            raise ValueError(f"expert pruning: keep={self.keep} must be at least top_k={cfg.top_k}")
        state = backbone_state(c.model)
        loads = []
        for i, block in enumerate(c.model.layers):
            if not block.is_moe:
                continue
            keep = self.choose(block.feed_forward, calib.ffn_inputs[i], self.keep)
            idx = torch.tensor(keep)
            p = f"layers.{i}.feed_forward"
            state[f"{p}.router.weight"] = state[f"{p}.router.weight"][idx]
            state[f"{p}.gate_up_proj"] = state[f"{p}.gate_up_proj"][idx]
            state[f"{p}.down_proj"] = state[f"{p}.down_proj"][idx]
            loads.append(f"layer {i} keeps {keep}")
        new_cfg = replace(cfg, n_experts=self.keep)
        c.notes.append(f"expert pruning: {cfg.n_experts} -> {self.keep} experts ({'; '.join(loads)})")
        return Compression(rebuild(new_cfg, state, c.model), c.tokenizer, {}, c.notes)

    @staticmethod
    def choose(moe: MoE, x: Tensor, keep: int) -> list[int]:
        logits, _, outputs = expert_intermediates(moe, x)
        return ExpertPrune.choose_from(moe.router_kind, moe.top_k, logits, outputs, keep)

    @staticmethod
    def choose_from(kind: str, top_k: int, logits: Tensor, outputs: Tensor, keep: int) -> list[int]:
        """The experts kept, from router logits [N, E] and every expert's output on every token [E, N, D]."""
        full = routed_output(kind, top_k, logits, outputs, range(logits.shape[1]))
        kept = list(range(logits.shape[1]))
        while len(kept) > keep:
            errors = [
                (routed_output(kind, top_k, logits, outputs, [k for k in kept if k != e]) - full)
                .pow(2)
                .sum(-1)
                .mean()
                .item()
                for e in kept
            ]
            kept.remove(kept[min(range(len(kept)), key=errors.__getitem__)])
        return kept
