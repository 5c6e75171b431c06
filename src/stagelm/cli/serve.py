"""`stagelm-serve ckpt=PATH`: serve checkpoints over HTTP with an OpenAI- and Ollama-compatible API.

Routes: /v1/chat/completions, /v1/completions, /v1/models, /api/chat, /api/generate, /api/tags, /health, /metrics,
the chat page at /, and the API's documentation at /docs (/openapi.json). Settings are in `conf/serve.yaml`: the
address (127.0.0.1:8000), the API key, how many sequences are decoded together and how many may wait, and the
default sampling. User errors (no checkpoint, an unreadable one) print one `error: ...` line and exit with 2.
"""

from __future__ import annotations

import logging
import sys

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from stagelm.errors import ConfigError, StagelmError
from stagelm.serve.registry import ServingLimits, load_models


def limits_from(cfg: DictConfig) -> ServingLimits:
    limits = ServingLimits(
        max_running=int(cfg.max_running),
        max_waiting=int(cfg.max_waiting),
        temperature=float(cfg.temperature),
        top_p=None if cfg.top_p is None else float(cfg.top_p),
        top_k=None if cfg.top_k is None else int(cfg.top_k),
        max_tokens=int(cfg.max_tokens),
    )
    if limits.max_running < 1 or limits.max_waiting < 0 or limits.max_tokens < 1:
        raise ConfigError("max_running and max_tokens must be >= 1 and max_waiting >= 0")
    return limits


def run(cfg: DictConfig) -> None:
    import uvicorn

    from stagelm.serve.app import create_app

    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    models = OmegaConf.to_container(cfg.models) if cfg.models else {}
    served = load_models(cfg.ckpt, models, limits_from(cfg), device=str(cfg.device))
    app = create_app(served, api_key=None if cfg.api_key is None else str(cfg.api_key))
    names = ", ".join(served)
    print(f"stagelm serving {names} on http://{cfg.host}:{cfg.port} (chat page at /, API docs at /docs)", flush=True)
    uvicorn.run(app, host=str(cfg.host), port=int(cfg.port), log_level=str(cfg.log_level))


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def _hydra_main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(cfg)
    except StagelmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
