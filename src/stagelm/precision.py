"""Training precision `auto`: bf16 mixed precision where the hardware runs bf16 matmuls fast, fp32 elsewhere.

On a CPU, bf16 pays only with native bf16 instructions (AVX-512 BF16 or AMX, which oneDNN reports as
`_is_mkldnn_bf16_supported`); without them PyTorch falls back to a reference kernel. Measured on a 2-core AMD EPYC
VM whose hypervisor hides AVX-512 (PyTorch's CPU capability: AVX2): a 4096 x 128 x 512 bf16 matmul took 320 ms
against 6.5 ms in fp32, 49x slower, so `auto` must not pick bf16 there.

Even with native bf16, a CPU gains only where the matmuls are wide enough to outweigh autocast's casts. Measured on
a 2-core AMX VM (2026-12-03), 300 real steps each: the `small` model (d_model 128) pre-trains 1.25x faster in
bf16-mixed, but the `tiny` one (d_model 64) pre-trains at 0.97x fp32's tokens/s and runs SFT (variable widths)
at 0.78x (67 s against 52 s for 300 steps, equal val loss). So on a CPU `auto` picks bf16 from d_model 128 up.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("stagelm")

# on a CPU, narrower models train faster in fp32 (see above)
CPU_BF16_MIN_D_MODEL = 128


def runs_on_gpu(accelerator: str) -> bool:
    """Whether the Trainer's `accelerator` ("cpu", "gpu", "cuda" or "auto") puts training on a CUDA GPU here."""
    return accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()


def bf16_is_fast(accelerator: str) -> tuple[bool, str]:
    """Whether bf16 matmuls run natively on this accelerator ("cpu", "gpu", "cuda" or "auto"), and why."""
    if runs_on_gpu(accelerator):
        if torch.cuda.is_bf16_supported():
            return True, f"{torch.cuda.get_device_name()} supports bf16"
        return False, f"{torch.cuda.get_device_name()} has no native bf16"
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return True, "this CPU has native bf16 instructions (AVX-512 BF16 or AMX)"
    capability = torch.backends.cpu.get_cpu_capability()
    return False, f"this CPU has no native bf16 instructions (PyTorch sees {capability}); bf16 would be far slower"


def resolve_precision(precision: str | int, accelerator: str, d_model: int | None = None) -> str | int:
    """`auto` -> "bf16-mixed" where bf16 is fast for a model this wide, else "32-true" (logged with the reason);
    others pass through."""
    if str(precision) != "auto":
        return precision
    fast, why = bf16_is_fast(accelerator)
    if fast and not runs_on_gpu(accelerator) and d_model is not None and d_model < CPU_BF16_MIN_D_MODEL:
        fast, why = False, f"{why}, but at d_model {d_model} < {CPU_BF16_MIN_D_MODEL} fp32 trains faster on a CPU"
    chosen = "bf16-mixed" if fast else "32-true"
    log.info("trainer.precision=auto -> %s: %s", chosen, why)
    return chosen
