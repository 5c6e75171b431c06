"""The models a server serves: each checkpoint loaded once, with its tokenizer and its own decode engine, under
a name (by default `stagelm-<stage>`, from the stage that wrote the checkpoint)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stagelm.checkpoint import load_checkpoint
from stagelm.errors import ConfigError
from stagelm.model import Transformer
from stagelm.serve.engine import Engine
from stagelm.tokenizer import Tokenizer


@dataclass
class ServingLimits:
    """How much one model's engine holds at once, and the sampling used when a request does not say."""

    max_running: int = 8
    max_waiting: int = 16
    temperature: float = 0.7
    top_p: float | None = 0.95
    top_k: int | None = None
    max_tokens: int = 256


@dataclass
class ServedModel:
    name: str
    model: Transformer
    tokenizer: Tokenizer
    engine: Engine
    stage: str
    path: str
    limits: ServingLimits
    created: int = field(default_factory=lambda: int(time.time()))
    size_bytes: int = 0
    digest: str = ""

    @property
    def context_length(self) -> int:
        return self.model.config.max_seq_len


def default_model_name(stage: str) -> str:
    return f"stagelm-{stage}"


def serve_model(
    name: str,
    model: Transformer,
    tokenizer: Tokenizer,
    stage: str,
    limits: ServingLimits,
    path: str = "",
) -> ServedModel:
    """Wrap a loaded model with a started engine."""
    engine = Engine(model, limits.max_running, limits.max_waiting).start()
    size = os.path.getsize(path) if path and os.path.isfile(path) else 0
    digest = hashlib.sha256(f"{name}:{path}:{size}".encode()).hexdigest()
    return ServedModel(name, model, tokenizer, engine, stage, path, limits, size_bytes=size, digest=digest)


def load_models(
    ckpt: str | None, models: Mapping[str, str] | None, limits: ServingLimits, device: str = "cpu"
) -> dict[str, ServedModel]:
    """Load `ckpt` (named after its stage) and every `models` entry (name -> path); ConfigError if none or if
    two share a name."""
    wanted: list[tuple[str | None, str]] = [(None, ckpt)] if ckpt else []
    wanted += [(str(name), str(path)) for name, path in (models or {}).items()]
    if not wanted:
        raise ConfigError("nothing to serve: pass ckpt=PATH or models={name: PATH}")
    served: dict[str, ServedModel] = {}
    for name, path in wanted:
        loaded = load_checkpoint(path, map_location=device)
        model = loaded.model.to(torch.device(device)).eval()
        name = name or default_model_name(loaded.stage)
        if name in served:
            raise ConfigError(f"two checkpoints would be served as {name!r}; name them with models={{name: PATH}}")
        served[name] = serve_model(name, model, loaded.tokenizer, loaded.stage, limits, str(Path(path)))
    return served
