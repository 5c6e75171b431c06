"""The compression steps a recipe chains (`conf/compress/step/*.yaml` instantiate them), and the calibration
statistics they read.

Every step takes a `Compression` (the current model plus the encodings its tensors will be stored in) and returns a
new one. Structured steps (activation, redundancy and expert pruning) build a smaller `Transformer` whose shapes are
in its `ModelConfig`: every layer keeps the same number of channels, heads and experts (each layer chooses which),
so the config stays one Llama 4 shape and export stays exact. The other steps change values and storage only, and
set the in-memory weights to exactly what loading the stored encoding gives, so every measurement is of the
model that ships."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stagelm.compress import storage
from stagelm.compress.storage import Encoded
from stagelm.model import ModelConfig, Transformer
from stagelm.model.layers import SwiGLU
from stagelm.model.moe import MoE
from stagelm.tokenizer import Tokenizer


@dataclass
class Compression:
    """A model being compressed: the dense weights it computes with, and how some of them are stored."""

    model: Transformer
    tokenizer: Tokenizer
    encodings: dict[str, Encoded] = field(default_factory=dict)  # backbone state-dict key -> its stored form
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


# --- calibration ------------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """What the structured and low-rank steps need from a forward pass over calibration text, per layer."""

    ffn_inputs: dict[int, Tensor]  # layer -> [N, D] inputs of the feed-forward (after post_attention_layernorm)
    head_outputs: dict[int, Tensor]  # layer -> [N, H, head_dim] attention output per head, before o_proj
    grams: dict[str, Tensor]  # nn.Linear weight key -> [in, in] mean of x x^T over its inputs
    tokens: int


@torch.no_grad()
def calibrate(model: Transformer, batches: Sequence[Tensor]) -> Calibration:
    """Run `model` over token batches [B, T] (no padding) and keep the per-layer inputs the steps score with."""
    ffn: dict[int, list[Tensor]] = {}
    heads: dict[int, list[Tensor]] = {}
    grams: dict[str, Tensor] = {}
    hooks = []
    for i, block in enumerate(model.layers):
        hooks.append(
            block.feed_forward.register_forward_pre_hook(
                lambda _m, args, i=i: ffn.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]))
            )
        )
        attn = block.self_attn
        hooks.append(
            attn.o_proj.register_forward_pre_hook(
                lambda _m, args, i=i, a=attn: heads.setdefault(i, []).append(args[0].reshape(-1, a.n_heads, a.head_dim))
            )
        )
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("router"):

            def gram_hook(_m: nn.Module, args: tuple[Tensor, ...], key: str = f"{name}.weight") -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                grams[key] = grams.get(key, 0) + x.t() @ x

            hooks.append(module.register_forward_pre_hook(gram_hook))
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for batch in batches:
            model(batch, with_router_stats=False)
            tokens += batch.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return Calibration(
        {i: torch.cat(v) for i, v in ffn.items()},
        {i: torch.cat(v) for i, v in heads.items()},
        {k: g / tokens for k, g in grams.items()},
        tokens,
    )


def expert_intermediates(moe: MoE, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every expert on every token x [N, D], as the router would scale it had it chosen that expert:
    (router logits [N, E], SwiGLU intermediates [E, N, F], expert outputs [E, N, D], unweighted for softmax)."""
    logits = moe.router(x).float()  # [N, E]
    E = moe.n_experts
    if moe.router_kind == "sigmoid":
        inputs = torch.sigmoid(logits).t()[:, :, None] * x  # [E, N, D]: Llama 4 scales each expert's input
    else:
        inputs = x.expand(E, -1, -1)
    gate, up = torch.bmm(inputs, moe.gate_up_proj).chunk(2, dim=-1)
    hidden = F.silu(gate) * up  # [E, N, F]
    return logits, hidden, torch.bmm(hidden, moe.down_proj)


def routed_output(moe_kind: str, top_k: int, logits: Tensor, outputs: Tensor, keep: Sequence[int]) -> Tensor:
    """The routed experts' output [N, D] when only experts `keep` exist: top-k among their logits (the router
    with the other rows deleted), outputs [E, N, D] from `expert_intermediates`."""
    keep_t = torch.tensor(list(keep))
    sub = logits[:, keep_t]  # [N, K]
    k = min(top_k, len(keep))
    if moe_kind == "sigmoid":
        top, idx = sub.topk(k, dim=-1)
        weights = torch.ones_like(top)  # the sigmoid score already scaled the input
    else:
        probs = torch.softmax(sub, dim=-1)
        top, idx = probs.topk(k, dim=-1)
        weights = top / top.sum(-1, keepdim=True) if k > 1 else torch.ones_like(top)
    chosen = keep_t[idx]  # [N, k] original expert ids
    N = logits.shape[0]
    picked = outputs[chosen, torch.arange(N)[:, None]]  # [N, k, D]
    return (picked * weights[..., None]).sum(1)


# --- helpers for structured pruning -----------------------------------------------------------------------------


def _backbone_state(model: Transformer) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rebuild(config: ModelConfig, state: dict[str, Tensor], like: Transformer) -> Transformer:
    model = Transformer(config)
    model.load_state_dict(state)
    model.train(like.training)
    return model


def _require_dense(c: Compression, step: str) -> None:
    if c.encodings:
        raise ValueError(
            f"{step} changes the model's shapes, so it must come before the steps that choose storage "
            f"(already encoded: {sorted({e.kind for e in c.encodings.values()})})"
        )


def _expert_multiple(cfg: ModelConfig) -> int:
    """Routed experts run grouped matmuls, which want widths in multiples of 16 bytes: 4 fp32 or 8 bf16 values
    (8 for any width that allows it, so a pruned model still runs in bf16)."""
    if not cfg.n_experts:
        return 1
    return 8 if cfg.d_ff >= 64 else 4


def _keep_count(total: int, keep: float, multiple: int = 1) -> int:
    n = max(multiple, int(round(total * keep / multiple)) * multiple)
    return min(total, n)


def _slice_swiglu(state: dict[str, Tensor], prefix: str, keep: Tensor) -> None:
    """Keep hidden channels `keep` of the SwiGLU whose weights are `prefix.{gate,up,down}_proj.weight`."""
    state[f"{prefix}.gate_proj.weight"] = state[f"{prefix}.gate_proj.weight"][keep]
    state[f"{prefix}.up_proj.weight"] = state[f"{prefix}.up_proj.weight"][keep]
    state[f"{prefix}.down_proj.weight"] = state[f"{prefix}.down_proj.weight"][:, keep]


def _slice_experts(state: dict[str, Tensor], prefix: str, keep: Tensor) -> None:
    """Keep hidden channels keep [E, F'] of each routed expert (`prefix.gate_up_proj` [E, D, 2F], `down_proj`)."""
    gate_up = state[f"{prefix}.gate_up_proj"]
    F_old = gate_up.shape[-1] // 2
    idx = keep[:, None, :].expand(-1, gate_up.shape[1], -1)
    gate = gate_up[..., :F_old].gather(2, idx)
    up = gate_up[..., F_old:].gather(2, idx)
    state[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=-1)
    down = state[f"{prefix}.down_proj"]
    state[f"{prefix}.down_proj"] = down.gather(1, keep[:, :, None].expand(-1, -1, down.shape[-1]))


def _swiglu_hidden(mlp: SwiGLU, x: Tensor) -> Tensor:
    return F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)


# --- the steps --------------------------------------------------------------------------------------------------


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
        _require_dense(c, "activation pruning")
        cfg, model = c.config, c.model
        state = _backbone_state(model)
        n_ff_dense = _keep_count(cfg.d_ff_dense, self.mlp_keep)
        n_ff = _keep_count(cfg.d_ff, self.expert_keep, multiple=_expert_multiple(cfg))
        group = cfg.n_heads // cfg.n_kv_heads
        n_per_group = _keep_count(group, self.heads_keep)
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
                _slice_experts(state, f"{p}.feed_forward", torch.stack(keeps))
                if moe.shared_expert is not None:
                    keep = self.channel_scores(moe.shared_expert, x).topk(n_ff).indices.sort().values
                    _slice_swiglu(state, f"{p}.feed_forward.shared_expert", keep)
            else:
                keep = self.channel_scores(block.feed_forward, x).topk(n_ff_dense).indices.sort().values
                _slice_swiglu(state, f"{p}.feed_forward", keep)
            if n_per_group < group:
                self.prune_heads(state, f"{p}.self_attn", block, calib.head_outputs[i], n_per_group, cfg)
        new_cfg = replace(cfg, d_ff=n_ff, d_ff_dense=n_ff_dense, n_heads=n_per_group * cfg.n_kv_heads)
        c.notes.append(
            f"activation pruning: d_ff {cfg.d_ff} -> {n_ff}, d_ff_dense {cfg.d_ff_dense} -> {n_ff_dense}, "
            f"heads {cfg.n_heads} -> {new_cfg.n_heads}"
        )
        return Compression(_rebuild(new_cfg, state, model), c.tokenizer, {}, c.notes)

    @staticmethod
    def channel_scores(mlp: SwiGLU, x: Tensor) -> Tensor:
        return _swiglu_hidden(mlp, x).abs().mean(0) * mlp.down_proj.weight.norm(dim=0)

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


class ExpertPrune:
    """Drop routed experts by what removing them changes, scored with every token run through every expert.

    Greedy, per MoE layer: remove the expert whose removal (its tokens then go to their next choice among the
    experts left, i.e. the router with that row deleted) changes the layer's routed output least on the
    calibration tokens, until `keep` experts remain. The shared expert always stays."""

    def __init__(self, keep: int) -> None:
        self.keep = keep

    @torch.no_grad()
    def __call__(self, c: Compression, calib: Calibration) -> Compression:
        _require_dense(c, "expert pruning")
        cfg = c.config
        if not cfg.n_experts or self.keep >= cfg.n_experts:
            c.notes.append("expert pruning: nothing to prune")
            return c
        if self.keep < cfg.top_k:
            raise ValueError(f"expert pruning: keep={self.keep} must be at least top_k={cfg.top_k}")
        state = _backbone_state(c.model)
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
        return Compression(_rebuild(new_cfg, state, c.model), c.tokenizer, {}, c.notes)

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
        _require_dense(c, "redundancy pruning")
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
                    expert_like.append((shared, None, _swiglu_hidden(moe.shared_expert, x)))
            else:
                dense.append((f"layers.{i}.feed_forward", None, _swiglu_hidden(block.feed_forward, x)))
        state = _backbone_state(model)
        n_dense = self._apply(state, dense, cfg.d_ff_dense, multiple=1)
        n_ff = self._apply(state, expert_like, cfg.d_ff, multiple=_expert_multiple(cfg))
        new_cfg = replace(cfg, d_ff_dense=cfg.d_ff_dense - n_dense, d_ff=cfg.d_ff - n_ff)
        c.notes.append(
            f"redundancy pruning: merged {n_dense} of {cfg.d_ff_dense} dense-MLP channels and {n_ff} of {cfg.d_ff} "
            f"expert channels per matrix (|cos| >= {self.min_similarity})"
        )
        return Compression(_rebuild(new_cfg, state, model), c.tokenizer, {}, c.notes)

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
                _slice_swiglu(state, prefix, keep)
            else:
                down = state[f"{prefix}.down_proj"][expert]  # [F, D]
                for j, i, alpha in merges:
                    down[i] += alpha * down[j]
                expert_keeps.setdefault(prefix, {})[expert] = keep
        for prefix, keeps in expert_keeps.items():
            _slice_experts(state, prefix, torch.stack([keeps[e] for e in sorted(keeps)]))
        return n


def magnitude_targets(model: Transformer, include_lm_head: bool) -> list[str]:
    """The weight matrices the value steps act on: attention, MLP, shared and routed experts (not embeddings,
    norms or routers), plus the LM head when asked."""
    names = []
    for name, _ in model.named_parameters():
        if (
            name.endswith(("norm.weight", "layernorm.weight"))
            or "embed_tokens" in name
            or name.endswith("router.weight")
        ):
            continue
        if name == "lm_head.weight" and not include_lm_head:
            continue
        names.append(name)
    return names


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


class Quantize:
    """Weight-only quantization of every weight matrix, every routed expert's 3-D weights included: int8 with one
    scale per output channel, or int4 in groups of `group` inputs. The router, norms and embeddings stay fp32
    (`embeddings: bf16` stores the embedding table in bf16); the LM head follows `lm_head` (int8, int4 or fp32).
    A factored (low-rank) matrix has its two factors quantized; a group size that does not divide an input
    dimension falls back to int8 for that tensor."""

    def __init__(self, bits: int = 8, group: int = 32, lm_head: str = "int8", embeddings: str = "fp32") -> None:
        if bits not in (4, 8):
            raise ValueError(f"bits={bits}: only 8 (per channel) and 4 (group-wise) are supported")
        if lm_head not in ("int8", "int4", "fp32") or embeddings not in ("fp32", "bf16"):
            raise ValueError(f"lm_head={lm_head!r} (int8|int4|fp32), embeddings={embeddings!r} (fp32|bf16)")
        self.bits, self.group, self.lm_head, self.embeddings = bits, group, lm_head, embeddings

    def encode(self, w: Tensor, in_dim: int, bits: int) -> Encoded:
        if bits == 4 and w.shape[in_dim] % self.group == 0:
            return storage.encode_int4(w, self.group, in_dim)
        return storage.encode_int8(w, in_dim)

    @torch.no_grad()
    def __call__(self, c: Compression, calib: Calibration | None = None) -> Compression:
        params = dict(c.model.named_parameters())
        dropped_sparse = 0
        for name in magnitude_targets(c.model, include_lm_head=self.lm_head != "fp32"):
            bits = self.bits if name != "lm_head.weight" else int(self.lm_head[3:])
            w = params[name]
            in_dim = 1 if w.dim() == 3 else -1  # experts compute x @ W[e]: [E, in, out]
            previous = c.encodings.get(name)
            if previous is not None and previous.kind == "lowrank":
                parts = {k: self.encode(storage.decode(p), -1, bits) for k, p in previous.parts.items()}
                e = Encoded("lowrank", previous.shape, meta=previous.meta, parts=parts)
            else:
                dropped_sparse += previous is not None and previous.kind == "sparse"
                e = self.encode(w.detach(), in_dim, bits)
            w.copy_(storage.decode(e))
            c.encodings[name] = e
        if self.embeddings == "bf16":
            w = params["embed_tokens.weight"]
            e = storage.encode_half(w.detach(), torch.bfloat16)
            w.copy_(storage.decode(e))
            c.encodings["embed_tokens.weight"] = e
        c.notes.append(
            f"quantization: int{self.bits}{f' g{self.group}' if self.bits == 4 else ''} weights, lm_head "
            f"{self.lm_head}, embeddings {self.embeddings}, router and norms fp32"
            + (f"; {dropped_sparse} sparse matrices re-stored dense-quantized" if dropped_sparse else "")
        )
        return c


def stored_numel(model: Transformer, encodings: dict[str, Encoded]) -> tuple[int, int]:
    """(stored parameters, of which active per token): nonzeros of sparse tensors, factor sizes of low-rank
    ones; routed experts count top_k / n_experts of theirs as active."""
    cfg = model.config
    total = active = 0
    for name, p in model.named_parameters():
        e = encodings.get(name)
        n = p.numel()
        if e is not None and e.kind == "sparse":
            n = e.tensors["values"].numel()
        elif e is not None and e.kind == "lowrank":
            n = sum(math.prod(part.shape) for part in e.parts.values())
        total += n
        routed = name.endswith(("feed_forward.gate_up_proj", "feed_forward.down_proj")) and p.dim() == 3
        active += n * cfg.top_k / cfg.n_experts if routed else n
    return total, int(active)
