"""Prompt-only data for PPO: every record format, the dropped final assistant turn, clear errors, built-in prompts
without tool use, and batches of unpadded prompt ids that end with the assistant role token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagelm.chat import render
from stagelm.data.prompts import PromptDataModule, builtin_prompts, read_prompts
from stagelm.errors import DataError
from stagelm.tokenizer import ASSISTANT, CharTokenizer


def write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def tokenizer() -> CharTokenizer:
    return CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-=?.,"])


def test_every_record_format(tmp_path: Path) -> None:
    rows = [
        {"prompt": "What is 2 + 3?", "answer": 5},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]},
        {"messages": [{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "1 + 2 = 3."}]},
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ],
            "family": "chat",
        },
    ]
    prompts = read_prompts(str(write(tmp_path / "p.jsonl", rows)))
    assert prompts[0].messages == [{"role": "user", "content": "What is 2 + 3?"}] and prompts[0].answer == "5"
    assert [m["role"] for m in prompts[1].messages] == ["system", "user"]
    # the final assistant turn is the answer, not part of the prompt
    assert prompts[2].messages == [{"role": "user", "content": "Add 1 and 2."}]
    assert len(prompts[3].messages) == 3 and prompts[3].family == "chat"
    assert prompts[0].as_record() == {"messages": prompts[0].messages, "answer": "5"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question": "x"}', r"p\.jsonl:2: unrecognised record with keys \['question'\]"),
        ('{"prompt": 3}', r"p\.jsonl:2: 'prompt' must be a string or a non-empty list of messages"),
        ('{"messages": []}', r"p\.jsonl:2: 'messages' must be"),
        ('{"messages": [{"role": "assistant", "content": "only a reply"}]}', r"p\.jsonl:2: nothing left to prompt"),
        ('{"prompt": "x", "tools": "calculator"}', r"p\.jsonl:2: 'tools' must be a list"),
        ('{"prompt": "x"', r"p\.jsonl:2: malformed JSON"),
        ("[1, 2]", r"p\.jsonl:2: expected a JSON object"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path / "p.jsonl", [{"prompt": "fine"}, line])
    with pytest.raises(DataError, match=message):
        read_prompts(str(path))


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_prompts(str(tmp_path / "empty.jsonl"))


def test_builtin_prompts_are_user_turns_without_tools_and_val_is_held_out() -> None:
    train, val = builtin_prompts("train", 300, seed=0), builtin_prompts("val", 100, seed=0)
    for p in train + val:
        assert p.tools is None and p.family != "tool"
        assert [m["role"] for m in p.messages] == ["user"] and p.answer is not None
    assert not {p.messages[0]["content"] for p in train} & {p.messages[0]["content"] for p in val}


def test_datamodule_batches_and_splits(tmp_path: Path, tokenizer: CharTokenizer) -> None:
    rows = [{"prompt": f"What is {i} + 1?", "answer": i + 1} for i in range(40)] + [{"prompt": "x" * 500}]
    dm = PromptDataModule(
        path=str(write(tmp_path / "p.jsonl", rows)),
        batch_size=4,
        max_steps=3,
        val_fraction=0.1,
        max_prompt_length=64,
        eval_batch_size=3,
    )
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    assert dm.too_long == 1  # the 500-character prompt is dropped, never cut
    assert len(dm.train_prompts) + len(dm.val_prompts) == 40 and len(dm.val_prompts) == 4
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    batch = batches[0]
    assert set(batch) == {"prompt_ids", "messages", "tools", "answers"} and len(batch["prompt_ids"]) == 4
    for ids, messages in zip(batch["prompt_ids"], batch["messages"]):
        assert ids == tokenizer.encode(render(messages, add_generation_prompt=True))
        assert ids[-1] == tokenizer.token_id(ASSISTANT)
    assert [len(b["prompt_ids"]) for b in dm.val_dataloader()] == [3, 1]
    # reproducible from the seed
    again = PromptDataModule(
        path=str(tmp_path / "p.jsonl"), batch_size=4, max_steps=3, val_fraction=0.1, max_prompt_length=64
    )
    again.set_tokenizer(tokenizer)
    again.setup("fit")
    assert next(iter(again.train_dataloader()))["prompt_ids"] == batch["prompt_ids"]


def test_separate_val_file_and_nothing_fits(tmp_path: Path, tokenizer: CharTokenizer) -> None:
    train = write(tmp_path / "t.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    val = write(
        tmp_path / "v.jsonl", [{"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    )
    dm = PromptDataModule(path=str(train), val_path=str(val), batch_size=1, max_steps=1)
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    assert len(dm.train_prompts) == 2 and dm.val_prompts[0].messages == [{"role": "user", "content": "c"}]
    tight = PromptDataModule(path=str(train), val_path=str(val), max_prompt_length=3)
    tight.set_tokenizer(tokenizer)
    with pytest.raises(DataError, match="no prompt fits max_prompt_length=3"):
        tight.setup("fit")


def test_builtin_datamodule_needs_init_from_for_a_tokenizer() -> None:
    with pytest.raises(DataError, match="init_from"):
        PromptDataModule().documents()
