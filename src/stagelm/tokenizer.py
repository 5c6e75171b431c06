"""Character-level and byte-level BPE tokenizers behind one interface.

Both reserve the same special tokens at ids 0..len(SPECIAL_TOKENS)-1 from the start (BOS/EOS/PAD/UNK and the
chat roles and tool-call delimiters), so no later stage ever resizes the vocabulary. Special-token strings in
the text are encoded as their single ids. A tokenizer serialises to a plain dict that every checkpoint carries.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from typing import Any

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
SYSTEM, USER, ASSISTANT, TOOL = "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"
END_OF_TURN = "<|end|>"
TOOL_CALL_START, TOOL_CALL_END = "<|tool_call|>", "<|/tool_call|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK, SYSTEM, USER, ASSISTANT, TOOL, END_OF_TURN, TOOL_CALL_START, TOOL_CALL_END]
_SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


class Tokenizer:
    """Interface shared by both kinds: encode/decode, vocab_size, and the special ids by name."""

    kind: str

    def __init__(self) -> None:
        self.special_ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.unknown_count = 0  # characters seen at encode time that are not in the vocabulary

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def bos_id(self) -> int:
        return self.special_ids[BOS]

    @property
    def eos_id(self) -> int:
        return self.special_ids[EOS]

    @property
    def pad_id(self) -> int:
        return self.special_ids[PAD]

    @property
    def unk_id(self) -> int:
        return self.special_ids[UNK]

    @property
    def reply_stop_ids(self) -> list[int]:
        """The tokens that end an assistant reply: `<|end|>` (the end of its turn) or end of text."""
        return [self.special_ids[END_OF_TURN], self.eos_id]

    def token_id(self, special: str) -> int:
        return self.special_ids[special]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _SPECIAL_PATTERN.split(text):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
            elif piece:
                ids.extend(self._encode_plain(piece))
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        raise NotImplementedError

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def from_dict(state: dict[str, Any]) -> Tokenizer:
        if state.get("kind") == "char":
            return CharTokenizer(state["chars"])
        if state.get("kind") == "bpe":
            return BPETokenizer(state["json"])
        raise ValueError(f"unknown tokenizer kind {state.get('kind')!r} (expected 'char' or 'bpe')")


class CharTokenizer(Tokenizer):
    """One id per character of the training corpus, after the special tokens."""

    kind = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        super().__init__()
        self.chars = sorted(set(chars))
        self._stoi = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(self.chars)}
        self._itos = SPECIAL_TOKENS + self.chars

    @classmethod
    def train(cls, texts: Iterable[str], include_ascii: bool = True) -> CharTokenizer:
        chars: set[str] = set(string.printable) - set("\x0b\x0c\r") if include_ascii else set()
        for text in texts:
            chars.update(text)
        return cls(chars)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def _encode_plain(self, text: str) -> list[int]:
        stoi, unk = self._stoi, self.unk_id
        ids = [stoi.get(c, unk) for c in text]
        self.unknown_count += sum(1 for c in text if c not in stoi)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        n_special = len(SPECIAL_TOKENS)
        return "".join(self._itos[i] for i in ids if not (skip_special and i < n_special))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "char", "chars": "".join(self.chars)}


class BPETokenizer(Tokenizer):
    """Byte-level BPE trained with Hugging Face `tokenizers`; bytes never go unknown."""

    kind = "bpe"

    def __init__(self, json_str: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        super().__init__()
        self._json = json_str
        self._tok = HFTokenizer.from_str(json_str)
        for tok, i in self.special_ids.items():
            if self._tok.token_to_id(tok) != i:
                raise ValueError(f"BPE tokenizer does not reserve {tok} at id {i}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok.to_str())

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def _encode_plain(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if any(_SPECIAL_PATTERN.search(t) for t in texts):
            return [self.encode(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        # decode specials one by one: the byte-level decoder would otherwise glue them to their neighbours
        out, run = [], []
        for i in ids:
            if i < len(SPECIAL_TOKENS):
                out.append(self._tok.decode(run, skip_special_tokens=False))
                run = []
                if not skip_special:
                    out.append(SPECIAL_TOKENS[i])
            else:
                run.append(i)
        out.append(self._tok.decode(run, skip_special_tokens=False))
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "bpe", "json": self._json}


def train_tokenizer(kind: str, texts: list[str], vocab_size: int = 2048, include_ascii: bool = True) -> Tokenizer:
    """Build the tokenizer named by the `tokenizer` config group from the training texts."""
    if kind == "char":
        return CharTokenizer.train(texts, include_ascii=include_ascii)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size=vocab_size)
    raise ValueError(f"tokenizer.kind={kind!r}: expected 'char' or 'bpe'")
