"""Shared fixtures: composing the real Hydra configs in-process, and running the real CLIs in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from stagelm.model import ModelConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "src" / "stagelm" / "conf"
SHARED_DATA = Path(os.environ.get("STAGELM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_train(tmp_path: Path, *overrides: str) -> DictConfig:
    """The resolved `train` config with outputs and caches under tmp_path and no logger unless overridden."""
    from stagelm.config import register_resolvers

    register_resolvers()
    base = [f"paths.log_dir={tmp_path}/logs", f"paths.cache_dir={tmp_path}/cache"]
    if not any(o.startswith("logger=") for o in overrides):
        base.append("logger=none")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=base + list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def tiny_model_config(**overrides: Any) -> ModelConfig:
    """The unit tests' model: GQA (4 query heads on 2 kv heads) and one dense + one MoE layer; a wider init than the
    default 0.02 gives peaked next-token distributions, so sampling, greedy and filtering are told apart."""
    values: dict[str, Any] = dict(
        vocab_size=32,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=32,
        d_ff_dense=64,
        n_experts=4,
        top_k=2,
        moe_every=2,
        max_seq_len=64,
        init_std=0.1,
    )
    values.update(overrides)
    return ModelConfig(**values)


def run_cli(module: str, *args: str, cwd: Path, timeout: int = 600, env: dict | None = None):
    """Run `python -m stagelm.cli.<module> args...` the way a user would, capturing output."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", f"stagelm.cli.{module}", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def shakespeare() -> Path:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present (only on development machines)")
    return path


# --- small-model checkpoints on the built-in world, trained once per test session (learning tests only) ---------
# The stage configs' defaults are the recipe: the same commands a user runs, and the pipeline runs.
# STAGELM_SMALL_CKPTS=DIR reuses checkpoints made by those commands (DIR/{pretrain,sft,reward}_small.ckpt) instead
# of training them again: about 11 minutes saved when iterating on a later stage.
SMALL_CKPTS = os.environ.get("STAGELM_SMALL_CKPTS")


def _reused(stage: str) -> Path | None:
    if not SMALL_CKPTS:
        return None
    path = Path(SMALL_CKPTS) / f"{stage}_small.ckpt"
    if not path.is_file():
        pytest.fail(f"STAGELM_SMALL_CKPTS is set but {path} does not exist")
    return path


def _small_checkpoint(factory: pytest.TempPathFactory, stage: str, *overrides: str) -> Path:
    if reused := _reused(stage):
        return reused
    from stagelm.cli.train import train

    tmp = factory.mktemp(f"small_{stage}")
    train(compose_train(tmp, f"stage={stage}", *overrides))
    return tmp / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def small_pretrain_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _small_checkpoint(tmp_path_factory, "pretrain", "model=small")


@pytest.fixture(scope="session")
def small_sft_checkpoint(tmp_path_factory: pytest.TempPathFactory, small_pretrain_checkpoint: Path) -> Path:
    return _small_checkpoint(tmp_path_factory, "sft", f"init_from={small_pretrain_checkpoint}")


@pytest.fixture(scope="session")
def small_reward_checkpoint(tmp_path_factory: pytest.TempPathFactory, small_sft_checkpoint: Path) -> Path:
    return _small_checkpoint(tmp_path_factory, "reward", f"init_from={small_sft_checkpoint}")


# --- a tiny chat model that has memorised two calculator round trips (seconds to train; for the server's tests) ----
TOOL_CONVERSATIONS = [(4821, "*", 37, 178377), (1234, "+", 4321, 5555)]


def tool_conversation(a: int, op: str, b: int, result: int) -> list[dict[str, Any]]:
    """The round trip the tiny tool model has learnt: question, calculator call, tool result, answer."""
    import json

    expression = f"{a} {op} {b}"
    arguments = json.dumps({"expression": expression})
    call = {"id": "call_0", "type": "function", "function": {"name": "calculator", "arguments": arguments}}
    return [
        {"role": "user", "content": f"What is {expression}?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": str(result)},
        {"role": "assistant", "content": f"{expression} = {result}."},
    ]


@pytest.fixture(scope="session")
def tiny_tool_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An "sft" checkpoint of a tiny model trained (150 full-batch steps, ~4 s) until it reproduces both
    conversations of TOOL_CONVERSATIONS greedily, given the calculator tool: a real model that really calls the
    tool, small enough for the fast tier (the small SFT checkpoint is the slow tier's)."""
    import torch

    from stagelm.chat import render, render_for_training
    from stagelm.checkpoint import atomic_torch_save, stagelm_metadata
    from stagelm.model import Transformer
    from stagelm.tokenizer import CharTokenizer
    from stagelm.tools import CALCULATOR_SCHEMA

    conversations = [tool_conversation(*c) for c in TOOL_CONVERSATIONS]
    tools = [CALCULATOR_SCHEMA]
    tokenizer = CharTokenizer.train(render(c, tools=tools) for c in conversations)
    config = tiny_model_config(
        vocab_size=tokenizer.vocab_size, d_model=64, d_ff=64, d_ff_dense=128, top_k=1, max_seq_len=512, init_std=0.02
    )
    torch.manual_seed(0)
    model = Transformer(config)
    examples = [render_for_training(tokenizer, c, tools=tools) for c in conversations]
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), tokenizer.pad_id)
    loss_mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        loss_mask[i, : len(e.input_ids)] = torch.tensor(e.loss_mask)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    targets, target_mask = ids[:, 1:], loss_mask[:, 1:]
    for _ in range(150):
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits[target_mask], targets[target_mask])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"the tiny tool model did not learn its conversations (loss {loss.item():.3f})"
    path = tmp_path_factory.mktemp("tool_model") / "sft.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, "stagelm": stagelm_metadata(config, tokenizer, "sft")}, path)
    return path


def run_main_in_process(main, *args: str, cwd: Path):
    """Run a Hydra CLI's `main()` in this process (no interpreter start-up: ~10x faster than a subprocess) and
    return what a subprocess would: returncode, stdout, stderr."""
    import contextlib
    import io
    from types import SimpleNamespace

    out, err, code = io.StringIO(), io.StringIO(), 0
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    sys.argv = ["stagelm", *args]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
