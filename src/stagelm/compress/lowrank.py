"""Low-rank factorization: (activation-whitened) SVD of linear layers, kept only where it saves parameters
(step `lowrank`)."""

from __future__ import annotations

import torch
from torch import Tensor

from stagelm.compress import storage
from stagelm.compress.base import Calibration, Compression, magnitude_targets


def select_rank(singular_values: Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep at least `energy` of the squared sum."""
    sq = singular_values.double().pow(2)
    share = sq.cumsum(0) / sq.sum().clamp_min(1e-30)
    return int((share < energy - 1e-12).sum().item()) + 1


def lowrank_factors(w: Tensor, gram: Tensor | None, energy: float) -> tuple[Tensor, Tensor, int]:
    """`w [out, in] ~ a @ b` at the rank `select_rank` picks. With the input Gram matrix (E[x x^T] on calibration
    data) the SVD is of `w S` where `S S^T = gram` (SVD-LLM's whitening): truncating it minimises the error of the
    layer's *outputs* on that data rather than of its weights."""
    w = w.double()
    if gram is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = select_rank(s, energy)
        return (u[:, :r] * s[:r]).float(), vh[:r].float(), r
    g = gram.double()
    g = g + 1e-6 * g.diagonal().mean().clamp_min(1e-12) * torch.eye(g.shape[0], dtype=g.dtype)
    chol = torch.linalg.cholesky(g)  # lower triangular, g = chol chol^T
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    r = select_rank(s, energy)
    b = torch.linalg.solve_triangular(chol, vh[:r], upper=False, left=False)  # vh_r chol^-1
    return (u[:, :r] * s[:r]).float(), b.float(), r


class LowRank:
    """Factor each linear layer's weight as `A @ B` by (whitened) SVD, at the smallest rank keeping `energy` of the
    spectrum, and keep the factorization only where it stores at most `max_param_ratio` of the parameters."""

    def __init__(self, energy: float = 0.9, whiten: bool = True, max_param_ratio: float = 0.8) -> None:
        self.energy, self.whiten, self.max_param_ratio = energy, whiten, max_param_ratio

    @torch.no_grad()
    def __call__(self, c: Compression, calib: Calibration) -> Compression:
        params = dict(c.model.named_parameters())
        kept, skipped = 0, 0
        for name in magnitude_targets(c.model, include_lm_head=False):
            w = params[name]
            if w.dim() != 2 or name in c.encodings:
                continue
            gram = calib.grams.get(name) if self.whiten else None
            a, b, r = lowrank_factors(w.detach(), gram, self.energy)
            out_f, in_f = w.shape
            if r * (out_f + in_f) > self.max_param_ratio * out_f * in_f:
                skipped += 1
                continue
            w.copy_(a @ b)
            c.encodings[name] = storage.encode_lowrank(a, b)
            kept += 1
        c.notes.append(
            f"low-rank: {kept} matrices factored at {self.energy:.0%} energy"
            f"{' (whitened)' if self.whiten else ''}, {skipped} left dense (no saving)"
        )
        return c
