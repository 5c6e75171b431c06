"""Prompt-only data for the RL stages (PPO): chat prompts the policy answers during rollouts, and held-out prompts
it answers greedily at validation.

Reads JSONL, one record per line (formats mixed freely):
- `{"prompt": "..."}` or `{"prompt": [messages]}` (a string is one user turn);
- `{"messages": [...]}` (OpenAI chat shape; a final assistant turn, if any, is dropped: it is the answer to the
  prompt, not part of it). Optional `tools`, and an optional `answer` the world's judge can score replies against.
With no path, the built-in small world: the user turns of its instruction set (tool-use conversations left out,
their prompts need a tool result mid-reply), the train split for rollouts, the val split held out for evaluation.

A batch is a dict: `prompt_ids` (token id lists, rendered with `add_generation_prompt=True`, unpadded: the sampler
left-pads them), `messages`, `tools` and `answers` (lists, one per prompt).
"""

from __future__ import annotations

import random
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
class Prompt:
    messages: list[Message]  # the conversation so far; the model writes the next assistant turn
    tools: list[dict[str, Any]] | None = None
    answer: str | None = None  # the reference final answer, when known (for the judge)
    family: str | None = None  # task family of built-in data

    def as_record(self) -> dict[str, Any]:
        """The shape `world.judge` reads (it falls back on `answer` for prompts it did not write)."""
        record: dict[str, Any] = {"messages": self.messages}
        if self.answer is not None:
            record["answer"] = self.answer
        return record


def _messages(value: Any, where: str, field: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return list(value)
    raise DataError(f"{where}: '{field}' must be a string or a non-empty list of messages with a 'role'")


def to_prompt(record: dict[str, Any], where: str) -> Prompt:
    """A JSONL record -> Prompt; a DataError naming file and line otherwise."""
    if "prompt" in record:
        messages = _messages(record["prompt"], where, "prompt")
    elif "messages" in record:
        messages = _messages(record["messages"], where, "messages")
    else:
        raise DataError(f"{where}: unrecognised record with keys {sorted(record)}; expected 'prompt' or 'messages'")
    if messages[-1].get("role") == "assistant":
        messages = messages[:-1]  # the reply to the prompt: the policy writes its own
    if not messages:
        raise DataError(f"{where}: nothing left to prompt with once the final assistant turn is dropped")
    if messages[-1].get("role") == "assistant":
        raise DataError(f"{where}: the prompt ends with two assistant turns")
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' must be a list")
    check_renders(messages, tools, where, "prompt" if "prompt" in record else "messages")
    answer = record.get("answer")
    return Prompt(messages, tools, None if answer is None else str(answer), record.get("family"))


def read_prompts(path: str) -> list[Prompt]:
    prompts = [to_prompt(record, where) for where, record in iter_jsonl(path)]
    if not prompts:
        raise DataError(f"{path}: no records")
    return prompts


def builtin_prompts(split: str, n: int, seed: int) -> list[Prompt]:
    """User turns of the built-in instruction set (no tool use): train split for rollouts, val for evaluation."""
    from stagelm.data import world

    families = {f: w for f, w in world.INSTRUCTION_MIX.items() if f not in ("tool", "convert", "two_calls")}
    # one question each, asked alone (a conversation's last question spelled out), no system prompt, no tools
    records = []
    for r in world.instruction_examples(split, 2 * n, seed=seed, families=families):
        messages = r.get("standalone", r["messages"])
        if messages[0]["role"] == "user" and len(records) < n:
            records.append({**{k: v for k, v in r.items() if k != "tools"}, "messages": messages})
    return [to_prompt(r, f"builtin {split} #{i}") for i, r in enumerate(records)]


class PromptCollator:
    """Keeps token ids as unpadded lists (the sampler left-pads) and the messages beside them."""

    def __call__(self, examples: list[tuple[list[int], Prompt]]) -> dict[str, Any]:
        return {
            "prompt_ids": [ids for ids, _ in examples],
            "messages": [p.messages for _, p in examples],
            "tools": [p.tools for _, p in examples],
            "answers": [p.answer for _, p in examples],
        }


class PromptDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str | None = None,
        val_path: str | None = None,
        max_prompt_length: int = 192,
        batch_size: int = 32,
        max_steps: int = 1000,
        seed: int = 0,
        builtin_train: int = 5000,
        builtin_val: int = 200,
        val_fraction: float = 0.05,
        eval_examples: int = 100,
        eval_batch_size: int = 100,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.path, self.val_path, self.max_prompt_length = path, val_path, max_prompt_length
        self.batch_size, self.max_steps, self.seed = batch_size, max_steps, seed
        self.builtin_train, self.builtin_val, self.val_fraction = builtin_train, builtin_val, val_fraction
        self.eval_examples, self.eval_batch_size, self.num_workers = eval_examples, eval_batch_size, num_workers
        self.tokenizer: Tokenizer | None = None
        self.train_prompts: list[Prompt] = []
        self.val_prompts: list[Prompt] = []
        self.too_long = 0  # prompts dropped for exceeding max_prompt_length
        self._train_items: list[tuple[list[int], Prompt]] = []
        self._val_items: list[tuple[list[int], Prompt]] = []

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def documents(self) -> list[str]:
        raise DataError("PPO starts from an SFT checkpoint: pass init_from=PATH")

    def load(self) -> tuple[list[Prompt], list[Prompt]]:
        if self.path:
            train = read_prompts(self.path)
            if self.val_path:
                return train, read_prompts(self.val_path)
            rng = random.Random(self.seed)
            rng.shuffle(train)
            n_val = max(1, int(len(train) * self.val_fraction))
            return train[n_val:], train[:n_val]
        train = builtin_prompts("train", self.builtin_train, self.seed)
        return train, builtin_prompts("val", self.builtin_val, self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self._train_items:
            return
        if self.tokenizer is None:
            raise RuntimeError("PromptDataModule.set_tokenizer() must be called before setup()")
        train, val = self.load()
        self._train_items = self._encode(train, self.path or "built-in train prompts")
        self._val_items = self._encode(val[: self.eval_examples], self.val_path or self.path or "built-in val prompts")
        self.train_prompts = [p for _, p in self._train_items]
        self.val_prompts = [p for _, p in self._val_items]

    def _encode(self, prompts: list[Prompt], source: str) -> list[tuple[list[int], Prompt]]:
        items = []
        for i, prompt in enumerate(prompts):
            try:
                ids = self.tokenizer.encode(render(prompt.messages, add_generation_prompt=True, tools=prompt.tools))
            except ChatFormatError as e:
                raise DataError(f"{source}: prompt {i}: {e}") from None
            if len(ids) > self.max_prompt_length:
                self.too_long += 1  # cutting a prompt would cut the question; drop it instead
                continue
            items.append((ids, prompt))
        if not items:
            raise DataError(f"{source}: no prompt fits max_prompt_length={self.max_prompt_length} tokens")
        return items

    def calibration_batch(self, n: int) -> dict[str, Any]:
        """The first n training prompts as one batch (a fixed sample, e.g. to calibrate reward scores on)."""
        return PromptCollator()(self._train_items[:n])

    def train_dataloader(self) -> DataLoader:
        # sampling with replacement from a seeded generator: reproducible, and max_steps defines the length
        world = self.trainer.world_size if self.trainer is not None else 1
        generator = torch.Generator().manual_seed(self.seed)
        sampler = torch.utils.data.RandomSampler(
            self._train_items,
            replacement=True,
            num_samples=self.max_steps * self.batch_size * world,
            generator=generator,
        )
        return ResumableDataLoader(
            self._train_items,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=PromptCollator(),
            num_workers=self.num_workers,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self._val_items, batch_size=self.eval_batch_size, collate_fn=PromptCollator(), num_workers=self.num_workers
        )
