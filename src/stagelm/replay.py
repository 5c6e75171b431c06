"""SFT replay for the RL stages: while PPO or GRPO optimise their reward, the policy keeps a language-modelling loss
on SFT-style conversations (InstructGPT's "PPO-ptx", Ouyang et al. 2022, with SFT data in place of pre-training
text).

The RL prompts are single questions: the skills SFT taught elsewhere (tool calls and the use of their results,
later turns of a conversation, system prompts) get no reward signal there and drift as the policy moves; measured on
the demo, PPO and GRPO ended below SFT's held-out exact match in some seeds (docs/results.md). Replay anchors them.

Batches are drawn with replacement from a generator seeded by (seed, step, index), so a resumed run replays exactly
the batches it would have, with no state to save. Built-in data: the small world's training conversations with
canonical replies (the preferred style, so replay does not teach back the habits preference tuning removes); or a
JSONL file in any of SFT's formats.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stagelm.data.instruct import (
    IGNORE_INDEX,
    SFTCollator,
    builtin_conversations,
    encode_conversations,
    read_conversations,
)
from stagelm.errors import ConfigError, DataError
from stagelm.losses import assistant_nll
from stagelm.model import Transformer
from stagelm.tokenizer import Tokenizer


class SFTReplay:
    def __init__(
        self,
        tokenizer: Tokenizer,
        coef: float = 0.0,
        batch_size: int = 8,
        path: str | None = None,
        builtin_examples: int = 4000,
        max_length: int = 320,
        seed: int = 0,
    ) -> None:
        if coef < 0:
            raise ConfigError(f"stage.replay.coef must be >= 0, found {coef}")
        if batch_size < 1:
            raise ConfigError(f"stage.replay.batch_size must be >= 1, found {batch_size}")
        self.coef, self.batch_size, self.seed = coef, batch_size, seed
        self.examples: list[tuple[list[int], list[bool]]] = []
        self.truncated = 0
        self.collate = SFTCollator(tokenizer.pad_id)
        if coef == 0:
            return  # off: no data to build
        conversations = (
            read_conversations(path) if path else builtin_conversations("train", builtin_examples, seed, 1.0)
        )
        self.examples, self.truncated = encode_conversations(tokenizer, conversations, max_length)
        if not self.examples:
            raise DataError(f"replay: no conversation with an assistant turn in {path or 'the built-in data'}")

    @property
    def enabled(self) -> bool:
        return self.coef > 0

    def batch(self, step: int, index: int = 0) -> dict[str, Tensor]:
        """The replay batch of optimizer step `step` (and its `index`-th update within the step): input_ids and
        labels [batch_size, T], labels IGNORE_INDEX outside the assistant's tokens."""
        generator = torch.Generator().manual_seed(hash((self.seed, step, index)) % 2**63)
        rows = torch.randint(len(self.examples), (self.batch_size,), generator=generator).tolist()
        return self.collate([self.examples[r] for r in rows])

    def loss(self, model: Transformer, step: int, index: int = 0) -> Tensor:
        """The policy's mean cross-entropy on the assistant tokens of that batch (unweighted: times `coef` is the
        stage's business)."""
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in self.batch(step, index).items()}
        return assistant_nll(model(batch["input_ids"]).logits, batch["labels"], IGNORE_INDEX)
