"""Preference pairs for the reward model and DPO: a prompt with a preferred (`chosen`) and a dispreferred
(`rejected`) reply, rendered in the chat format.

Reads JSONL in the common formats (one per line, mixed freely):
- `{"prompt": "...", "chosen": "...", "rejected": "..."}` (plain strings);
- the conversational form: `prompt` a string or a list of messages, `chosen`/`rejected` a string or a list of
  messages (one assistant message, or an assistant turn with tool calls and results);
- the implicit-prompt form `{"chosen": [messages], "rejected": [messages]}`: two whole conversations sharing a
  prefix, split at their longest common message prefix (the prompt) so that each reply starts with an assistant turn.
Optional fields: `tools` (rendered in the system turn), `answer` (the reference final answer, which lets the
small world's judge score replies to prompts it did not write). With no path, the built-in small world's pairs are
used (`world.preference_examples`), with a held-out validation split.

A batch holds, for each pair, its `index` in the split and `chosen_*` and `rejected_*` tensors padded to one
common width T (so the two halves can be concatenated for one forward pass): `input_ids` [B, T] (right-padded),
`attention_mask` [B, T] (real tokens) and `reply_mask` [B, T] (the reply's tokens, `<|end|>` included: what DPO
sums log-probs over).
"""

from __future__ import annotations

import random
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


@dataclass
class PreferencePair:
    prompt: list[Message]  # everything before the replies; the model is asked to continue after it
    chosen: list[Message]  # the preferred reply (one assistant turn, possibly with tool calls and results)
    rejected: list[Message]
    tools: list[dict[str, Any]] | None = None
    answer: str | None = None  # reference final answer, when known
    rule: str | None = None  # for built-in pairs: which preference rule the rejected reply breaks

    @property
    def judge_input(self) -> list[Message] | dict[str, Any]:
        """What `world.judge` takes as the prompt: the messages, plus the answer when the record gives one."""
        return self.prompt if self.answer is None else {"prompt": self.prompt, "answer": self.answer}


def _messages(value: Any, role: str, where: str, field: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict) and "role" in value:
        return [value]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    raise DataError(f"{where}: '{field}' must be a string or a non-empty list of messages with a 'role'")


def _check_reply(reply: list[Message], where: str, field: str) -> None:
    if reply[0].get("role") != "assistant" or reply[-1].get("role") != "assistant":
        roles = [m.get("role") for m in reply]
        raise DataError(
            f"{where}: '{field}' must be an assistant reply (start and end with an assistant "
            f"message), found roles {roles}"
        )


def split_implicit_prompt(chosen: list[Message], rejected: list[Message], where: str) -> tuple[list[Message], ...]:
    """Two whole conversations -> (prompt, chosen reply, rejected reply), at the longest common message prefix."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) and n == len(rejected):
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same conversation")
    # the replies must start with an assistant turn: back off to just before the first differing assistant turn
    while n > 0 and (
        n >= len(chosen)
        or chosen[n].get("role") != "assistant"
        or n >= len(rejected)
        or rejected[n].get("role") != "assistant"
    ):
        n -= 1
    if n == 0:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' share no prompt (no common messages before the first "
            "differing assistant turn); give a 'prompt' field"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def to_pair(record: dict[str, Any], where: str) -> PreferencePair:
    """Any supported record shape -> PreferencePair; a DataError naming file and line otherwise."""
    if "chosen" not in record or "rejected" not in record:
        raise DataError(
            f"{where}: unrecognised record with keys {sorted(record)}; expected 'chosen' and 'rejected' "
            "(with 'prompt', or as whole conversations sharing a prompt)"
        )
    if "prompt" in record:
        prompt = _messages(record["prompt"], "user", where, "prompt")
        chosen = _messages(record["chosen"], "assistant", where, "chosen")
        rejected = _messages(record["rejected"], "assistant", where, "rejected")
    elif isinstance(record["chosen"], list) and isinstance(record["rejected"], list):
        prompt, chosen, rejected = split_implicit_prompt(
            _messages(record["chosen"], "assistant", where, "chosen"),
            _messages(record["rejected"], "assistant", where, "rejected"),
            where,
        )
    else:
        raise DataError(
            f"{where}: no 'prompt': 'chosen' and 'rejected' must then be whole conversations "
            "(lists of messages) sharing a prompt"
        )
    _check_reply(chosen, where, "chosen")
    _check_reply(rejected, where, "rejected")
    for field, reply in (("chosen", chosen), ("rejected", rejected)):
        check_renders(prompt + reply, record.get("tools"), where, field)
    answer = record.get("answer")
    return PreferencePair(
        prompt, chosen, rejected, record.get("tools"), None if answer is None else str(answer), record.get("rule")
    )


def read_pairs(path: str) -> list[PreferencePair]:
    pairs = [to_pair(record, where) for where, record in iter_jsonl(path)]
    if not pairs:
        raise DataError(f"{path}: no records")
    return pairs


def builtin_pairs(split: str, n: int, seed: int) -> list[PreferencePair]:
    from stagelm.data import world

    return [to_pair(r, f"builtin {split} #{i}") for i, r in enumerate(world.preference_examples(split, n, seed=seed))]


@dataclass
class EncodedReply:
    input_ids: list[int]
    reply_mask: list[bool]  # True on the reply's assistant tokens (content, tool calls, <|end|>)


def encode_reply(
    tokenizer: Tokenizer,
    prompt: list[Message],
    reply: list[Message],
    tools: list[dict[str, Any]] | None,
    max_length: int,
) -> tuple[EncodedReply, bool]:
    """prompt + reply as token ids, the prompt ending with `<|assistant|>` (as at generation) and the reply with
    `<|end|>`; returns (encoded, truncated). Too long: the prompt loses tokens from its start first (the reply and
    the question just before it matter most), then the reply its end."""
    rendered = render_for_training(tokenizer, prompt + reply, tools)
    n_prompt = len(render_for_training(tokenizer, prompt, tools).input_ids) + 1  # + the reply's <|assistant|>
    ids, mask = rendered.input_ids, [False] * n_prompt + rendered.loss_mask[n_prompt:]
    if len(ids) <= max_length:
        return EncodedReply(ids, mask), False
    cut = min(len(ids) - max_length, n_prompt - 1)  # keep at least the <|assistant|> token before the reply
    ids, mask = ids[cut:][:max_length], mask[cut:][:max_length]
    return EncodedReply(ids, mask), True


@dataclass
class EncodedPair:
    index: int  # position in the split's pair list (train_pairs / val_pairs)
    chosen: EncodedReply
    rejected: EncodedReply
    ref_chosen: float | None = None  # reference log-probs of the replies, when DPO precomputes them
    ref_rejected: float | None = None


class PreferenceCollator:
    """Right-pads chosen and rejected sequences of a batch to one common width; adds `index` [B] and, when every
    pair has them, the precomputed reference log-probs `ref_chosen_logps`, `ref_rejected_logps` [B]."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, pairs: list[EncodedPair]) -> dict[str, torch.Tensor]:
        width = max(max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs)
        batch: dict[str, torch.Tensor] = {"index": torch.tensor([p.index for p in pairs])}
        for side in ("chosen", "rejected"):
            input_ids = torch.full((len(pairs), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(pairs), width), dtype=torch.bool)
            reply = torch.zeros((len(pairs), width), dtype=torch.bool)
            for row, pair in enumerate(pairs):
                enc: EncodedReply = getattr(pair, side)
                n = len(enc.input_ids)
                input_ids[row, :n] = torch.tensor(enc.input_ids)
                attention[row, :n] = True
                reply[row, :n] = torch.tensor(enc.reply_mask)
            batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"] = input_ids, attention
            batch[f"{side}_reply_mask"] = reply
        if all(p.ref_chosen is not None and p.ref_rejected is not None for p in pairs):
            batch["ref_chosen_logps"] = torch.tensor([p.ref_chosen for p in pairs])
            batch["ref_rejected_logps"] = torch.tensor([p.ref_rejected for p in pairs])
        return batch


class PreferenceDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str | None = None,
        val_path: str | None = None,
        max_length: int = 256,
        batch_size: int = 32,
        max_steps: int = 1000,
        seed: int = 0,
        builtin_train: int = 10000,
        builtin_val: int = 400,
        val_fraction: float = 0.05,
        eval_examples: int = 200,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.path, self.val_path = path, val_path
        self.max_length, self.batch_size, self.max_steps, self.seed = max_length, batch_size, max_steps, seed
        self.builtin_train, self.builtin_val, self.val_fraction = builtin_train, builtin_val, val_fraction
        self.eval_examples, self.num_workers = eval_examples, num_workers
        self.tokenizer: Tokenizer | None = None
        self.train_pairs: list[PreferencePair] = []
        self.val_pairs: list[PreferencePair] = []
        self.truncated = 0  # training pairs with a side cut to max_length (logged by the stage)
        self.train_data: list[EncodedPair] = []  # encoded pairs, in the order of train_pairs / val_pairs
        self.val_data: list[EncodedPair] = []

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def documents(self) -> list[str]:
        raise DataError("preference tuning starts from an SFT checkpoint: pass init_from=PATH")

    def load(self) -> tuple[list[PreferencePair], list[PreferencePair]]:
        if self.path:
            train = read_pairs(self.path)
            if self.val_path:
                return train, read_pairs(self.val_path)
            rng = random.Random(self.seed)
            rng.shuffle(train)
            n_val = max(1, int(len(train) * self.val_fraction))
            return train[n_val:], train[:n_val]
        return builtin_pairs("train", self.builtin_train, self.seed), builtin_pairs("val", self.builtin_val, self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_pairs:
            return
        if self.tokenizer is None:
            raise RuntimeError("PreferenceDataModule.set_tokenizer() must be called before setup()")
        self.train_pairs, self.val_pairs = self.load()
        self.train_data = self.encode(self.train_pairs, count_truncated=True)
        self.val_data = self.encode(self.val_pairs, count_truncated=False)

    def encode(self, pairs: list[PreferencePair], count_truncated: bool = False) -> list[EncodedPair]:
        encoded = []
        for i, pair in enumerate(pairs):
            try:
                chosen, cut_c = encode_reply(self.tokenizer, pair.prompt, pair.chosen, pair.tools, self.max_length)
                rejected, cut_r = encode_reply(self.tokenizer, pair.prompt, pair.rejected, pair.tools, self.max_length)
            except ChatFormatError as e:
                raise DataError(f"preference pair {i}: {e}") from None
            self.truncated += count_truncated and (cut_c or cut_r)
            encoded.append(EncodedPair(i, chosen, rejected))
        return encoded

    def eval_set(self) -> list[PreferencePair]:
        """Held-out pairs whose prompts are answered by generation at validation (DPO's win rate)."""
        return self.val_pairs[: self.eval_examples]

    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(self.tokenizer.pad_id)

    def train_dataloader(self) -> DataLoader:
        # sample with replacement from a seeded generator: runs are reproducible and max_steps defines the length
        world = self.trainer.world_size if self.trainer is not None else 1
        generator = torch.Generator().manual_seed(self.seed)
        sampler = torch.utils.data.RandomSampler(
            self.train_data, replacement=True, num_samples=self.max_steps * self.batch_size * world, generator=generator
        )
        return ResumableDataLoader(
            self.train_data,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_data, batch_size=self.batch_size, collate_fn=self.collator(), num_workers=self.num_workers
        )
