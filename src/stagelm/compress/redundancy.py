"""Redundancy pruning: merge hidden channels whose activations are near-duplicates (step `redundancy`)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from stagelm.compress.base import (
    Calibration,
    Compression,
    backbone_state,
    expert_intermediates,
    expert_multiple,
    rebuild,
    require_dense,
    slice_experts,
    slice_swiglu,
    swiglu_hidden,
)
from stagelm.model.moe import MoE


class RedundancyPrune:
    """Merge near-duplicate hidden channels of the MLPs and experts: when channel j's activations are, over the
    calibration tokens, close to `alpha` times channel i's (|cosine| >= min_similarity), channel j is removed and
    `alpha` times its row of the down projection is added to channel i's, so the output barely changes.

    Each MLP (and each expert, with the shared expert) removes the same number of channels: `fraction` of them,
    the most redundant first; a pair below `min_similarity` is never merged, so a layer short of redundant pairs
    sets the count for all (the same shape in every layer)."""

    def __init__(self, fraction: float = 0.25, min_similarity: float = 0.5) -> None:
        self.fraction, self.min_similarity = fraction, min_similarity

    @staticmethod
    def plan(h: Tensor, n_remove: int, min_similarity: float) -> list[tuple[int, int, float]]:
        """Up to n_remove merges (removed j, kept i, alpha) of the columns of activations h [N, F], most similar
        pairs first; a channel is merged at most once and never into one that is removed."""
        norms = h.norm(dim=0).clamp_min(1e-12)
        cos = (h.t() @ h) / (norms[:, None] * norms[None])
        cos.fill_diagonal_(0)
        pairs = torch.triu_indices(h.shape[1], h.shape[1], 1)
        sims = cos[pairs[0], pairs[1]].abs()
        order = sims.argsort(descending=True)
        removed: set[int] = set()
        kept_into: set[int] = set()
        merges = []
        for p in order.tolist():
            if len(merges) >= n_remove or sims[p] < min_similarity:
                break
            a, b = pairs[0, p].item(), pairs[1, p].item()
            # remove the weaker channel of the pair, keep the stronger
            j, i = (a, b) if norms[a] < norms[b] else (b, a)
            if j in removed or i in removed or j in kept_into:
                continue
            alpha = float((h[:, i] @ h[:, j]) / (h[:, i] @ h[:, i]).clamp_min(1e-12))
            merges.append((j, i, alpha))
            removed.add(j)
            kept_into.add(i)
        return merges

    @torch.no_grad()
    def __call__(self, c: Compression, calib: Calibration) -> Compression:
        require_dense(c, "redundancy pruning")
        cfg, model = c.config, c.model
        # (state prefix, activations [N, F], kind): every SwiGLU of the model
        dense, expert_like = [], []
        for i, block in enumerate(model.layers):
            x = calib.ffn_inputs[i]
            if block.is_moe:
                moe: MoE = block.feed_forward
                logits, hidden, _ = expert_intermediates(moe, x)
                chosen = moe.route(logits.to(x.dtype))[0]
                for e in range(moe.n_experts):
                    routed = (chosen == e).any(-1)
                    expert_like.append(
                        (f"layers.{i}.feed_forward", e, hidden[e][routed] if routed.sum() > 8 else hidden[e])
                    )
                if moe.shared_expert is not None:
                    shared = f"layers.{i}.feed_forward.shared_expert"
                    expert_like.append((shared, None, swiglu_hidden(moe.shared_expert, x)))
            else:
                dense.append((f"layers.{i}.feed_forward", None, swiglu_hidden(block.feed_forward, x)))
        state = backbone_state(model)
        n_dense = self._apply(state, dense, cfg.d_ff_dense, multiple=1)
        n_ff = self._apply(state, expert_like, cfg.d_ff, multiple=expert_multiple(cfg))
        new_cfg = replace(cfg, d_ff_dense=cfg.d_ff_dense - n_dense, d_ff=cfg.d_ff - n_ff)
        c.notes.append(
            f"redundancy pruning: merged {n_dense} of {cfg.d_ff_dense} dense-MLP channels and {n_ff} of {cfg.d_ff} "
            f"expert channels per matrix (|cos| >= {self.min_similarity})"
        )
        return Compression(rebuild(new_cfg, state, model), c.tokenizer, {}, c.notes)

    def _apply(
        self, state: dict[str, Tensor], mlps: list[tuple[str, int | None, Tensor]], width: int, multiple: int
    ) -> int:
        if not mlps:
            return 0
        want = int(width * self.fraction)
        plans = [self.plan(h, want, self.min_similarity) for _, _, h in mlps]
        n = min(len(p) for p in plans)
        n -= (width - n) % multiple
        if n == 0:
            return 0
        expert_keeps: dict[str, dict[int, Tensor]] = {}
        for (prefix, expert, _), merges in zip(mlps, plans):
            merges = merges[:n]
            drop = {j for j, _, _ in merges}
            keep = torch.tensor([f for f in range(width) if f not in drop])
            if expert is None:
                down = state[f"{prefix}.down_proj.weight"]  # [D, F]
                for j, i, alpha in merges:
                    down[:, i] += alpha * down[:, j]
                slice_swiglu(state, prefix, keep)
            else:
                down = state[f"{prefix}.down_proj"][expert]  # [F, D]
                for j, i, alpha in merges:
                    down[i] += alpha * down[j]
                expert_keeps.setdefault(prefix, {})[expert] = keep
        for prefix, keeps in expert_keeps.items():
            slice_experts(state, prefix, torch.stack([keeps[e] for e in sorted(keeps)]))
        return n
