"""Instruction data for SFT: conversations in the chat format, loss on assistant tokens only.

Reads JSONL in the common formats (one per line, mixed freely):
- `{"prompt": "...", "completion": "..."}` (strings, or message lists as in TRL's conversational form);
- `{"messages": [...], "tools": [...]}` (OpenAI chat shape, tool calls included);
- `{"instruction": "...", "input": "...", "output": "..."}` (Alpaca).
An optional `answer` field is the reference final answer used for `val/exact_match`. With no path, the built-in
small-world instruction set is used; a Hugging Face dataset name works too (needs the `datasets` package).

Training batches are grouped by length by default (`group_by_length: true`): each batch holds conversations of
similar length, so it computes on conversations rather than padding. The built-in conversations run from 40 to 320
tokens; padded to the longest of a random batch, about 40% of each batch was padding, and attention, which costs
the square of the padded length, was half of a small model's step. Measured (`scripts/bench/sft_grouping.py`):
grouped batches train about 2x the conversations per second of random ones, and 1.5x those of rows packed with
several conversations each (packing fills rows to ~85%, but every row then pays attention over its full width).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from stagelm.chat import ChatFormatError, Message, render_for_training
from stagelm.data.jsonl import check_renders, iter_jsonl
from stagelm.data.resumable import ResumableDataLoader
from stagelm.errors import DataError
from stagelm.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass
class Conversation:
    messages: list[Message]
    tools: list[dict[str, Any]] | None = None
    answer: str | None = None  # reference final answer, when known
    family: str | None = None  # task family of built-in data, for per-family metrics
    # built-in data, for the tool and multi-turn metrics (stagelm.chat_metrics): the user turns, the tool calls
    # the last turn needs (None: not known), and the last question asked alone (a full conversation)
    turns: int = 1
    needed_calls: list[dict[str, Any]] | None = None
    standalone: list[Message] | None = None

    @property
    def prompt(self) -> list[Message]:
        """Everything before the final assistant turn: what a model is asked at evaluation."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def reference(self) -> str:
        return self.messages[-1].get("content") or ""


def _as_messages(value: Any, role: str, where: str, field: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    raise DataError(f"{where}: '{field}' must be a string or a list of messages")


def to_conversation(record: dict[str, Any], where: str) -> Conversation:
    """Any supported record shape -> Conversation; a DataError naming file and line otherwise."""
    if "messages" in record:
        messages = _as_messages(record["messages"], "user", where, "messages")
    elif "prompt" in record and "completion" in record:
        messages = _as_messages(record["prompt"], "user", where, "prompt")
        messages = messages + _as_messages(record["completion"], "assistant", where, "completion")
    elif "instruction" in record and "output" in record:
        for field in ("instruction", "output"):
            if not isinstance(record[field], str):
                raise DataError(f"{where}: '{field}' must be a string")
        if not isinstance(record.get("input"), (str, type(None))):
            raise DataError(f"{where}: 'input' must be a string or null")
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    else:
        raise DataError(
            f"{where}: unrecognised record with keys {sorted(record)}; expected 'messages', "
            "'prompt'+'completion', or 'instruction'+'output'"
        )
    if not any(m.get("role") == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    check_renders(messages, record.get("tools"), where, "messages")
    answer = record.get("answer")
    answer = None if answer is None else str(answer)
    extras = {key: record[key] for key in ("turns", "needed_calls", "standalone") if key in record}
    return Conversation(messages, record.get("tools"), answer, record.get("family"), **extras)


def read_conversations(path: str) -> list[Conversation]:
    conversations = [to_conversation(record, where) for where, record in iter_jsonl(path)]
    if not conversations:
        raise DataError(f"{path}: no records")
    return conversations


def load_hf_conversations(name: str, split: str) -> list[Conversation]:  # pragma: no cover - needs internet
    try:
        import datasets
    except ImportError as e:
        raise DataError("hf_dataset needs the `datasets` package: pip install datasets") from e
    rows = datasets.load_dataset(name, split=split)
    return [to_conversation(dict(row), f"{name}[{split}]:{i}") for i, row in enumerate(rows)]


def builtin_conversations(split: str, n: int, seed: int, quality: float | None = None) -> list[Conversation]:
    from stagelm.data import world

    records = world.instruction_examples(split, n, seed=seed, quality=quality if split == "train" else 1.0)
    return [to_conversation(r, f"builtin {split} #{i}") for i, r in enumerate(records)]


def encode_conversations(
    tokenizer: Tokenizer, conversations: list[Conversation], max_length: int
) -> tuple[list[tuple[list[int], list[bool]]], int]:
    """Conversations -> (token ids, loss mask) pairs of at most max_length + 1 tokens (inputs and shifted labels),
    leaving out those with no assistant token left to learn from; and how many were cut to max_length."""
    encoded, truncated = [], 0
    for i, conv in enumerate(conversations):
        try:
            ex = render_for_training(tokenizer, conv.messages, conv.tools)
        except ChatFormatError as e:
            raise DataError(f"conversation {i}: {e}") from None
        ids, mask = ex.input_ids, ex.loss_mask
        if len(ids) > max_length + 1:
            ids, mask = ids[: max_length + 1], mask[: max_length + 1]
            truncated += 1
        if any(mask[1:]):
            encoded.append((ids, mask))
    return encoded, truncated


class SFTCollator:
    """Right-pads a batch; labels are the next token where the loss mask is on, IGNORE_INDEX elsewhere."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[tuple[list[int], list[bool]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in examples) - 1
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, mask) in enumerate(examples):
            n = len(ids) - 1
            input_ids[row, :n] = torch.tensor(ids[:-1])
            targets = torch.tensor(ids[1:])
            keep = torch.tensor(mask[1:])
            labels[row, :n] = torch.where(keep, targets, torch.full_like(targets, IGNORE_INDEX))
        return {"input_ids": input_ids, "labels": labels}


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, n_batches: int, generator: torch.Generator, group: int = 16
) -> list[list[int]]:
    """`n_batches` batches of example indices in which lengths are alike, so little of a batch is padding.

    Examples are drawn uniformly with replacement (the stream a plain random loader sees); each run of
    `group * batch_size` draws is sorted by length, cut into `group` batches, and those are served in a random
    order. Every draw is used once, so each example keeps its frequency; a batch holds neighbours in length."""
    batches: list[list[int]] = []
    while len(batches) < n_batches:
        draws = torch.randint(len(lengths), (group * batch_size,), generator=generator).tolist()
        draws.sort(key=lambda i: lengths[i])
        chunk = [draws[k * batch_size : (k + 1) * batch_size] for k in range(group)]
        batches += [chunk[k] for k in torch.randperm(group, generator=generator).tolist()]
    return batches[:n_batches]


class Batches(torch.utils.data.Dataset):
    """Map-style view of ready-made batches: item b is the list of (ids, loss mask) examples of batch b."""

    def __init__(self, examples: list[tuple[list[int], list[bool]]], batches: list[list[int]]) -> None:
        self.examples, self.batches = examples, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> list[tuple[list[int], list[bool]]]:
        return [self.examples[i] for i in self.batches[b]]


class InstructDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str | None = None,
        val_path: str | None = None,
        hf_dataset: str | None = None,
        max_length: int = 256,
        batch_size: int = 32,
        max_steps: int = 1000,
        seed: int = 0,
        builtin_train: int = 20000,
        builtin_val: int = 300,
        quality: float | None = None,
        val_fraction: float = 0.05,
        eval_examples: int = 200,
        num_workers: int = 0,
        group_by_length: bool = True,
    ) -> None:
        super().__init__()
        self.path, self.val_path, self.hf_dataset = path, val_path, hf_dataset
        self.max_length, self.batch_size, self.max_steps, self.seed = max_length, batch_size, max_steps, seed
        self.builtin_train, self.builtin_val, self.quality = builtin_train, builtin_val, quality
        self.val_fraction, self.eval_examples, self.num_workers = val_fraction, eval_examples, num_workers
        self.group_by_length = group_by_length
        self.tokenizer: Tokenizer | None = None
        self.train_conversations: list[Conversation] = []
        self.val_conversations: list[Conversation] = []
        self.truncated = 0  # training examples cut to max_length (logged by the stage)

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def documents(self) -> list[str]:
        raise DataError("SFT starts from a pre-trained checkpoint: pass init_from=PATH")

    def load(self) -> tuple[list[Conversation], list[Conversation]]:
        if self.path:
            train = read_conversations(self.path)
            if self.val_path:
                return train, read_conversations(self.val_path)
            rng = random.Random(self.seed)
            rng.shuffle(train)
            n_val = max(1, int(len(train) * self.val_fraction))
            return train[n_val:], train[:n_val]
        if self.hf_dataset:
            train = load_hf_conversations(self.hf_dataset, "train")
            return train, load_hf_conversations(self.hf_dataset, "test")
        return builtin_conversations("train", self.builtin_train, self.seed, self.quality), self.load_val()

    def load_val(self) -> list[Conversation]:
        """The held-out conversations alone (built-in data: without generating the training set)."""
        if self.path or self.hf_dataset:
            return self.load()[1]
        return builtin_conversations("val", self.builtin_val, self.seed, 1.0)

    def setup(self, stage: str | None = None) -> None:
        if self.train_conversations:
            return
        if self.tokenizer is None:
            raise RuntimeError("InstructDataModule.set_tokenizer() must be called before setup()")
        self.train_conversations, self.val_conversations = self.load()
        self._train = self._encode(self.train_conversations, count_truncated=True)
        self._val = self._encode(self.val_conversations, count_truncated=False)

    def _encode(self, conversations: list[Conversation], count_truncated: bool) -> list[tuple[list[int], list[bool]]]:
        encoded, truncated = encode_conversations(self.tokenizer, conversations, self.max_length)
        self.truncated += truncated if count_truncated else 0
        return encoded

    def eval_set(self) -> list[Conversation]:
        """Held-out conversations whose prompts are answered by generation at validation (loaded on their own when
        the module was not set up: the pipeline report's scorecard rebuilds SFT's eval set from its config)."""
        if not self.val_conversations:
            self.val_conversations = self.load_val()
        return self.val_conversations[: self.eval_examples]

    def train_dataloader(self) -> DataLoader:
        # sample with replacement from a seeded generator: runs are reproducible and max_steps defines the length
        world = self.trainer.world_size if self.trainer is not None else 1
        generator = torch.Generator().manual_seed(self.seed)
        if self.group_by_length:
            # the batches are drawn at random already: served in order (under DDP each process takes its share)
            lengths = [len(ids) for ids, _ in self._train]
            batches = length_grouped_batches(lengths, self.batch_size, self.max_steps * world, generator)
            return ResumableDataLoader(
                Batches(self._train, batches),
                batch_size=None,  # each item is a batch
                shuffle=False,
                collate_fn=SFTCollator(self.tokenizer.pad_id),
                num_workers=self.num_workers,
            )
        sampler = torch.utils.data.RandomSampler(
            self._train, replacement=True, num_samples=self.max_steps * self.batch_size * world, generator=generator
        )
        return ResumableDataLoader(
            self._train,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=SFTCollator(self.tokenizer.pad_id),
            num_workers=self.num_workers,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self._val,
            batch_size=self.batch_size,
            collate_fn=SFTCollator(self.tokenizer.pad_id),
            num_workers=self.num_workers,
        )
