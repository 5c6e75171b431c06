"""Text data: the formats it reads, the errors it gives, caching, reproducible windows, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stagelm.data.text import RandomWindows, TextDataModule, read_documents
from stagelm.errors import DataError
from stagelm.tokenizer import CharTokenizer


def test_reads_txt_folder_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first file")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_documents(tmp_path / "a.txt") == ["first file"]
    assert read_documents(tmp_path) == ["first file", "one", "two"]


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        read_documents(bad)
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected an object with a string 'text' field"):
        read_documents(bad)


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_documents(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="holds no text"):
        read_documents(tmp_path / "empty.txt")
    empty_dir = tmp_path / "d"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="no .txt"):
        read_documents(empty_dir)


def _module(tmp_path: Path, **kw) -> TextDataModule:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} of the corpus.\n" for i in range(400)))
    dm = TextDataModule(
        path=str(corpus),
        block_size=16,
        batch_size=4,
        val_fraction=0.1,
        max_steps=5,
        cache_dir=str(tmp_path / "cache"),
        **kw,
    )
    dm.set_tokenizer(CharTokenizer.train(dm.documents()))
    dm.setup("fit")
    return dm


def test_tokenises_once_into_a_memory_mapped_cache(tmp_path: Path) -> None:
    dm = _module(tmp_path)
    files = list((tmp_path / "cache").glob("tokens-*.npy"))
    assert len(files) == 1
    assert isinstance(dm.train_tokens.base, np.memmap) or isinstance(dm.train_tokens, np.memmap)
    again = _module(tmp_path)
    assert np.array_equal(np.asarray(again.train_tokens), np.asarray(dm.train_tokens))
    total = len(dm.train_tokens) + len(dm.val_tokens)
    assert len(dm.val_tokens) == total - int(total * 0.9)
    assert dm.val_chars_per_token == pytest.approx(1.0)


def test_windows_are_reproducible_and_shifted_by_one(tmp_path: Path) -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = RandomWindows(tokens, 8, 50, seed=3), RandomWindows(tokens, 8, 50, seed=3)
    x, y = a[7]
    assert (x == b[7][0]).all() and (y == x + 1).all()
    assert not all((RandomWindows(tokens, 8, 50, seed=4)[i][0] == a[i][0]).all() for i in range(5))


def test_too_short_corpus_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="fewer than block_size"):
        RandomWindows(np.arange(5, dtype=np.uint16), 8, 10, seed=0)
