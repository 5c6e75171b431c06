"""Tokenizers: round trips, reserved special ids, unknown characters counted, serialisation."""

from __future__ import annotations

import pytest

from stagelm.tokenizer import (
    ASSISTANT,
    BOS,
    END_OF_TURN,
    EOS,
    SPECIAL_TOKENS,
    TOOL_CALL_START,
    USER,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    train_tokenizer,
)

CORPUS = ["seven plus five is twelve. 23 + 48 = 71.\n", "Tom has 12 apples. He buys 7 more."] * 20


@pytest.fixture(params=["char", "bpe"])
def tokenizer(request) -> Tokenizer:
    return train_tokenizer(request.param, CORPUS, vocab_size=300)


def test_round_trip_plain_and_chat_text(tokenizer: Tokenizer) -> None:
    for text in ["seven plus five is twelve", f"{USER}What is 2 + 3?{END_OF_TURN}{ASSISTANT}5{END_OF_TURN}", "a\nb  c"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_reserved_at_the_same_ids(tokenizer: Tokenizer) -> None:
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tokenizer.encode(special) == [i]
    assert (tokenizer.bos_id, tokenizer.eos_id) == (0, 1)
    assert tokenizer.encode(f"{BOS}hi{EOS}")[0] == 0 and tokenizer.encode(f"{BOS}hi{EOS}")[-1] == 1
    assert tokenizer.decode(tokenizer.encode(f"{TOOL_CALL_START}x"), skip_special=True) == "x"


def test_char_vocabulary_and_unknowns() -> None:
    tok = CharTokenizer.train(["abc"], include_ascii=False)
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 3
    assert tok.encode("abca") == [11, 12, 13, 11]
    ids = tok.encode("abzé")
    assert ids == [11, 12, tok.unk_id, tok.unk_id]
    assert tok.unknown_count == 2


def test_char_tokenizer_includes_printable_ascii_by_default() -> None:
    tok = CharTokenizer.train(["abc"])
    tok.encode('{"name": "calculator", "x": [1, 2]}~')
    assert tok.unknown_count == 0


def test_bpe_never_unknown_and_merges() -> None:
    tok = BPETokenizer.train(CORPUS, vocab_size=300)
    text = "seven plus five"
    assert len(tok.encode(text)) < len(text)  # merges learned
    assert tok.decode(tok.encode("naïve café ☕")) == "naïve café ☕"


def test_serialisation_round_trip(tokenizer: Tokenizer) -> None:
    again = Tokenizer.from_dict(tokenizer.to_dict())
    text = f"{USER}Tom has 12 apples{END_OF_TURN}"
    assert again.encode(text) == tokenizer.encode(text)
    assert again.vocab_size == tokenizer.vocab_size


def test_unknown_kind_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="tokenizer.kind='wordpiece'"):
        train_tokenizer("wordpiece", CORPUS)
