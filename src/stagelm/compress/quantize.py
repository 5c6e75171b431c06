"""Weight-only quantization, int8 per output channel or int4 group-wise, of every weight matrix and every
routed expert (steps `int8`, `int4`); int4 rounds to nearest or, with `method: gptq`, column by column with each
rounding error compensated on the columns still to come (GPTQ).

`fake_quantize` is the training side (quantization-aware distillation, `stage=distill stage.fake_quant=...`): the
model computes with the very values round-to-nearest `Quantize` would store, and its latent fp32 weights learn
through the rounding by the straight-through estimator."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from stagelm.compress import storage
from stagelm.compress.base import Calibration, Compression, expert_intermediates, magnitude_targets
from stagelm.compress.storage import Encoded
from stagelm.model import Transformer
from stagelm.model.moe import MoE


@torch.no_grad()
def gptq_int4(w: Tensor, gram: Tensor, group: int, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Int4 group-wise values for `w` [out, in] that keep `x @ w.T` close on the inputs whose mean `x x^T` is
    `gram` [in, in] (GPTQ, Frantar et al. 2022): columns are rounded in order, and each column's rounding error is
    taken out of the columns not yet rounded, weighted by how the inputs correlate. A group's scale is its amax / 7
    when the group's first column is reached. Returns (values [out, in], scales [out, in // group, 1] fp16): the
    values lie on `storage.encode_int4`'s grid with those scales. With uncorrelated inputs (a diagonal gram) no
    error moves and this is round-to-nearest."""
    W = w.detach().float().clone()
    n_in = W.shape[1]
    H = gram.detach().double().clone()
    dead = H.diagonal() == 0  # inputs that never occur: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * H.diagonal().mean() * torch.eye(n_in, dtype=H.dtype)  # keeps the inverse stable
    # the upper Cholesky factor of H^-1: row i holds how column i's error spreads to the later columns
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    values = torch.zeros_like(W)
    scales = []
    for i in range(n_in):
        if i % group == 0:
            scales.append(storage.int4_scale(W[:, i : i + group].abs().amax(-1, keepdim=True)))  # [out, 1]
        step = scales[-1].float()[:, 0]
        values[:, i] = torch.round(W[:, i] / step).clamp(-8, 7) * step
        err = (W[:, i] - values[:, i]) / U[i, i]
        W[:, i + 1 :] -= err[:, None] * U[i, i + 1 :][None, :]
    return values, torch.stack(scales, dim=1)  # [out, G, 1]


def _gram(x: Tensor) -> Tensor:
    return x.t() @ x / max(1, x.shape[0])


@torch.no_grad()
def expert_grams(moe: MoE, x: Tensor) -> dict[str, list[Tensor]]:
    """Per routed expert, the mean `x x^T` of the inputs it really gets on calibration tokens `x` [N, D] (the
    tokens the router sends it, scaled as the router scales them): {"gate_up_proj": E x [D, D],
    "down_proj": E x [F, F]}. An expert no token reaches gets zeros (round-to-nearest)."""
    logits, hidden, _ = expert_intermediates(moe, x)  # [N, E], [E, N, F]
    chosen = logits.topk(moe.top_k, dim=-1).indices  # [N, k]
    grams: dict[str, list[Tensor]] = {"gate_up_proj": [], "down_proj": []}
    for e in range(moe.n_experts):
        routed = (chosen == e).any(-1)  # [N]
        inputs = torch.sigmoid(logits[:, e : e + 1]) * x if moe.router_kind == "sigmoid" else x
        grams["gate_up_proj"].append(_gram(inputs[routed].float()))
        grams["down_proj"].append(_gram(hidden[e][routed].float()))
    return grams


class Quantize:
    """Weight-only quantization of every weight matrix, every routed expert's 3-D weights included: int8 with one
    scale per output channel, or int4 in groups of `group` inputs. The router, norms and embeddings stay fp32
    (`embeddings: bf16` stores the embedding table in bf16); the LM head follows `lm_head` (int8, int4 or fp32).
    A factored (low-rank) matrix has its two factors quantized; a group size that does not divide an input
    dimension falls back to int8 for that tensor. `method: gptq` chooses the int4 values with `gptq_int4` on the
    calibration inputs of each matrix (each expert's own tokens for the experts)."""

    def __init__(
        self, bits: int = 8, group: int = 32, lm_head: str = "int8", embeddings: str = "fp32", method: str = "rtn"
    ) -> None:
        if bits not in (4, 8):
            raise ValueError(f"bits={bits}: only 8 (per channel) and 4 (group-wise) are supported")
        if lm_head not in ("int8", "int4", "fp32") or embeddings not in ("fp32", "bf16"):
            raise ValueError(f"lm_head={lm_head!r} (int8|int4|fp32), embeddings={embeddings!r} (fp32|bf16)")
        if method not in ("rtn", "gptq"):
            raise ValueError(f"method={method!r}: 'rtn' (round to nearest) or 'gptq'")
        self.bits, self.group, self.lm_head, self.embeddings, self.method = bits, group, lm_head, embeddings, method

    def encode(self, w: Tensor, in_dim: int, bits: int, grams: list[Tensor] | None = None) -> Encoded:
        if bits == 4 and w.shape[in_dim] % self.group == 0:
            if grams is None:
                return storage.encode_int4(w, self.group, in_dim)
            if w.dim() == 2:
                values, scale = gptq_int4(w, grams[0], self.group)
            else:  # GPTQ works on [out, in] matrices: each expert's x @ W[e], transposed
                done = [gptq_int4(w[e].t(), g, self.group) for e, g in enumerate(grams)]
                values = torch.stack([v.t() for v, _ in done])  # [E, in, out]
                scale = torch.stack([s for _, s in done])  # [E, out, G, 1]
            return storage.encode_int4(values, self.group, in_dim, scale=scale)
        return storage.encode_int8(w, in_dim)

    def grams(self, c: Compression, calib: Calibration | None) -> dict[str, list[Tensor]]:
        """Calibration grams per weight for GPTQ (empty for round-to-nearest)."""
        if self.method == "rtn":
            return {}
        if calib is None:
            raise ValueError("int4 method=gptq needs calibration data")
        grams = {name: [g] for name, g in calib.grams.items()}
        for i, block in enumerate(c.model.layers):
            if isinstance(block.feed_forward, MoE):
                for key, per_expert in expert_grams(block.feed_forward, calib.ffn_inputs[i]).items():
                    grams[f"layers.{i}.feed_forward.{key}"] = per_expert
        return grams

    def targets(self, model: Transformer) -> list[tuple[str, int, int]]:
        """(parameter name, bits, input dimension) of every weight this step quantizes (the embedding table's
        bf16 storage aside)."""
        params = dict(model.named_parameters())
        out = []
        for name in magnitude_targets(model, include_lm_head=self.lm_head != "fp32"):
            bits = self.bits if name != "lm_head.weight" else int(self.lm_head[3:])
            out.append((name, bits, 1 if params[name].dim() == 3 else -1))  # experts compute x @ W[e]: [E, in, out]
        return out

    @torch.no_grad()
    def __call__(self, c: Compression, calib: Calibration | None = None) -> Compression:
        params = dict(c.model.named_parameters())
        grams = self.grams(c, calib)
        dropped_sparse = 0
        for name, bits, in_dim in self.targets(c.model):
            w = params[name]
            previous = c.encodings.get(name)
            if previous is not None and previous.kind == "lowrank":
                parts = {k: self.encode(storage.decode(p), -1, bits) for k, p in previous.parts.items()}
                e = Encoded("lowrank", previous.shape, meta=previous.meta, parts=parts)
            else:
                dropped_sparse += previous is not None and previous.kind == "sparse"
                e = self.encode(w.detach(), in_dim, bits, grams.get(name))
            w.copy_(storage.decode(e))
            c.encodings[name] = e
        if self.embeddings == "bf16":
            w = params["embed_tokens.weight"]
            e = storage.encode_half(w.detach(), torch.bfloat16)
            w.copy_(storage.decode(e))
            c.encodings["embed_tokens.weight"] = e
        c.notes.append(
            f"quantization: int{self.bits}{f' g{self.group} {self.method}' if self.bits == 4 else ''} weights, lm_head "
            f"{self.lm_head}, embeddings {self.embeddings}, router and norms fp32"
            + (f"; {dropped_sparse} sparse matrices re-stored dense-quantized" if dropped_sparse else "")
        )
        return c


# --- quantization-aware training ------------------------------------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """Forward: the weight as its encoding decodes; backward: the gradient passed to the latent weight unchanged
    (the straight-through estimator: rounding's own gradient is zero almost everywhere). The grids here are
    scaled by each group's amax, so no weight is ever clipped and there is no range to mask the gradient to."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, latent: Tensor, encode: Callable[[Tensor], Encoded]
    ) -> Tensor:
        # contiguous, as the stored weight is once loaded: the same kernels, the same sums, the same logits
        return storage.decode(encode(latent)).to(latent.dtype).contiguous()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class FakeQuantized(nn.Module):
    """A parametrization (`torch.nn.utils.parametrize`) whose module computes with `decode(encode(latent))`."""

    def __init__(self, encode: Callable[[Tensor], Encoded]) -> None:
        super().__init__()
        self.encode = encode

    def forward(self, latent: Tensor) -> Tensor:
        return _StraightThrough.apply(latent, self.encode)


def fake_quantize(
    model: Transformer, bits: int = 4, group: int = 32, lm_head: str = "int8", embeddings: str = "fp32"
) -> list[str]:
    """Make `model` compute with the weights `Quantize(bits, group, lm_head, embeddings)` (round to nearest)
    would store, on exactly the tensors it quantizes; returns their names. The latent weights stay the
    parameters (`latent_key` names them as in a plain model), so quantizing them afterwards by round to nearest
    stores what was trained."""
    step = Quantize(bits, group, lm_head, embeddings)
    encoders: dict[str, Callable[[Tensor], Encoded]] = {
        name: partial(step.encode, in_dim=in_dim, bits=b) for name, b, in_dim in step.targets(model)
    }
    if embeddings == "bf16":
        if model.config.tie_embeddings:  # the LM head would keep computing with the latent table
            raise ValueError("fake quantization of bf16 embeddings needs untied embeddings")
        encoders["embed_tokens.weight"] = partial(storage.encode_half, dtype=torch.bfloat16)
    for name, encode in encoders.items():
        module, _, attr = name.rpartition(".")
        parametrize.register_parametrization(model.get_submodule(module), attr, FakeQuantized(encode))
    return list(encoders)


_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def latent_key(key: str) -> str:
    """The plain state-dict key of a parametrized tensor's latent value (`lm_head.parametrizations.weight.original`
    -> `lm_head.weight`); other keys unchanged."""
    return _PARAMETRIZED.sub(r"\1\2", key)
