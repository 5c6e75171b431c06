"""Reading answers out of replies: exact match and format checks, on replies written out by hand."""

from __future__ import annotations

from stagelm.evaluation import answer_correct, format_ok, last_number


def test_last_number() -> None:
    assert last_number("23 + 48 = 71.") == "71"
    assert last_number("It costs 1,250 coins.") == "1250"
    assert last_number("-5 and 3.0") == "3"
    assert last_number("no digits") is None


def test_answer_correct_numeric_text_and_reference() -> None:
    assert answer_correct("23 + 48 = 71.<|end|>", "71", "")
    assert not answer_correct("23 + 48 = 72.<|end|>", "71", "")
    assert not answer_correct("<|end|>", "71", "")
    assert answer_correct("seventy-one.<|end|>", "seventy-one", "")
    assert not answer_correct("     ", "seventy-one", "")  # no number must not match a word answer
    assert answer_correct("3, 4, 5, 6, 7.<|end|>", "3, 4, 5, 6, 7", "")
    assert answer_correct("Hello  there<|end|>", None, "Hello there")


def test_format_ok() -> None:
    assert format_ok("23 + 48 = 71.<|end|>")
    assert not format_ok("23 + 48 = 71.")  # never ended its turn
    assert not format_ok("<|end|>")  # empty
    assert not format_ok("71 <|user|> more<|end|>")  # stray special token
    assert format_ok('<|tool_call|>call_0 calculator {"expression": "2*3"}<|/tool_call|><|end|>')
    assert not format_ok("<|tool_call|>call_0 calculator {bad<|/tool_call|><|end|>")
