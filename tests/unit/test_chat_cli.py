"""`stagelm-chat` driven through stdin: several turns, /reset, /exit, tool execution."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stagelm.checkpoint import atomic_torch_save, stagelm_metadata
from stagelm.cli.chat import ChatSession
from stagelm.model import Transformer
from stagelm.tokenizer import CharTokenizer
from stagelm.tools import calculator, run_tool_call
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = CharTokenizer.train(["hello world"])
    cfg = tiny_model_config(vocab_size=tokenizer.vocab_size, top_k=1, max_seq_len=512, init_std=0.02)
    torch.manual_seed(0)
    model = Transformer(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "sft.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, "stagelm": stagelm_metadata(cfg, tokenizer, "sft")}, path)
    return path


def test_multi_turn_chat_through_stdin(checkpoint: Path, tmp_path: Path) -> None:
    script = "hello\nhow are you?\n/reset\nhi again\n/exit\nnever read\n"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stagelm.cli.chat",
            f"ckpt={checkpoint}",
            "max_new_tokens=6",
            "greedy=true",
            "system=Be brief.",
        ],
        input=script,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("stagelm chat (sft checkpoint)")
    replies = [line for line in lines if line.startswith("assistant> ")]
    assert len(replies) == 3  # the line after /exit is never answered
    assert "(conversation reset)" in result.stdout
    # greedy and reset: the first turn of a fresh conversation gets the same reply whatever came before
    assert not list(tmp_path.iterdir())  # no outputs/ folder


def test_session_keeps_history_and_reset_clears_it(checkpoint: Path) -> None:
    from stagelm.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    session = ChatSession(loaded.model, loaded.tokenizer, "Be brief.", True, 5, {"greedy": True, "seed": 0})
    first = session.reply("hello", write=lambda s: None)
    session.reply("more", write=lambda s: None)
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    assert session.reply("hello", write=lambda s: None) == first


def test_calculator_tool() -> None:
    assert calculator("4821 * 37") == "178377"
    assert calculator("(12 + 7) * 3 - 5") == "52"
    assert calculator("__import__('os')").startswith("error: ")
    call = {
        "id": "call_0",
        "type": "function",
        "function": {"name": "calculator", "arguments": '{"expression": "2*3"}'},
    }
    assert run_tool_call(call) == "6"
    assert run_tool_call({"function": {"name": "search", "arguments": "{}"}}).startswith("error: unknown tool")
