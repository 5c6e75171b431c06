"""Scalar heads on the backbone's final hidden states: the reward model's score and PPO's value estimates."""

from __future__ import annotations

import torch
from torch import nn


class ScalarHead(nn.Module):
    """One number per position: `hidden [B, T, D] -> [B, T]`."""

    def __init__(self, d_model: int, init_std: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, 1)
        # a zero-initialised head starts every score at the same value, so early training follows the data
        nn.init.normal_(self.proj.weight, 0.0, init_std) if init_std else nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of each row's last real token; works for left and right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values [B, T] -> [B], read at each row's last real token."""
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
