"""`stagelm-generate` end to end: a checkpoint written the way stages write one, the CLI run as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stagelm.checkpoint import atomic_torch_save, stagelm_metadata
from stagelm.generation import complete
from stagelm.model import Transformer
from stagelm.tokenizer import CharTokenizer
from tests.conftest import run_main_in_process, tiny_model_config


def run_cli(cwd: Path, *overrides: str):
    """In-process: fast, and exercises the same Hydra entry point; one test below uses a real subprocess."""
    from stagelm.cli.generate import main

    return run_main_in_process(main, *overrides, cwd=cwd)


def run_subprocess(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from stagelm.cli.generate import main; main()", *overrides]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Transformer, CharTokenizer]:
    tokenizer = CharTokenizer.train(["hello world"])
    cfg = tiny_model_config(vocab_size=tokenizer.vocab_size, init_std=0.02)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    state = {"model." + k: v for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, "stagelm": stagelm_metadata(cfg, tokenizer, "pretrain")}, path)
    return path, model, tokenizer


def test_greedy_completion(checkpoint, tmp_path: Path) -> None:
    path, model, tokenizer = checkpoint
    result = run_subprocess(tmp_path, f"ckpt={path}", "prompt=hello", "max_new_tokens=5", "greedy=true")
    assert result.returncode == 0, result.stderr
    expected = "hello" + complete(model, tokenizer, ["hello"], 5, greedy=True)[0]
    assert result.stdout == expected + "\n"
    assert result.stdout.startswith("hello") and len(result.stdout.rstrip("\n")) <= len("hello") + 5
    assert list(tmp_path.iterdir()) == []  # Hydra wrote no outputs/ folder and no logs


def test_sampling_with_seed_and_several_samples(checkpoint, tmp_path: Path) -> None:
    path, model, tokenizer = checkpoint
    args = (f"ckpt={path}", "prompt=hello world", "max_new_tokens=8", "num_samples=3", "seed=4", "top_k=10")
    result = run_cli(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- sample") == 3
    # seeded, so the in-process sampler reproduces the subprocess's samples exactly
    expected = complete(model, tokenizer, ["hello world"] * 3, 8, seed=4, top_k=10, temperature=0.8)
    blocks = [b.split("\n", 1)[1].rstrip("\n") for b in result.stdout.split("--- sample")[1:]]
    assert blocks == ["hello world" + text for text in expected]


def test_missing_checkpoint(tmp_path: Path) -> None:
    result = run_cli(tmp_path, f"ckpt={tmp_path / 'nope.ckpt'}", "prompt=hi")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_unreadable_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    result = run_cli(tmp_path, f"ckpt={bad}")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_no_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "prompt=hi")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "ckpt=" in result.stderr


def test_chat_messages_input_prints_the_assistant_reply(checkpoint, tmp_path: Path) -> None:
    from stagelm.evaluation import generate_replies

    path, model, tokenizer = checkpoint
    messages = [{"role": "user", "content": "hello"}]
    expected = generate_replies(model, tokenizer, [messages], max_new_tokens=8)[0].split("<|end|>")[0]
    inline = run_cli(
        tmp_path, f"ckpt={path}", "messages=[{role: user, content: hello}]", "max_new_tokens=8", "greedy=true"
    )
    assert inline.returncode == 0, inline.stderr
    assert inline.stdout.rstrip("\n") == expected
    (tmp_path / "chat.json").write_text('[{"role": "user", "content": "hello"}]')
    from_file = run_cli(tmp_path, f"ckpt={path}", "messages=chat.json", "max_new_tokens=8", "greedy=true")
    assert from_file.stdout == inline.stdout
    bad = run_cli(tmp_path, f"ckpt={path}", "messages=[{role: robot, content: hi}]")
    assert bad.returncode == 2 and "unknown role 'robot'" in bad.stderr


def test_max_new_tokens_clipped_to_max_seq_len(checkpoint, tmp_path: Path) -> None:
    path = checkpoint[0]
    result = run_cli(tmp_path, f"ckpt={path}", "prompt=hello", "max_new_tokens=500", "greedy=true")
    assert result.returncode == 0, result.stderr
    assert "clipped to 58" in result.stderr  # 64 - (BOS + 5 characters)
    assert len(result.stdout.rstrip("\n")) <= 64
