"""The one dataclass that describes a stagelm backbone; every other model file reads its sizes from here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 256  # width of one routed expert (and of the shared expert)
    d_ff_dense: int = 512  # width of the MLP in dense layers
    n_experts: int = 0  # 0: every layer dense
    top_k: int = 1
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0 (Llama 4's interleave step)
    shared_expert: bool = True
    router: str = "sigmoid"  # "sigmoid" (Llama 4) or "softmax" (Mixtral / Switch)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    lb_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    init_std: float = 0.02
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_heads
        problems = []
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.router not in ("sigmoid", "softmax"):
            problems.append(f"router={self.router!r} must be 'sigmoid' or 'softmax'")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            problems.append(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        if self.moe_every < 1:
            problems.append(f"moe_every={self.moe_every} must be >= 1")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and (layer + 1) % self.moe_every == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def num_params(self, active_only: bool = False) -> int:
        """Analytic parameter count; with active_only, routed experts count top_k times instead of n_experts."""
        d, hd = self.d_model, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2) + 2 * d
        total = self.vocab_size * d * (1 if self.tie_embeddings else 2) + d
        for layer in range(self.n_layers):
            total += attn
            if self.is_moe_layer(layer):
                experts = self.top_k if active_only else self.n_experts
                total += d * self.n_experts + experts * 3 * d * self.d_ff
                total += 3 * d * self.d_ff if self.shared_expert else 0
            else:
                total += 3 * d * self.d_ff_dense
        return total
