"""The server's test fixtures: a served tiny model, in-process (ASGI) or on a free local port (uvicorn in a
thread), for the real `openai` and `ollama` clients and a real browser."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from stagelm.checkpoint import atomic_torch_save, stagelm_metadata
from stagelm.model import Transformer
from stagelm.serve.registry import ServingLimits, load_models
from stagelm.tokenizer import CharTokenizer
from tests.conftest import tiny_model_config

# The server's modules need the serve extra and its test modules skip without it; fastapi is imported lazily
# here, so the engine's and the conversation layer's tests run either way.


@contextmanager
def live_server(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def random_checkpoint(path: Path, max_seq_len: int = 128, stage: str = "sft") -> Path:
    """An untrained tiny model (random weights) with a character tokenizer, saved as a stagelm checkpoint."""
    tokenizer = CharTokenizer.train(["hello world"])
    config = tiny_model_config(vocab_size=tokenizer.vocab_size, top_k=1, max_seq_len=max_seq_len, init_std=0.1)
    torch.manual_seed(0)
    model = Transformer(config)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, "stagelm": stagelm_metadata(config, tokenizer, stage)}, path)
    return path


@pytest.fixture(scope="session")
def random_tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("random_tiny") / "sft.ckpt", max_seq_len=256)


def make_app(ckpt: Path, api_key: str | None = None, **limits):
    from stagelm.serve.app import create_app

    served = load_models(str(ckpt), None, ServingLimits(**limits))
    return create_app(served, api_key=api_key)


@pytest.fixture(scope="module")
def tool_server(tiny_tool_checkpoint: Path) -> Iterator[str]:
    """The tiny tool-calling model on a local port, greedy by default, no API key."""
    with live_server(make_app(tiny_tool_checkpoint, temperature=0.0, max_running=4, max_waiting=8)) as url:
        yield url
