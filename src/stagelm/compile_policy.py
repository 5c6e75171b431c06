"""`compile=auto`: `torch.compile` the backbone for a training run only where it was measured to pay.

A compiled training step fuses the elementwise work around the matmuls, but its cold compile costs 40 s on a 2-core
CPU (6 s from inductor's on-disk cache in a later run), and every new batch shape compiles again. Measured on a
2-core AMX VM (2026-12-03), `stagelm-train stage=pretrain` with the `small` model in bf16-mixed: 32.8k tokens/s
compiled against 26.2k eager (fp32 eager: 19.7k): 7.7 us saved a token, so a cold compile pays for itself after
about 5M training tokens (the default 1,500 steps of 32 x 128 are 6.1M). Hence `auto` compiles where
- the stage's batches keep one shape (`StageFacts.static_shapes`: pre-training's fixed blocks; SFT's batches are
  as wide as their longest conversation, and would recompile),
- the run is long enough: `trainer.max_steps` x tokens a step >= COMPILE_MIN_TOKENS, or no step limit,
- and the run is on a CPU, where it was measured (on a GPU, `compile=true` says so explicitly).
"""

from __future__ import annotations

import logging

from stagelm.errors import ConfigError
from stagelm.precision import runs_on_gpu
from stagelm.stages.facts import STAGES

log = logging.getLogger("stagelm")

# break-even of a cold compile against the measured saving per token (see above)
COMPILE_MIN_TOKENS = 5_000_000


def resolve_compile(value: bool | str, stage: str, max_steps: int, tokens_per_step: int, accelerator: str) -> bool:
    """`auto` -> whether to compile this stage's training run of max_steps (-1: no limit) steps of tokens_per_step
    tokens (logged with the reason); booleans pass through."""
    if str(value) != "auto":
        if not isinstance(value, bool):
            raise ConfigError(f"compile={value!r}: expected true, false or auto")
        return value
    facts = STAGES.get(stage)
    if runs_on_gpu(accelerator):
        chosen, why = False, "measured on CPUs only; set compile=true to compile on a GPU"
    elif facts is None or not facts.static_shapes:
        chosen, why = False, f"the {stage} stage's batches change shape, and each new shape compiles again"
    elif 0 <= max_steps * tokens_per_step < COMPILE_MIN_TOKENS:
        tokens = max_steps * tokens_per_step
        chosen, why = False, f"{tokens:,} training tokens < {COMPILE_MIN_TOKENS:,}: the cold compile would not pay"
    else:
        chosen, why = True, f"one batch shape over a long run (>= {COMPILE_MIN_TOKENS:,} training tokens)"
    log.info("compile=auto -> %s: %s", str(chosen).lower(), why)
    return chosen
