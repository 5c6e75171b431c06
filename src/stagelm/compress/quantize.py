"""Weight-only quantization, int8 per output channel or int4 group-wise, of every weight matrix and every
routed expert (steps `int8`, `int4`)."""

from __future__ import annotations

import torch
from torch import Tensor

from stagelm.compress import storage
from stagelm.compress.base import Calibration, Compression, magnitude_targets
from stagelm.compress.storage import Encoded


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
