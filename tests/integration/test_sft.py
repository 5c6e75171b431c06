"""SFT through the real configs: the stage runs, changes the weights, logs its metrics, and its checkpoint
reloads; bad instruction data gives clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stagelm.checkpoint import load_checkpoint
from stagelm.cli.train import train
from stagelm.data.instruct import read_conversations
from stagelm.errors import DataError
from tests.conftest import compose_train

TINY_PRETRAIN = [
    "model=tiny",
    "data.builtin_chars=200000",
    "data.block_size=64",
    "data.batch_size=16",
    "stage.sample_prompts=[]",
    "trainer.max_steps=30",
    "trainer.val_check_interval=30",
]


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("pretrain")
    train(compose_train(tmp, *TINY_PRETRAIN))
    return tmp / "run" / "checkpoints" / "last.ckpt"


def test_sft_stage_runs_logs_and_reloads(tmp_path: Path, tiny_pretrained: Path) -> None:
    cfg = compose_train(
        tmp_path,
        "stage=sft",
        f"init_from={tiny_pretrained}",
        "trainer.max_steps=12",
        "trainer.val_check_interval=6",
        "data.builtin_train=500",
        "data.builtin_val=40",
        "data.eval_examples=16",
        "data.batch_size=8",
        "stage.eval_max_new_tokens=16",
    )
    metrics = train(cfg)
    for name in ("train/loss", "val/loss", "val/exact_match", "val/format_ok", "val/tool_decision"):
        assert name in metrics, sorted(metrics)
    assert 0.0 <= metrics["val/exact_match"] <= 1.0
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k.startswith(("val/tool_", "val/exact_match_turn")))
    before = load_checkpoint(tiny_pretrained)
    after = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert after.stage == "sft" and after.tokenizer.to_dict() == before.tokenizer.to_dict()
    changed = [k for k, v in after.model.state_dict().items() if not torch.equal(v, before.model.state_dict()[k])]
    assert len(changed) > 0.9 * len(before.model.state_dict())
    assert "--- step 12 ---" in (tmp_path / "run" / "val_conversations.txt").read_text()


def test_sft_reads_user_jsonl_in_all_formats(tmp_path: Path, tiny_pretrained: Path) -> None:
    rows = [
        {"prompt": "What is 2 + 2?", "completion": "2 + 2 = 4.", "answer": "4"},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
        {"instruction": "Add the numbers.", "input": "3 and 4", "output": "3 + 4 = 7.", "answer": 7},
    ] * 20
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    conversations = read_conversations(str(path))
    assert conversations[2].messages[0]["content"] == "Add the numbers.\n\n3 and 4"
    assert conversations[2].answer == "7"
    cfg = compose_train(
        tmp_path,
        "stage=sft",
        f"init_from={tiny_pretrained}",
        f"data.path={path}",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "data.batch_size=4",
    )
    assert "val/exact_match" in train(cfg)


def test_malformed_instruction_records_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"question": "no reply"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: unrecognised record"):
        read_conversations(str(path))
    path.write_text('{"messages": [{"role": "user", "content": "only a question"}]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: the conversation has no assistant turn"):
        read_conversations(str(path))


def test_sft_without_init_from_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="init_from"):
        train(compose_train(tmp_path, "stage=sft"))
