"""Zero (magnitude) pruning, stored sparse: a 1-bit mask plus the surviving values (step `magnitude`)."""

from __future__ import annotations

import torch
from torch import Tensor

from stagelm.compress import storage
from stagelm.compress.base import Calibration, Compression, magnitude_targets


class MagnitudePrune:
    """Zero the smallest-magnitude `sparsity` share of each weight matrix (each expert's matrices on their own)
    and store the result sparse: a 1-bit mask plus the surviving values. The model computes with dense kernels,
    so it is no faster; only storage shrinks, and below ~1/32 of the weights kept it cannot pay for its mask."""

    def __init__(self, sparsity: float = 0.5, include_lm_head: bool = False) -> None:
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
        self.sparsity, self.include_lm_head = sparsity, include_lm_head

    @staticmethod
    def prune(w: Tensor, sparsity: float) -> Tensor:
        """w with its round(sparsity * numel) smallest |entries| set to 0 (per 2-D matrix; 3-D: per expert)."""
        mats = w.reshape(-1, *w.shape[-2:]) if w.dim() == 3 else w[None]
        out = []
        for m in mats:
            k = int(round(sparsity * m.numel()))
            if k == 0:
                out.append(m.clone())
                continue
            threshold_idx = m.abs().flatten().argsort()[:k]
            flat = m.flatten().clone()
            flat[threshold_idx] = 0
            out.append(flat.reshape(m.shape))
        return torch.stack(out).reshape(w.shape)

    @torch.no_grad()
    def __call__(self, c: Compression, calib: Calibration | None = None) -> Compression:
        params = dict(c.model.named_parameters())
        for name in magnitude_targets(c.model, self.include_lm_head):
            pruned = self.prune(params[name].detach(), self.sparsity)
            params[name].copy_(pruned)
            c.encodings[name] = storage.encode_sparse(pruned)
        c.notes.append(f"magnitude pruning: {self.sparsity:.0%} of each weight matrix zeroed, stored as mask + values")
        return c
