"""The SFT chat model holds up (slow): on held-out built-in conversations it calls tools exactly when the world says
a turn needs one, with the right arguments, uses their results exactly, and answers later turns about as well as
the same questions asked alone; `stagelm-chat` and `stagelm-generate` show it on a scripted conversation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stagelm.chat_metrics import chat_behaviour_metrics
from stagelm.checkpoint import load_checkpoint
from stagelm.data.instruct import builtin_conversations
from stagelm.evaluation import generate_replies
from tests.conftest import run_cli


@pytest.mark.slow
def test_chat_behaviour_targets(small_sft_checkpoint: Path) -> None:
    loaded = load_checkpoint(small_sft_checkpoint)
    conversations = builtin_conversations("val", 300, seed=0)[:200]
    replies = generate_replies(
        loaded.model, loaded.tokenizer, [c.prompt for c in conversations], [c.tools for c in conversations]
    )
    metrics = chat_behaviour_metrics(loaded.model, loaded.tokenizer, conversations, replies)
    print(f"\nheld-out chat behaviour: {metrics}")
    assert metrics["val/tool_decision"] >= 0.95
    assert metrics["val/tool_args_exact"] >= 0.95
    assert metrics["val/tool_result_used"] >= 0.98
    assert metrics["val/exact_match_turn2plus"] >= metrics["val/exact_match_turn2plus_alone"] - 0.05


@pytest.mark.slow
def test_scripted_chat_session_and_generate(small_sft_checkpoint: Path, tmp_path: Path) -> None:
    script = "What is 23 + 48?\nNow subtract 7 from that.\nWhat is 4821 * 37?\n/exit\n"
    result = subprocess.run(
        [sys.executable, "-m", "stagelm.cli.chat", f"ckpt={small_sft_checkpoint}", "greedy=true"],
        input=script,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    replies = result.stdout.split("assistant> ")[1:]
    assert len(replies) == 3, result.stdout
    assert "71" in replies[0] and "64" in replies[1], result.stdout  # the follow-up refers back
    assert '[calculator {"expression": "4821 * 37"} -> 178377]' in replies[2], result.stdout
    assert "178377." in replies[2].rsplit("]", 1)[-1], result.stdout  # the answer carries the result

    follow_up = [
        {"role": "user", "content": "What is 23 + 48?"},
        {"role": "assistant", "content": "23 + 48 = 71."},
        {"role": "user", "content": "Now subtract 7 from that."},
    ]
    tool_question = [{"role": "user", "content": "What is 4821 * 37?"}]
    outputs = []
    for messages in (follow_up, tool_question):
        path = tmp_path / "messages.json"
        path.write_text(json.dumps(messages))
        done = run_cli("generate", f"ckpt={small_sft_checkpoint}", f"messages={path}", "greedy=true", "tools=true",
                       "max_new_tokens=80", cwd=tmp_path, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert "64" in outputs[0], outputs[0]
    assert 'calculator {"expression": "4821 * 37"}' in outputs[1], outputs[1]
