"""The math-prompt data module: every record format, GSM8K's `#### ` answers, errors naming file and line, the
built-in problems (deterministic, held-out split disjoint from training) and the batches the GRPO stage reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagelm.chat import render
from stagelm.data.math import MathDataModule, builtin_problems, gsm8k_final_answer, read_problems
from stagelm.data.world import canonical_reply, instruction_examples
from stagelm.errors import DataError
from stagelm.rewards import correctness_reward
from stagelm.tokenizer import train_tokenizer
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer("char", ["The answer is 0123456789 + - * ( ) ? . ,"], 256, True)


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_reads_all_three_formats(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "math.jsonl",
        [
            {"prompt": "What is 2 + 3?", "answer": "5", "level": 1},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is 4 * 5?"},
                    {"role": "assistant", "content": "4 * 5 = 20. The answer is 20."},
                ],
                "answer": 20,
            },
            {
                "question": "Tom has 3 bags of 4 apples. How many apples?",
                "answer": "He has 3 * 4 = <<3*4=12>>12 apples.\n#### 1,200",
            },
        ],
    )
    a, b, c = read_problems(str(path))
    assert (a.messages, a.answer, a.level) == ([{"role": "user", "content": "What is 2 + 3?"}], "5", 1)
    assert b.answer == "20" and b.solution == "4 * 5 = 20. The answer is 20."
    assert [m["role"] for m in b.messages] == ["system", "user"] and b.question == "What is 4 * 5?"
    assert c.answer == "1200" and c.solution.endswith("#### 1,200") and c.question.startswith("Tom has")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("18 eggs\n#### 18", "18"),
        ("#### 70,000", "70000"),
        ("a\n#### -3 ", "-3"),
        ("x #### 1 #### 2.5", "2.5"),
    ],
)
def test_gsm8k_final_answer(text: str, expected: str) -> None:
    assert gsm8k_final_answer(text, "f:1") == expected


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"question": "Q?", "answer": "no final answer"},
            r"bad\.jsonl:2: GSM8K answer has no final answer after '#### '",
        ),
        ({"question": "Q?", "answer": "work\n####  "}, r"bad\.jsonl:2: GSM8K answer is empty"),
        ({"prompt": "What is 2 + 2?"}, r"bad\.jsonl:2: record with keys \['prompt'\] has no 'answer'"),
        ({"text": "hello", "answer": "1"}, r"bad\.jsonl:2: unrecognised record with keys \['answer', 'text'\]"),
        ({"prompt": "", "answer": "1"}, r"bad\.jsonl:2: 'prompt' must be a non-empty string"),
        ({"prompt": "Q?", "answer": None}, r"bad\.jsonl:2: 'answer' must be a non-empty string or a number"),
        (
            {"messages": [{"role": "assistant", "content": "hi"}], "answer": "1"},
            r"bad\.jsonl:2: .*end with a user turn",
        ),
        ({"prompt": "Q?", "answer": "1", "level": "hard"}, r"bad\.jsonl:2: 'level' must be an integer"),
        ("{not json", r"bad\.jsonl:2: malformed JSON"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path: Path, row, message: str) -> None:
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "What is 1 + 1?", "answer": 2}, row])
    with pytest.raises(DataError, match=message):
        read_problems(str(path))


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_problems(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_problems(str(tmp_path / "empty.jsonl"))


def test_gsm8k_test_file_loads_and_gold_solutions_grade_correct() -> None:
    path = SHARED_DATA / "gsm8k_test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present (only on development machines)")
    problems = read_problems(str(path))
    assert len(problems) == 1319
    assert problems[0].answer == "18" and problems[0].question.startswith("Janet")
    assert all(correctness_reward(p.solution, p.answer) == 1.0 for p in problems)


def test_builtin_problems_match_the_sft_format_and_are_deterministic() -> None:
    train = builtin_problems("train", 200, seed=0, levels=(1, 2, 3))
    assert [p.question for p in train] == [p.question for p in builtin_problems("train", 200, 0, (1, 2, 3))]
    assert {p.level for p in train} == {1, 2, 3}
    val = builtin_problems("val", 200, seed=0, levels=(1, 2, 3))
    assert not {p.question for p in train} & {p.question for p in val}
    for p in train[:50]:
        assert p.solution == canonical_reply(p.question) and p.solution.endswith(f"The answer is {p.answer}.")
    # SFT's multi_step family is phrased the same way (the world writes both from one template set)
    sft = [r for r in instruction_examples("train", 400, seed=0) if r["family"] == "multi_step"]
    canonical = [r for r in sft if r["style"] == "canonical"]
    assert canonical and all(canonical_reply(r) == r["messages"][-1]["content"] for r in canonical)
    assert {p.question.split(" ")[0] for p in train} & {r["messages"][0]["content"].split(" ")[0] for r in sft}
    with pytest.raises(DataError, match="data.levels"):
        builtin_problems("train", 5, 0, levels=(4,))


def test_datamodule_batches_and_splits(tokenizer) -> None:
    dm = MathDataModule(
        batch_size=4, max_steps=3, levels=[2], builtin_train=50, builtin_val=30, eval_examples=20, eval_batch_size=8
    )
    dm.set_tokenizer(tokenizer)
    dm.setup()
    assert len(dm.val_problems) == 20 and all(p.level == 2 for p in dm.train_problems)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(len(b["prompt_ids"]) == 4 for b in batches)
    first = batches[0]
    assert set(first) == {"prompt_ids", "answers", "levels", "prompts"}
    problem = next(p for p in dm.train_problems if p.question == first["prompts"][0])
    assert first["prompt_ids"][0] == tokenizer.encode(render(problem.messages, add_generation_prompt=True))
    assert tokenizer.decode(first["prompt_ids"][0]).endswith("<|assistant|>")
    assert [b["prompts"] for b in batches] == [b["prompts"] for b in dm.train_dataloader()]  # reproducible
    resumed = dm.train_dataloader()
    resumed.load_state_dict({"batches_served": 1})  # resume: continues where a run that did one step stopped
    assert [b["prompts"] for b in resumed] == [b["prompts"] for b in batches[1:]]
    assert [len(b["answers"]) for b in dm.val_dataloader()] == [8, 8, 4]


def test_datamodule_user_file_val_split_and_length_limit(tmp_path: Path, tokenizer) -> None:
    rows = [{"prompt": f"What is {i} + 1?", "answer": i + 1} for i in range(40)]
    rows.append({"prompt": "What is " + "9 + " * 200 + "1?", "answer": 1801})
    path = _write(tmp_path / "m.jsonl", rows)
    dm = MathDataModule(path=str(path), val_fraction=0.1, max_prompt_length=64, seed=1)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    assert dm.too_long == 1 and len(dm.train_problems) + len(dm.val_problems) == 40
    assert not {p.question for p in dm.train_problems} & {p.question for p in dm.val_problems}
    tiny = MathDataModule(path=str(path), max_prompt_length=5)
    tiny.set_tokenizer(tokenizer)
    with pytest.raises(DataError, match="max_prompt_length=5"):
        tiny.setup()
