"""Math prompts with verifiable answers, for reasoning fine-tuning with GRPO (stage 4).

Reads JSONL in three formats (one per line, mixed freely), each with a reference final answer:
- `{"prompt": "...", "answer": "42"}` (the prompt may also be a message list);
- `{"messages": [...], "answer": "42"}` (OpenAI chat shape; a trailing assistant turn is kept as the reference
  solution, the prompt is everything before it);
- `{"question": "...", "answer": "... worked solution ...\\n#### 42"}` (GSM8K: the final answer follows `#### `).
An optional `level` (difficulty) gives per-level metrics. With no path, the built-in small world's multi-step
problems (`world.math_problems`) are used, with their held-out split for validation.

Batches are lists, not tensors: `prompt_ids` (each prompt rendered as a chat user turn followed by the assistant
role token, the exact prompt SFT trained on), `answers`, `levels` and `prompts` (the question text, for logs).
The GRPO stage samples replies from these prompts itself.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from stagelm.chat import ChatFormatError, Message, render
from stagelm.data.jsonl import check_renders, iter_jsonl
from stagelm.data.resumable import ResumableDataLoader
from stagelm.errors import DataError
from stagelm.tokenizer import Tokenizer


@dataclass
class MathProblem:
    messages: list[Message]  # the prompt: ends with a user turn
    answer: str  # the reference final answer (a number for the built-in and GSM8K data)
    level: int | None = None  # difficulty, when known
    solution: str | None = None  # a reference worked solution, when known

    @property
    def question(self) -> str:
        return next((m.get("content") or "" for m in reversed(self.messages) if m.get("role") == "user"), "")


def gsm8k_final_answer(text: str, where: str) -> str:
    """The final answer of a GSM8K solution: what follows the last `####`, thousands commas dropped."""
    if "####" not in text:
        raise DataError(f"{where}: GSM8K answer has no final answer after '#### '")
    final = text.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise DataError(f"{where}: GSM8K answer is empty after '#### '")
    return final


def _prompt_messages(value: Any, where: str, field: str) -> list[Message]:
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    raise DataError(f"{where}: '{field}' must be a non-empty string or a list of messages")


def _answer_text(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise DataError(f"{where}: 'answer' must be a non-empty string or a number, found {value!r}")
    return str(value).strip()


def to_problem(record: dict[str, Any], where: str) -> MathProblem:
    """Any supported record shape -> MathProblem; a DataError naming file and line otherwise."""
    if "answer" not in record:
        raise DataError(f"{where}: record with keys {sorted(record)} has no 'answer'")
    solution = None
    if "question" in record and "prompt" not in record and "messages" not in record:  # GSM8K
        messages = _prompt_messages(record["question"], where, "question")
        solution = _answer_text(record["answer"], where)
        answer = gsm8k_final_answer(solution, where)
    else:
        if "messages" in record:
            messages = _prompt_messages(record["messages"], where, "messages")
            if messages[-1].get("role") == "assistant":  # a reference reply: not part of the prompt
                solution, messages = messages[-1].get("content"), messages[:-1]
        elif "prompt" in record:
            messages = _prompt_messages(record["prompt"], where, "prompt")
        else:
            raise DataError(
                f"{where}: unrecognised record with keys {sorted(record)}; expected 'prompt', 'messages' or "
                "'question' (GSM8K), each with 'answer'"
            )
        answer = _answer_text(record["answer"], where)
        solution = record.get("solution", solution)
    if not messages or messages[-1].get("role") != "user":
        raise DataError(f"{where}: the prompt must end with a user turn")
    check_renders(messages, None, where, "prompt")
    level = record.get("level")
    if level is not None and (isinstance(level, bool) or not isinstance(level, int)):
        raise DataError(f"{where}: 'level' must be an integer, found {level!r}")
    return MathProblem(messages, answer, level, solution)


def read_problems(path: str) -> list[MathProblem]:
    problems = [to_problem(record, where) for where, record in iter_jsonl(path)]
    if not problems:
        raise DataError(f"{path}: no records")
    return problems


def builtin_problems(split: str, n: int, seed: int, levels: Sequence[int]) -> list[MathProblem]:
    """The small world's multi-step problems, phrased exactly as in the SFT data ("Work out 12 + 7 - 5.", short
    stories); SFT taught the worked-solution reply ending "The answer is N.". Repeating a level weights it."""
    from stagelm.data import world

    try:
        records = world.math_problems(split, n, seed=seed, levels=tuple(levels))
    except ValueError as e:
        raise DataError(f"data.levels: {e}") from None
    return [
        MathProblem([{"role": "user", "content": r["prompt"]}], r["answer"], r["level"], r["solution"]) for r in records
    ]


@dataclass
class EncodedProblem:
    prompt_ids: list[int]
    problem: MathProblem


def collate_problems(examples: list[EncodedProblem]) -> dict[str, list[Any]]:
    return {
        "prompt_ids": [e.prompt_ids for e in examples],
        "answers": [e.problem.answer for e in examples],
        "levels": [e.problem.level for e in examples],
        "prompts": [e.problem.question for e in examples],
    }


class MathDataModule(L.LightningDataModule):
    """Prompts and reference answers; train batches (`batch_size` prompts per GRPO step) are drawn with replacement
    from a seeded generator, so runs are reproducible and `max_steps` sets the length."""

    def __init__(
        self,
        path: str | None = None,
        val_path: str | None = None,
        batch_size: int = 16,
        max_steps: int = 1000,
        seed: int = 0,
        levels: Sequence[int] = (1, 2, 3),
        builtin_train: int = 5000,
        builtin_val: int = 500,
        val_fraction: float = 0.05,
        eval_examples: int = 300,
        eval_batch_size: int = 100,
        max_prompt_length: int = 384,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1")
        self.path, self.val_path, self.seed = path, val_path, seed
        self.batch_size, self.max_steps = batch_size, max_steps
        self.levels = list(levels)
        self.builtin_train, self.builtin_val, self.val_fraction = builtin_train, builtin_val, val_fraction
        self.eval_examples, self.eval_batch_size = eval_examples, eval_batch_size
        self.max_prompt_length, self.num_workers = max_prompt_length, num_workers
        self.tokenizer: Tokenizer | None = None
        self.too_long = 0  # prompts left out for being longer than max_prompt_length tokens
        self.train_problems: list[MathProblem] = []
        self.val_problems: list[MathProblem] = []

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def documents(self) -> list[str]:
        raise DataError("GRPO starts from a fine-tuned checkpoint: pass init_from=PATH")

    def load(self) -> tuple[list[MathProblem], list[MathProblem]]:
        if self.path:
            train = read_problems(self.path)
            if self.val_path:
                return train, read_problems(self.val_path)
            rng = random.Random(self.seed)
            rng.shuffle(train)
            n_val = max(1, int(len(train) * self.val_fraction))
            return train[n_val:], train[:n_val]
        return (
            builtin_problems("train", self.builtin_train, self.seed, self.levels),
            builtin_problems("val", self.builtin_val, self.seed, self.levels),
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_problems:
            return
        if self.tokenizer is None:
            raise RuntimeError("MathDataModule.set_tokenizer() must be called before setup()")
        train, val = self.load()
        self._train = self._encode(train, "train")
        self._val = self._encode(val, "val")[: self.eval_examples]
        self.train_problems = [e.problem for e in self._train]
        self.val_problems = [e.problem for e in self._val]

    def _encode(self, problems: list[MathProblem], split: str) -> list[EncodedProblem]:
        encoded = []
        for i, problem in enumerate(problems):
            try:
                ids = self.tokenizer.encode(render(problem.messages, add_generation_prompt=True))
            except ChatFormatError as e:
                raise DataError(f"{split} problem {i}: {e}") from None
            if len(ids) > self.max_prompt_length:
                self.too_long += 1
                continue
            encoded.append(EncodedProblem(ids, problem))
        if not encoded:
            raise DataError(f"no {split} prompt fits data.max_prompt_length={self.max_prompt_length} tokens")
        return encoded

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        total = self.max_steps * self.batch_size * world
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randint(len(self._train), (total,), generator=generator).tolist()
        return ResumableDataLoader(
            [self._train[i] for i in order],
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=collate_problems,
            num_workers=self.num_workers,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self._val, batch_size=self.eval_batch_size, collate_fn=collate_problems, num_workers=self.num_workers
        )
