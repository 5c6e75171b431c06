"""Raw-text data for pre-training: read a .txt file, a folder of text files, or JSONL with a `text` field (or,
with no path, the built-in small-world corpus), tokenise it once into a cached memory-mapped array, and serve
reproducible random windows for training and fixed windows of a held-out tail for validation."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stagelm.data.jsonl import iter_jsonl
from stagelm.data.resumable import ResumableDataLoader
from stagelm.errors import DataError
from stagelm.tokenizer import BOS, Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def read_documents(path: str | os.PathLike | None, builtin_chars: int = 3_000_000, seed: int = 0) -> list[str]:
    """The documents of a corpus: one per .txt file, one per JSONL line, or the built-in corpus' paragraphs."""
    if path is None or str(path) == "":
        from stagelm.data.world import pretrain_corpus

        return [doc for doc in pretrain_corpus(seed=seed, n_chars=builtin_chars).split("\n\n") if doc.strip()]
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path does not exist: {p}")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES) if p.is_dir() else [p]
    if not files:
        raise DataError(f"no {'/'.join(TEXT_SUFFIXES)} files under {p}")
    docs: list[str] = []
    for f in files:
        docs.extend(_read_jsonl_texts(f) if f.suffix == ".jsonl" else [f.read_text(encoding="utf-8")])
    if not any(d.strip() for d in docs):
        raise DataError(f"data path {p} holds no text")
    return docs


def _read_jsonl_texts(path: Path) -> list[str]:
    texts = []
    for where, record in iter_jsonl(path):
        if not isinstance(record.get("text"), str):
            raise DataError(f"{where}: expected an object with a string 'text' field")
        texts.append(record["text"])
    return texts


def _source_fingerprint(path: str | None, builtin_chars: int, seed: int) -> str:
    h = hashlib.sha256()
    if not path:
        from stagelm.data import world

        # the generator's source is part of the key: editing it must invalidate cached tokens
        h.update(f"builtin:{builtin_chars}:{seed}:".encode() + Path(world.__file__).read_bytes())
        return h.hexdigest()
    p = Path(path).expanduser().resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def tokenize_to_cache(docs: list[str], tokenizer: Tokenizer, cache_file: Path) -> np.ndarray:
    """Tokenise documents (BOS before each) once; later runs memory-map the saved array."""
    if cache_file.exists():
        return np.load(cache_file, mmap_mode="r")
    ids = tokenizer.encode("".join(BOS + d for d in docs))
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32
    arr = np.asarray(ids, dtype=dtype)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, cache_file)
    return np.load(cache_file, mmap_mode="r")


class RandomWindows(Dataset):
    """Item i is a window at an offset drawn from (seed, i): reproducible, and a resumed run (which skips the
    batches already served, `ResumableDataLoader`) continues the sequence instead of replaying it."""

    def __init__(self, tokens: np.ndarray, block_size: int, length: int, seed: int) -> None:
        if len(tokens) <= block_size + 1:
            raise DataError(f"training split has {len(tokens)} tokens, fewer than block_size + 2 = {block_size + 2}")
        self.tokens, self.block_size, self.length, self.seed = tokens, block_size, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, i))
        offset = int(rng.integers(0, len(self.tokens) - self.block_size - 1))
        window = torch.from_numpy(self.tokens[offset : offset + self.block_size + 1].astype(np.int64))
        return window[:-1], window[1:]


class FixedWindows(Dataset):
    """Non-overlapping windows from the start of the validation split: the same every evaluation."""

    def __init__(self, tokens: np.ndarray, block_size: int, max_windows: int) -> None:
        self.tokens, self.block_size = tokens, block_size
        self.count = min(max_windows, (len(tokens) - 1) // block_size)
        if self.count < 1:
            raise DataError(f"validation split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.block_size
        window = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return window[:-1], window[1:]


class TextDataModule(L.LightningDataModule):
    """Pre-training data. Call `documents()` to train a tokenizer, `set_tokenizer()`, then hand it to a Trainer."""

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        val_windows: int = 256,
        max_steps: int = 1000,
        seed: int = 0,
        builtin_chars: int = 3_000_000,
        cache_dir: str = ".cache/stagelm",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1")
        self.path, self.block_size, self.batch_size = path, block_size, batch_size
        self.val_fraction, self.val_windows, self.max_steps, self.seed = val_fraction, val_windows, max_steps, seed
        self.builtin_chars, self.cache_dir, self.num_workers = builtin_chars, Path(cache_dir), num_workers
        self.tokenizer: Tokenizer | None = None
        self._docs: list[str] | None = None
        self.train_tokens: np.ndarray | None = None
        self.val_tokens: np.ndarray | None = None
        self.val_chars_per_token = 1.0

    def documents(self) -> list[str]:
        if self._docs is None:
            self._docs = read_documents(self.path, self.builtin_chars, self.seed)
        return self._docs

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_tokens is not None:
            return
        if self.tokenizer is None:
            raise RuntimeError("TextDataModule.set_tokenizer() must be called before setup()")
        tok_hash = hashlib.sha256(json.dumps(self.tokenizer.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
        key = _source_fingerprint(self.path, self.builtin_chars, self.seed)[:16]
        cache_file = self.cache_dir / f"tokens-{key}-{tok_hash}.npy"
        tokens = tokenize_to_cache(self.documents() if not cache_file.exists() else [], self.tokenizer, cache_file)
        split = int(len(tokens) * (1 - self.val_fraction))
        self.train_tokens, self.val_tokens = tokens[:split], tokens[split:]
        val_text = self.tokenizer.decode(self.val_tokens[:200_000].tolist(), skip_special=True)
        self.val_chars_per_token = max(len(val_text), 1) / min(len(self.val_tokens), 200_000)

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        length = self.max_steps * self.batch_size * accumulate * world
        dataset = RandomWindows(self.train_tokens, self.block_size, length, self.seed)
        return ResumableDataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        dataset = FixedWindows(self.val_tokens, self.block_size, self.val_windows)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)
