"""The backbone: token embedding, pre-norm residual blocks (attention, then a dense or MoE feed-forward),
final RMSNorm and LM head. `Transformer(config)(input_ids)` returns logits, the weighted MoE auxiliary
loss and per-layer router statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from stagelm.model.config import ModelConfig
from stagelm.model.layers import Attention, KVCache, RMSNorm, StaticKVCache, SwiGLU, rope_frequencies
from stagelm.model.moe import MoE, RouterStats


@dataclass
class TransformerOutput:
    logits: torch.Tensor | None  # [B, T, V]; None when the caller asked for hidden states only
    aux_loss: torch.Tensor  # scalar, already weighted by lb_loss_coef and z_loss_coef
    router_stats: dict[int, RouterStats] = field(default_factory=dict)  # layer index -> stats, MoE layers only
    hidden: torch.Tensor | None = None  # [B, T, D] after the final norm, when return_hidden=True


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.is_moe = config.is_moe_layer(layer)
        self.feed_forward = MoE(config) if self.is_moe else SwiGLU(config.d_model, config.d_ff_dense)

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | StaticKVCache | None,
        with_router_stats: bool = True,
    ) -> tuple[torch.Tensor, RouterStats | None]:
        x = x + self.self_attn(self.input_layernorm(x), freqs, mask, cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, stats = self.feed_forward(h, with_router_stats)
            return x + out, stats
        return x + self.feed_forward(h), None


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        # GPT-2 style: output projections of each residual branch shrink with depth so the stream stays O(1)
        out_std = std / (2 * self.config.n_layers) ** 0.5
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | StaticKVCache | None = None,
        return_hidden: bool = False,
        compute_logits: bool = True,
        with_router_stats: bool = True,
    ) -> TransformerOutput:
        """input_ids [B, T]. attention_mask [B, S] (S = cached + T) marks real tokens, False for padding.
        positions [B, T] default to counting real tokens, so left-padded rows get the positions they
        would have alone. with_router_stats=False skips the router losses and statistics (sampling needs
        neither); aux_loss is then 0 and router_stats empty."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            if attention_mask is None:
                positions = torch.arange(past, past + T, device=input_ids.device)[None]  # [1, T]
            else:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]  # [B, T]
        freqs = rope_frequencies(self.config.head_dim, self.config.rope_theta, positions)  # [B|1, T, D/2, 2]
        mask = self._attention_mask(attention_mask, T, past, input_ids.device)

        x = self.embed_tokens(input_ids)  # [B, T, D]
        aux_loss = x.new_zeros((), dtype=torch.float32)
        stats: dict[int, RouterStats] = {}
        for i, block in enumerate(self.layers):
            x, layer_stats = block(x, freqs, mask, cache, with_router_stats)
            if layer_stats is not None:
                stats[i] = layer_stats
                aux_loss = aux_loss + block.feed_forward.aux_loss(layer_stats)
        if cache is not None:
            cache.length += T
        x = self.norm(x)
        logits = self.lm_head(x) if compute_logits else None
        return TransformerOutput(logits, aux_loss, stats, x if return_hidden else None)

    @staticmethod
    def _attention_mask(
        attention_mask: torch.Tensor | None, T: int, past: int, device: torch.device
    ) -> torch.Tensor | None:
        """None (plain causal, the fast path) or a boolean [B, 1, T, S] mask: causal, padding keys hidden."""
        if attention_mask is None and past == 0:
            return None
        S = past + T
        if T == 1 and attention_mask is not None:
            # a decode step: its one query may see every key the mask allows (a StaticKVCache passes a mask as
            # wide as its buffer), so only padding and unwritten columns are hidden
            return attention_mask[:, None, None, :].bool()  # [B, 1, 1, S]
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)  # [T, S]
        if attention_mask is None:
            return causal[None, None]
        mask = causal[None] & attention_mask[:, None, :S].bool()  # [B, T, S]
        # a padding query would see no key at all (NaN softmax); let it see itself, its output is unused
        rows = torch.arange(T, device=device)
        mask[:, rows, rows + past] = True
        return mask[:, None]  # [B, 1, T, S]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
