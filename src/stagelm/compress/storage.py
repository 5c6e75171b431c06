"""Compact encodings of weight tensors in a checkpoint, and their exact decoding at load time.

A compressed checkpoint stores some tensors of its state dict encoded instead of as fp32:

- `int8`: symmetric per-output-channel codes in [-127, 127] and one fp32 scale per output channel;
  `|w - decode(w)| <= scale / 2` elementwise.
- `int4`: symmetric group-wise codes in [-8, 7] over groups of `group` consecutive inputs, two codes per byte,
  one fp16 scale per group; `|w - decode(w)| <= scale / 2` elementwise.
- `sparse`: a bit mask of the nonzero entries (1 bit per weight) and the nonzero values: magnitude pruning only
  saves bytes when stored this way (a dense tensor full of zeros is as big as before).
- `lowrank`: `W = A @ B` stored as its two factors, each encoded in turn (fp32, int8 or int4).
- `half`: fp16 or bf16 storage of an fp32 tensor.

Weights are decoded to dense fp32 when the checkpoint is loaded, so every command (generate, chat, serve,
export, training) runs the ordinary eager model: storage is smaller, but the in-memory model and its kernels
are the dense ones (no speed-up from sparsity or low rank, none lost to dequantizing on every step).

"Input dimension" below is the dimension a weight is multiplied along: the last one of an `nn.Linear` weight
`[out, in]`, the middle one of the MoE experts' `[E, in, out]` (they compute `x @ W`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

SEPARATOR = "#"  # between a tensor's state-dict key and the names of its encoded parts


@dataclass
class Encoded:
    """One tensor in a compact form: `tensors` holds the stored arrays, `meta` what decoding needs (JSON-able),
    `parts` the encoded factors of a `lowrank` tensor."""

    kind: str
    shape: tuple[int, ...]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, Encoded] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) + sum(
            p.nbytes() for p in self.parts.values()
        )


def _move_in_dim_last(w: Tensor, in_dim: int) -> Tensor:
    return w.movedim(in_dim, -1)


def encode_int8(w: Tensor, in_dim: int = -1) -> Encoded:
    """Symmetric int8, one scale per output channel (the max |w| over the input dimension maps to 127)."""
    x = _move_in_dim_last(w.detach().float(), in_dim)
    scale = (x.abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-12)  # [..., 1]
    codes = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return Encoded("int8", tuple(w.shape), {"codes": codes, "scale": scale}, {"in_dim": in_dim})


def _decode_int8(e: Encoded) -> Tensor:
    return (e.tensors["codes"].float() * e.tensors["scale"]).movedim(-1, e.meta["in_dim"])


def int4_scale(amax: Tensor) -> Tensor:
    """The fp16 scale of each group, rounded up so that amax / scale <= 7 still holds after the fp16 rounding."""
    exact = (amax / 7.0).clamp_min(2**-14)  # fp16's smallest normal number: tiny groups lose nothing that matters
    half = exact.half()
    return torch.where(half.float() < exact, torch.nextafter(half, torch.tensor(torch.inf, dtype=half.dtype)), half)


def encode_int4(w: Tensor, group: int = 32, in_dim: int = -1, scale: Tensor | None = None) -> Encoded:
    """Symmetric int4 over groups of `group` inputs; the input dimension must divide by `group` (and be even).
    `scale` [..., G, 1] (fp16, inputs last) gives the groups' scales instead of each group's amax / 7, for
    values already on that grid (GPTQ chooses its scales before the values)."""
    x = _move_in_dim_last(w.detach().float(), in_dim)
    n_in = x.shape[-1]
    if n_in % group or group % 2:
        raise ValueError(f"int4: input dimension {n_in} is not a multiple of the (even) group size {group}")
    grouped = x.reshape(*x.shape[:-1], n_in // group, group)  # [..., G, group]
    if scale is None:
        scale = int4_scale(grouped.abs().amax(-1, keepdim=True))  # [..., G, 1] fp16
    codes = torch.round(grouped / scale.float()).clamp(-8, 7).to(torch.int16) + 8  # 0..15
    codes = codes.reshape(*x.shape[:-1], n_in).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # two codes per byte: even index in the low nibble
    return Encoded("int4", tuple(w.shape), {"packed": packed, "scale": scale}, {"in_dim": in_dim, "group": group})


def _decode_int4(e: Encoded) -> Tensor:
    packed = e.tensors["packed"]
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).to(torch.int16) - 8  # [..., in]
    group = e.meta["group"]
    grouped = codes.reshape(*codes.shape[:-1], -1, group).float() * e.tensors["scale"].float()
    return grouped.flatten(-2).movedim(-1, e.meta["in_dim"])


def encode_sparse(w: Tensor, value_dtype: torch.dtype = torch.float32) -> Encoded:
    """A 1-bit-per-entry mask of the nonzeros plus their values in row-major order."""
    flat = w.detach().reshape(-1)
    mask = flat != 0
    pad = (-mask.numel()) % 8
    bits = torch.cat([mask, mask.new_zeros(pad)]).reshape(-1, 8).to(torch.uint8)
    weights = (2 ** torch.arange(8, dtype=torch.uint8))[None]
    packed = (bits * weights).sum(-1, dtype=torch.uint8)
    values = flat[mask].to(value_dtype)
    return Encoded("sparse", tuple(w.shape), {"mask": packed, "values": values})


def _decode_sparse(e: Encoded) -> Tensor:
    packed = e.tensors["mask"]
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8)[None]) & 1
    n = 1
    for s in e.shape:
        n *= s
    mask = bits.reshape(-1)[:n].bool()
    out = torch.zeros(n, dtype=torch.float32)
    out[mask] = e.tensors["values"].float()
    return out.reshape(e.shape)


def encode_half(w: Tensor, dtype: torch.dtype = torch.bfloat16) -> Encoded:
    return Encoded("half", tuple(w.shape), {"values": w.detach().to(dtype)})


def encode_lowrank(a: Tensor, b: Tensor) -> Encoded:
    """`W = a @ b` (a [out, r], b [r, in]), both factors fp32 until a later step encodes them."""
    shape = (a.shape[0], b.shape[1])
    return Encoded("lowrank", shape, meta={"rank": a.shape[1]}, parts={"a": dense(a), "b": dense(b)})


def dense(w: Tensor) -> Encoded:
    return Encoded("dense", tuple(w.shape), {"values": w.detach().float().clone()})


def decode(e: Encoded) -> Tensor:
    """The dense fp32 tensor an encoding stands for."""
    if e.kind == "dense":
        return e.tensors["values"].float()
    if e.kind == "half":
        return e.tensors["values"].float()
    if e.kind == "int8":
        return _decode_int8(e)
    if e.kind == "int4":
        return _decode_int4(e)
    if e.kind == "sparse":
        return _decode_sparse(e)
    if e.kind == "lowrank":
        return decode(e.parts["a"]) @ decode(e.parts["b"])
    raise ValueError(f"unknown weight encoding {e.kind!r}")


# --- in a checkpoint: flattened into the state dict, described in checkpoint["stagelm"]["storage"] ---------------


def describe(e: Encoded) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": e.kind, "shape": list(e.shape), **e.meta}
    if e.parts:
        out["parts"] = {name: describe(p) for name, p in e.parts.items()}
    return out


def flatten(key: str, e: Encoded) -> dict[str, Tensor]:
    out = {f"{key}{SEPARATOR}{name}": t for name, t in e.tensors.items()}
    for name, part in e.parts.items():
        out.update(flatten(f"{key}{SEPARATOR}{name}", part))
    return out


def _rebuild(key: str, desc: dict[str, Any], state: dict[str, Tensor]) -> Encoded:
    meta = {k: v for k, v in desc.items() if k not in ("kind", "shape", "parts")}
    prefix = f"{key}{SEPARATOR}"
    parts = {name: _rebuild(prefix + name, d, state) for name, d in desc.get("parts", {}).items()}
    tensors = {
        k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and SEPARATOR not in k[len(prefix) :]
    }
    return Encoded(desc["kind"], tuple(desc["shape"]), tensors, meta, parts)


def encode_state(state: dict[str, Tensor], encodings: dict[str, Encoded]) -> tuple[dict[str, Tensor], dict]:
    """The state dict to save (encoded tensors flattened under `key#part`) and its storage description."""
    out = {k: v for k, v in state.items() if k not in encodings}
    for key, e in encodings.items():
        out.update(flatten(key, e))
    return out, {key: describe(e) for key, e in encodings.items()}


def decode_state(state: dict[str, Tensor], storage: dict[str, dict[str, Any]]) -> dict[str, Tensor]:
    """The plain state dict of a checkpoint saved by `encode_state`: every encoded tensor decoded to fp32."""
    if not storage:
        return state
    out = {k: v for k, v in state.items() if SEPARATOR not in k}
    for key, desc in storage.items():
        out[key] = decode(_rebuild(key, desc, state))
    return out


def tensor_bytes(state: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
