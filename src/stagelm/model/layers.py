"""The dense building blocks of the backbone: RMSNorm, rotary embeddings, grouped-query attention with a KV
cache, and the SwiGLU MLP. The math follows Llama 4's text model exactly, so exported weights give the same logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stagelm.model.config import ModelConfig


class RMSNorm(nn.Module):
    """`w * x * rsqrt(mean(x^2) + eps)`, normalised in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, positions: torch.Tensor) -> torch.Tensor:
    """The rotation of each position and pair, as (cos, sin): [..., T] positions -> [..., T, head_dim / 2, 2]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    angles = positions[..., None].float() * inv_freq
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of x [B, T, H, D] by the angles in freqs [B or 1, T, D/2, 2], each pair as
    a complex number times cos + i sin."""
    if torch.compiler.is_compiling():
        return rotate_pairs(x, freqs)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [B, T, H, D/2]
    rotated = torch.view_as_real(pairs * torch.view_as_complex(freqs)[:, :, None, :]).flatten(3)  # [B, T, H, D]
    return rotated.type_as(x)


def rotate_pairs(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """`apply_rope` in real arithmetic, for compiled graphs: inductor generates no code for complex tensors (a
    compiled decode step left each complex op to an eager kernel: 1.92x HF -> 2.12-2.22x at batch 1), while in eager the
    complex multiply is one kernel against this version's seven (2.2x slower forward and backward)."""
    x0, x1 = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)  # each [B, T, H, D/2]
    cos, sin = freqs[:, :, None, :, 0], freqs[:, :, None, :, 1]  # each [B or 1, T, 1, D/2]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(3)  # [B, T, H, D]
    return rotated.type_as(x)


class KVCache:
    """Preallocated keys and values for every layer; all rows share one write position (prompts are left-padded)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0  # tokens already written
        self.max_len = max_len

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, T, D] after the cached ones; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len={self.max_len}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class StaticKVCache:
    """A view of a KVCache's buffers for compiled decoding: each step writes its keys and values at the column
    held in `position` (a tensor, so the compiled graph never specialises on it) and attends over the whole
    buffer, so every step has the same shapes and one compiled graph serves them all. The attention mask hides
    the columns not written yet."""

    def __init__(self, cache: KVCache, position: torch.Tensor) -> None:
        self.keys, self.values = cache.keys, cache.values
        self.position = position  # [1] long: the column this step writes
        self.length = 0  # unused: callers pass positions and a mask as wide as the buffer

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, 1, D] at `position`; return the whole buffers [B, Hkv, max_len, D]."""
        self.keys[layer].index_copy_(2, self.position, k)
        self.values[layer].index_copy_(2, self.position, v)
        return self.keys[layer], self.values[layer]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention of q [B, H, T, D] over k, v [B, H, S, D]: causal when mask is None, else the
    boolean mask [B, 1, T, S]."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad:
        # PyTorch's CPU flash-attention backward is slow in bf16: measured at [32, 4, 128, 32], forward and
        # backward took 19.8 ms in bf16 against 6.1 ms in fp32, the largest op of a bf16-mixed training step.
        # Training attends in fp32 (autocast off, or it would cast back) and returns bf16 to the next matmul.
        with torch.autocast("cpu", enabled=False):
            return attend(q.float(), k.float(), v.float(), mask).to(torch.bfloat16)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Causal grouped-query attention without biases: query head h reads kv head h // (n_heads / n_kv_heads)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | StaticKVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q = apply_rope(q, freqs).transpose(1, 2)  # [B, H, T, D]
        k = apply_rope(k, freqs).transpose(1, 2)  # [B, Hkv, T, D]
        if cache is not None:
            k, v = cache.write(self.layer, k, v)  # [B, Hkv, S, D], S = cached + T
        if T == 1 and mask is not None:
            # one query per row (a decode step): query head h reads kv head h // repeat, so the heads that share
            # a kv head are stacked as that head's queries and attend without copying k and v
            q = q.reshape(B, self.n_kv_heads, -1, self.head_dim)  # [B, Hkv, H / Hkv, D]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, Hkv, H / Hkv, D]
            return self.o_proj(y.reshape(B, 1, self.n_heads * self.head_dim))  # [B, 1, H * D]
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(repeat, dim=1)  # [B, H, S, D]
            v = v.repeat_interleave(repeat, dim=1)
        y = attend(q, k, v, mask)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, H * D]
        return self.o_proj(y)


class SwiGLU(nn.Module):
    """`(silu(x W_g) * (x W_u)) W_d` without biases: the dense MLP and the shared expert."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
