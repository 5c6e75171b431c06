"""Preference data: every record format, the implicit-prompt split, clear errors with file and line, and batches
whose reply masks cover exactly the reply tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stagelm.chat import render
from stagelm.data.preference import PreferenceDataModule, encode_reply, read_pairs, to_pair
from stagelm.errors import DataError
from stagelm.tokenizer import END_OF_TURN, CharTokenizer

USER = {"role": "user", "content": "What is 2 + 3?"}
GOOD = {"role": "assistant", "content": "2 + 3 = 5."}
BAD = {"role": "assistant", "content": "2 + 3 = 6."}


def write(path: Path, rows: list[dict] | list[str]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def tokenizer() -> CharTokenizer:
    return CharTokenizer.train(["abc"], include_ascii=True)


def test_all_record_formats_give_the_same_pair(tmp_path: Path) -> None:
    rows = [
        {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5.", "rejected": "2 + 3 = 6."},
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
        {"prompt": "What is 2 + 3?", "chosen": [GOOD], "rejected": "2 + 3 = 6."},
        {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
    ]
    pairs = read_pairs(str(write(tmp_path / "p.jsonl", rows)))
    for pair in pairs:
        assert (pair.prompt, pair.chosen, pair.rejected) == ([USER], [GOOD], [BAD])


def test_implicit_prompt_splits_at_the_longest_common_prefix() -> None:
    system = {"role": "system", "content": "Be brief."}
    first = {"role": "assistant", "content": "Hello."}
    follow = {"role": "user", "content": "And 2 + 3?"}
    pair = to_pair(
        {"chosen": [system, USER, first, follow, GOOD], "rejected": [system, USER, first, follow, BAD]}, "x:1"
    )
    assert pair.prompt == [system, USER, first, follow] and pair.chosen == [GOOD] and pair.rejected == [BAD]
    # the replies differ from their first assistant turn on, even when later turns agree
    tool_turns = [{"role": "tool", "tool_call_id": "c", "content": "5"}, GOOD]
    pair = to_pair({"chosen": [USER, first, *tool_turns], "rejected": [USER, BAD, *tool_turns]}, "x:1")
    assert pair.prompt == [USER] and pair.chosen[0] == first and pair.rejected[0] == BAD


def test_optional_fields_are_kept(tmp_path: Path) -> None:
    pair = to_pair({"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "6", "answer": 5, "rule": "correct"}, "x:1")
    assert pair.answer == "5" and pair.rule == "correct"
    assert pair.judge_input == {"prompt": [{"role": "user", "content": "Add 2 and 3."}], "answer": "5"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "q", "chosen": "a"}', r"p\.jsonl:2: unrecognised record with keys \['chosen', 'prompt'\]"),
        ('{"prompt": "q", "chosen": 3, "rejected": "b"}', r"p\.jsonl:2: 'chosen' must be a string or"),
        ('{"chosen": "a", "rejected": "b"}', r"p\.jsonl:2: no 'prompt'"),
        (
            '{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
            '"rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}',
            r"p\.jsonl:2: 'chosen' and 'rejected' share no prompt",
        ),
        (
            '{"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]}',
            r"p\.jsonl:2: 'chosen' and 'rejected' are the same conversation",
        ),
        (
            '{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}',
            r"p\.jsonl:2: 'chosen' must be an assistant reply",
        ),
        ('{"prompt": "q", "chosen": "a", ', r"p\.jsonl:2: malformed JSON"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(DataError, match=message):
        read_pairs(str(path))


def test_encoding_masks_exactly_the_reply(tokenizer: CharTokenizer) -> None:
    enc, truncated = encode_reply(tokenizer, [USER], [GOOD], None, max_length=256)
    assert not truncated
    text = render([USER, GOOD])
    assert enc.input_ids == tokenizer.encode(text)
    reply = tokenizer.decode([t for t, m in zip(enc.input_ids, enc.reply_mask) if m])
    assert reply == GOOD["content"] + END_OF_TURN
    prompt_len = len(tokenizer.encode(render([USER], add_generation_prompt=True)))
    assert not any(enc.reply_mask[:prompt_len]) and all(enc.reply_mask[prompt_len:])


def test_truncation_cuts_the_prompt_first_then_the_reply(tokenizer: CharTokenizer) -> None:
    long_user = {"role": "user", "content": "x" * 100 + " What is 2 + 3?"}
    enc, truncated = encode_reply(tokenizer, [long_user], [GOOD], None, max_length=40)
    assert truncated and len(enc.input_ids) == 40
    assert tokenizer.decode(enc.input_ids).endswith(GOOD["content"] + END_OF_TURN)
    enc, truncated = encode_reply(tokenizer, [USER], [{"role": "assistant", "content": "y" * 100}], None, 40)
    assert truncated and len(enc.input_ids) == 40 and sum(enc.reply_mask) == 39


def test_builtin_batches(tokenizer: CharTokenizer) -> None:
    dm = PreferenceDataModule(batch_size=4, max_steps=2, builtin_train=50, builtin_val=10, eval_examples=5)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    assert len(dm.train_pairs) == 50 and len(dm.val_pairs) == 10 and len(dm.eval_set()) == 5
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    batch = next(iter(dm.val_dataloader()))
    assert batch["index"].tolist() == [0, 1, 2, 3]
    for side in ("chosen", "rejected"):
        ids, attn, reply = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "reply_mask"))
        assert ids.shape == attn.shape == reply.shape == batch["chosen_input_ids"].shape
        assert not (reply & ~attn).any() and (ids[~attn] == tokenizer.pad_id).all()
        for row in range(4):
            pair = dm.val_pairs[row]
            expected = getattr(pair, side)[0]["content"] + END_OF_TURN
            assert tokenizer.decode(ids[row][reply[row]].tolist()) == expected
    assert "ref_chosen_logps" not in batch
    for pair in dm.val_data[:4]:
        pair.ref_chosen, pair.ref_rejected = -1.0, -2.0
    batch = next(iter(dm.val_dataloader()))
    assert torch.equal(batch["ref_chosen_logps"], torch.full((4,), -1.0))
