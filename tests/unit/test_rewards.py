"""Verifiable rewards: answer extraction and comparison by hand, the format levels, failure counting, and every
GSM8K test solution graded against its own final answer."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import pytest

from stagelm.rewards import (
    REWARD_FUNCTIONS,
    call_reward,
    combined_reward,
    correctness_reward,
    extract_final_answer,
    format_reward,
    length_penalty,
    parse_number,
    score_batch,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12 + 7 = 19. 19 - 5 = 14. The answer is 14.", "14"),
        ("The answer is 14.<|end|> and then 99", "14"),  # nothing after the end of the turn counts
        ("He pays $1,000 in total.\n#### 1,000", "1000"),
        ("The answer is $1,234.50.", "1234.50"),
        ("#### -3", "-3"),
        ("Answer: 42", "42"),
        ("**Answer:** 42 apples", "42"),
        ("The final answer is: 3/4.", "3/4"),
        ("so \\boxed{\\frac{1}{2}} is it", "\\frac{1}{2}"),
        ("\\boxed{18 \\text{ dollars}}", "18"),
        ("The answer is 5 + 3 = 8.", "8"),  # a chain of equalities: its last side
        ("Answer: 2x+1", "2x+1"),  # an expression is kept whole, not cut to its leading "2"
        ("The answer is 5. Wait, no: \\boxed{6}", "6"),  # the last marked answer wins
        ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars", "18"),  # no marker: the last number
        ("10 - 5", "5"),  # a spaced minus is subtraction, not a sign
        ("x = -5", "-5"),
        ("ratio 3/4", "3/4"),
        ("It costs $5.50.", "5.50"),
        ("no numbers at all", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,000", Fraction(1000)),
        ("$5.00", Fraction(5)),
        ("5.0", Fraction(5)),
        ("-3/4", Fraction(-3, 4)),
        ("\\frac{1}{2}", Fraction(1, 2)),
        ("-\\frac{1}{2}", Fraction(-1, 2)),
        ("50%", Fraction(50)),
        ("1e3", Fraction(1000)),
        ("7.", Fraction(7)),
        ("-$5", Fraction(-5)),
        ("1/0", None),
        ("2x", None),
        ("1" * 100, None),  # absurdly long: not an answer
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    "reply, answer, expected",
    [
        ("The answer is 1,000.", "1000", 1.0),
        ("The answer is 1000.", "1,000", 1.0),
        ("#### 5.0", "5", 1.0),
        ("The answer is 0.5.", "1/2", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("The answer is 18.", 18, 1.0),  # a numeric reference from the data generator
        ("The answer is 19.", "18", 0.0),
        ("The answer is 18.5.", "18", 0.0),
        ("I do not know.", "18", 0.0),
        ("The answer is eighteen.", "18", 0.0),
        ("Step 1. 9 * 2 = 18", "Janet sells 9 eggs.\n#### 18", 1.0),  # a whole worked solution as the reference
        ("The answer is 14.<|end|>", "14", 1.0),
    ],
)
def test_correctness_reward(reply, answer, expected):
    assert correctness_reward(reply, answer) == expected


def test_correctness_symbolic_fallback():
    pytest.importorskip("math_verify")
    assert correctness_reward("\\boxed{(x+1)^2}", "x^2+2x+1") == 1.0
    assert correctness_reward("The answer is \\sqrt{2}.", "2^{1/2}") == 1.0
    assert correctness_reward("\\boxed{(x+1)^3}", "x^2+2x+1") == 0.0
    # a power tower would keep sympy busy for minutes: refused up front, and quickly
    start = time.perf_counter()
    assert correctness_reward("\\boxed{9^{9^{9}}}", "3") == 0.0
    assert time.perf_counter() - start < 1.0


def test_symbolic_fallback_off_the_main_thread():
    # math-verify's own timeouts use SIGALRM, which only the main thread may set: elsewhere they are switched off
    pytest.importorskip("math_verify")
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(correctness_reward, "\\boxed{(x+1)^2}", "x^2+2x+1").result(timeout=30) == 1.0


ADVERSARIAL = [
    "The answer is" + " " * 20000 + "x",
    "a " * 10000 + "The answer is " + "1" * 20000,
    "1," * 20000,
    "#### " + " " * 20000 + ".",
    "\\boxed{" * 5000,
    "- " + " " * 20000 + "x",
    "Answer" + " " * 20000 + ":",
    "answer is " * 5000,
    "9" * 20000 + "/" + "9" * 20000,
    "9" * 250 + "!" * 20000,
    "The answer is -" + " " * 20000 + "5",
]


def test_adversarial_replies_are_scored_quickly():
    correctness_reward("\\boxed{x}", "y")  # math-verify's import (half a second) is not what is measured
    start = time.perf_counter()
    for reply in ADVERSARIAL:
        for name in REWARD_FUNCTIONS:
            REWARD_FUNCTIONS[name](reply, "5")
    assert time.perf_counter() - start < 2.0


def test_format_reward_levels():
    worked = "12 + 7 = 19. 19 - 5 = 14. The answer is 14."
    assert format_reward(worked) == 1.0
    assert format_reward(worked + "<|end|>") == 1.0
    assert format_reward("Adding them gives 3,000 in all. the answer is $3,000") == 1.0  # case, no period
    assert format_reward("The answer is 14.") == 0.5  # no reasoning before the marker
    assert format_reward("The answer is 14. Hope that helps!") == 0.5  # the marker is not the end
    assert format_reward("19 - 5 = 14\n#### 14") == 0.5  # another marker style
    assert format_reward("19 - 5 = 14, so \\boxed{14}") == 0.5
    assert format_reward("19 - 5 = 14") == 0.0  # an unmarked number is no final answer
    assert format_reward("") == 0.0


def test_length_penalty_by_hand():
    # max 100, buffer 20: free up to 80 characters, then linear to -1 at 100, -1 beyond
    assert length_penalty("x" * 80, None, max_chars=100, buffer_chars=20) == 0.0
    assert length_penalty("x" * 90, None, max_chars=100, buffer_chars=20) == pytest.approx(-0.5)  # (80 - 90) / 20
    assert length_penalty("x" * 100, None, max_chars=100, buffer_chars=20) == pytest.approx(-1.0)
    assert length_penalty("x" * 101, None, max_chars=100, buffer_chars=20) == -1.0
    assert length_penalty("x" * 50 + "<|end|>" + "y" * 500, None, max_chars=100, buffer_chars=20) == 0.0


def test_combined_reward_weights_and_options():
    reply = "12 + 7 = 19. 19 - 5 = 14. The answer is 14."  # 43 characters
    result = combined_reward(reply, "14", {"correctness": 1.0, "format": 0.1})
    assert result.total == pytest.approx(1.1)
    assert result.per_function == {"correctness": 1.0, "format": 1.0}
    assert result.failures == {} and result.errors == 0 and result.timeouts == 0
    # wrong answer, with a length penalty: 43 chars with max 48, buffer 10 -> (38 - 43) / 10 = -0.5, weight 0.5
    result = combined_reward(
        reply,
        "15",
        {"correctness": 1.0, "format": 0.1, "length": 0.5},
        options={"length": {"max_chars": 48, "buffer_chars": 10}},
    )
    assert result.per_function == {"correctness": 0.0, "format": 1.0, "length": -0.5}
    assert result.total == pytest.approx(0.1 - 0.25)
    # zero weights are not even called; unknown names are a configuration error
    assert combined_reward(reply, "14", {"correctness": 1.0, "format": 0.0}).per_function == {"correctness": 1.0}
    with pytest.raises(KeyError, match="known"):
        combined_reward(reply, "14", {"corectness": 1.0})
    assert set(REWARD_FUNCTIONS) == {"correctness", "format", "length"}


def _raises(reply: str, answer: str) -> float:
    raise RuntimeError("boom")


def _slow(reply: str, answer: str) -> float:
    time.sleep(2.0)
    return 1.0


def _not_a_number(reply: str, answer: str) -> float:
    return float("nan")


def _slow_inline(reply: str, answer: str) -> float:
    time.sleep(0.1)
    return 1.0


_slow_inline.inline = True  # type: ignore[attr-defined]  # trusted to return: timed after the fact


def test_failing_reward_functions_score_zero_and_are_counted():
    functions = {"raises": _raises, "slow": _slow, "nan": _not_a_number, "slow_inline": _slow_inline}
    weights = {"correctness": 1.0, "raises": 1.0, "slow": 1.0, "nan": 1.0, "slow_inline": 1.0}
    start = time.perf_counter()
    result = combined_reward("The answer is 14.", "14", weights, functions=functions, time_limit=0.05)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0  # the 2-second function was abandoned at its limit, not waited for
    assert result.per_function == {"correctness": 1.0, "raises": 0.0, "slow": 0.0, "nan": 0.0, "slow_inline": 0.0}
    assert result.total == 1.0
    assert result.failures["raises"] == "error: RuntimeError: boom"
    assert result.failures["nan"].startswith("error: ValueError")
    assert result.failures["slow"] == result.failures["slow_inline"] == "timeout"
    assert (result.errors, result.timeouts) == (2, 2)


def test_call_reward_without_limit_and_score_batch_counts():
    assert call_reward(_slow_inline, "x", "1", time_limit=None) == (1.0, None)
    assert call_reward(format_reward, "The answer is 1.", "1") == (0.5, None)
    batch = score_batch(
        ["9 * 2 = 18. The answer is 18.", "The answer is 17.", "nothing"],
        ["18", "18", "18"],
        {"correctness": 1.0, "format": 0.5, "raises": 1.0},
        functions={"raises": _raises},
    )
    assert batch.totals == [1.5, 0.25, 0.0]
    assert batch.per_function["correctness"] == [1.0, 0.0, 0.0]
    assert batch.errors == 3 and batch.timeouts == 0
    assert batch.failures_by_function == {"raises": 3}
    assert batch.first_failure == "raises: error: RuntimeError: boom"
    assert batch.means()["total"] == pytest.approx(1.75 / 3)
    with pytest.raises(ValueError):
        score_batch(["a"], [], {"format": 1.0})


def _gsm8k_path() -> Path:
    shared = os.environ.get("STAGELM_SHARED_DATA")
    if shared:
        return Path(shared) / "gsm8k_test.jsonl"
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k_test.jsonl"


def test_every_gsm8k_gold_solution_grades_correct_and_an_altered_one_wrong():
    path = _gsm8k_path()
    if not path.exists():
        pytest.skip(f"{path} not present")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) > 1000
    start = time.perf_counter()
    wrong_accepted, right_rejected = [], []
    for row in rows:
        solution = row["answer"]
        body, last = solution.rstrip().rsplit("\n", 1)
        assert last.startswith("#### ")
        final = last[len("#### ") :].strip()  # e.g. "18", "1,450,000", "-10"
        if correctness_reward(solution, final) != 1.0:
            right_rejected.append((final, solution[-80:]))
        altered = parse_number(final) + 1
        altered_text = str(altered.numerator) if altered.denominator == 1 else str(float(altered))
        if correctness_reward(f"{body}\n#### {altered_text}", final) != 0.0:
            wrong_accepted.append((final, altered_text))
    assert not right_rejected, right_rejected[:5]
    assert not wrong_accepted, wrong_accepted[:5]
    assert time.perf_counter() - start < 10.0
