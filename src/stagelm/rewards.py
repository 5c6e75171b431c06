"""Verifiable rewards for the GRPO stage: pure functions of a reply's text and the reference answer.

Each reward function has the signature `(reply: str, answer: str, **options) -> float` and is chosen and weighted
from the config by name (`REWARD_FUNCTIONS`):

- `correctness`: 1.0 when the reply's final answer equals the reference (numbers compared exactly as fractions,
  so "1,000" == "1000" and "5.0" == "5"; anything else symbolically through math-verify when it is installed);
- `format`: 1.0 for reasoning followed by a final "The answer is N." (how the built-in SFT data ends a worked
  solution), 0.5 for another clearly marked final answer, 0.0 for none (see `format_reward`);
- `length`: DAPO's soft overlong penalty (Yu et al. 2025), in characters, from 0 down to -1.

`combined_reward` sums `weight * function(reply, answer)` and never raises for a bad reply: a function that raises,
returns a non-finite value or runs past its time limit scores 0 for that reply and is counted, so one pathological
sample cannot crash or stall training, and the stage can log how often it happens (`score_batch`).

A reply is read up to its first end-of-turn token; text after it was never part of the answer.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, NamedTuple

from stagelm.tokenizer import END_OF_TURN

RewardFunction = Callable[..., float]  # (reply, answer, **options) -> float

# ----------------------------------------------------------------------------------------------------------------
# Reading the final answer
# ----------------------------------------------------------------------------------------------------------------

# A number as people write it: optional sign and dollar sign, thousands commas, decimals, an optional "/ denominator".
_NUMBER = (
    r"(?P<sign>[-+\u2212]?) ?\$? ?(?P<sign2>[-\u2212]?)"
    r"(?P<int>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?: ?/ ?(?P<den>\d+(?:\.\d+)?))?"
)
_LEADING_NUMBER = re.compile(_NUMBER)  # used with .match on stripped text
# Anywhere in running text a sign counts only when attached ("-5", not the "- 3" of "16 - 3"), and a fraction only
# when written tight ("3/4").
_ANY_NUMBER = re.compile(
    r"(?<![\w.,])(?P<sign>[-\u2212]?)\$?(?P<sign2>)(?P<int>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?:/(?P<den>\d+))?"
)
# After a leading number, these mean it was the start of an expression ("2x + 1", "5 + 3 = 8"), not the answer.
_EXPRESSION_CONTINUES = re.compile(r"[A-Za-z_\\{(^]|\s*[-+*/^=\u00d7\u00f7]")

# Markers of an explicit final answer, case-insensitive; the one written last in the reply wins.
_MARKERS = re.compile(
    r"(?P<boxed>\\(?:boxed|fbox)\s*\{)"
    r"|(?P<hashes>####)"
    r"|(?P<is>\banswer\s+is\b\s*:?)"
    r"|(?P<colon>\banswer\b(?:\*\*)? ?:(?:\*\*)?)",
    re.IGNORECASE,
)
# LaTeX spacing and escapes that decorate numbers: "1{,}000", "\$5", "50\%", "1\,000".
_DECORATIONS = [("{,}", ","), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\$", "$"), ("\\%", "%")]


def visible_reply(reply: str) -> str:
    """The reply up to its first end-of-turn token (what the model said in its turn)."""
    return reply.split(END_OF_TURN, 1)[0]


def _undecorate(text: str) -> str:
    for old, new in _DECORATIONS:
        text = text.replace(old, new)
    return text


def _format_number(match: re.Match[str]) -> str:
    """The matched number as a plain string: sign kept, commas and dollar signs dropped."""
    negative = "-" in (match["sign"] + match["sign2"]).replace("\u2212", "-")
    value = match["int"].replace(",", "")
    if match["den"]:
        value = f"{value}/{match['den']}"
    return ("-" if negative else "") + value


def _braced(text: str, start: int) -> str:
    """The content of a brace group whose `{` is just before `start` (to the end of the line if unbalanced)."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return text[start:].split("\n", 1)[0]


def _clean_segment(segment: str, _inner: bool = False) -> str | None:
    """The answer written right after a marker: its leading number if it starts with one that is not the start of an
    expression, else the rest of the sentence (an expression or a word) without math delimiters; of a chain of
    equalities ("5 + 3 = 8"), its last side."""
    segment = _undecorate(segment).strip().strip("*").strip()
    segment = re.sub(r"^(?:\\\(|\\\[)", "", segment).strip()
    number = _LEADING_NUMBER.match(segment)
    if number and not _EXPRESSION_CONTINUES.match(segment, number.end()):
        return _format_number(number)
    sentence = re.split(r"\.(?:\s|$)|\n", segment, maxsplit=1)[0]
    if "=" in sentence and not _inner:  # "5 + 3 = 8": the answer is what the working comes to
        return _clean_segment(sentence.rsplit("=", 1)[1], _inner=True)
    sentence = re.sub(r"(?:\\\)|\\\])$", "", sentence.strip()).strip(" $*.")
    return sentence or None


def _marked_answer(text: str) -> str | None:
    """The explicitly marked final answer ("\\boxed{..}", "#### ..", "The answer is ..", "Answer: .."), the last one
    in the text that yields something, or None."""
    for match in reversed(list(_MARKERS.finditer(text))):
        if match["boxed"]:
            found = _clean_segment(_braced(text, match.end()))
        else:
            found = _clean_segment(text[match.end() :].lstrip().split("\n", 1)[0])
        if found:
            return found
    return None


def extract_final_answer(text: str) -> str | None:
    """The reply's final answer as a string, or None.

    An explicitly marked answer is preferred (the last of "\\boxed{N}", "#### N", "The answer is N", "Answer: N");
    otherwise the last number in the text. Numbers come back plain: thousands commas, dollar signs and a trailing
    period dropped, sign kept ("The answer is $1,000." -> "1000", "#### -3" -> "-3"); a marked answer that is not a
    number comes back as written ("\\boxed{\\frac{1}{2}}" -> "\\frac{1}{2}") for the symbolic check.
    """
    text = visible_reply(text)
    marked = _marked_answer(text)
    if marked is not None:
        return marked
    numbers = list(_ANY_NUMBER.finditer(_undecorate(text)))
    return _format_number(numbers[-1]) if numbers else None


_DECIMAL = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d{1,3})?")
_FRACTION = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+))/([-+]?(?:\d+\.?\d*|\.\d+))")
_LATEX_FRACTION = re.compile(r"(-?)\\[dt]?frac\{\s*(-?[\d.]+)\s*\}\{\s*(-?[\d.]+)\s*\}")


def parse_number(text: str) -> Fraction | None:
    """An exact rational from a number as written ("1,000", "$5.00", "-3/4", "\\frac{1}{2}", "50%", "1e3"), else
    None. Percent signs are dropped, not divided out ("50%" -> 50), matching how word problems state answers."""
    s = _undecorate(str(text)).strip().replace("\u2212", "-").replace(" ", "")
    s = s.rstrip(".").strip("$").rstrip("%").replace(",", "")
    if s.startswith("-$") or s.startswith("+$"):
        s = s[0] + s[2:]
    if not s or len(s) > 64:  # long digit strings are not answers; also keeps int parsing cheap
        return None
    try:
        if _DECIMAL.fullmatch(s):
            return Fraction(s)
        if m := _FRACTION.fullmatch(s):
            return Fraction(m[1]) / Fraction(m[2])
        if m := _LATEX_FRACTION.fullmatch(s):
            value = Fraction(m[2]) / Fraction(m[3])
            return -value if m[1] else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


# ----------------------------------------------------------------------------------------------------------------
# Symbolic fallback (math-verify)
# ----------------------------------------------------------------------------------------------------------------

# Power towers and huge exponents/factorials make sympy compute for minutes inside C code that nothing but a signal
# can interrupt; a model can write them, so they are refused before reaching the symbolic checker.
_RISKY = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\{?\s*\(?\s*\d{4,}|\*\*|(?<!\d)\d{3,}\s*!|!\s*!")
_math_verify: Any = None  # the imported module, False when unavailable


class _DropTimeoutDisabledWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def _load_math_verify() -> Any:
    """math_verify, imported on first use (it pulls in sympy and an ANTLR LaTeX parser), or False if missing."""
    global _math_verify
    if _math_verify is None:
        try:
            import math_verify

            for name in ("math_verify.parser", "math_verify.grader"):
                logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())  # off on purpose off the main thread
            _math_verify = math_verify
        except ImportError:
            _math_verify = False
    return _math_verify


def _as_math(text: str) -> str:
    return text if "$" in text else f"${text}$"


def symbolic_equal(candidate: str, reference: str, timeout: float = 2.0) -> bool:
    """Whether two answers are the same mathematical object (math-verify: LaTeX, expressions, sets, intervals).

    On the main thread math-verify bounds each step with its own SIGALRM timeout (whole seconds, at least 1), which
    is the only thing that can interrupt a runaway sympy computation; elsewhere signals are unavailable, so it runs
    without and the `_RISKY` pre-filter is the guard. Without math-verify installed: whitespace-insensitive string
    equality.
    """
    if "".join(candidate.split()) == "".join(reference.split()):
        return True
    if len(candidate) > 300 or _RISKY.search(candidate):
        return False
    mv = _load_math_verify()
    if not mv:
        return False
    seconds = max(1, math.ceil(timeout)) if threading.current_thread() is threading.main_thread() else None
    gold = mv.parse(_as_math(reference), parsing_timeout=seconds)
    target = mv.parse(_as_math(candidate), parsing_timeout=seconds)
    return bool(gold and target and mv.verify(gold, target, timeout_seconds=seconds))


# ----------------------------------------------------------------------------------------------------------------
# Reward functions
# ----------------------------------------------------------------------------------------------------------------


def _inline(fn: RewardFunction) -> RewardFunction:
    """Mark a reward function as bounded and cheap: `combined_reward` calls it directly on the caller's thread (and
    only checks its time afterwards) instead of in a watchdog thread."""
    fn.inline = True  # type: ignore[attr-defined]
    return fn


def _reference_answer(answer: str | float) -> str:
    """The final answer from a reference that may be a bare value or a whole worked solution ("... #### 18")."""
    text = str(answer).strip()
    if parse_number(text) is not None:
        return text
    return _marked_answer(text) or text


@_inline
def correctness_reward(reply: str, answer: str | float, timeout: float = 2.0) -> float:
    """1.0 if the reply's final answer (`extract_final_answer`) equals the reference answer, else 0.0.

    Numbers are compared exactly as fractions (fast path, no symbolic algebra): "1,000" == "1000", "5.0" == "5",
    "0.5" == "1/2" == "\\frac{1}{2}". When either side is not a plain number, the symbolic check (`symbolic_equal`,
    math-verify) decides, except that a numeric reference is never matched by a candidate with no digit or LaTeX in
    it (a word, an empty marker) so garbage replies stay cheap.
    """
    candidate = extract_final_answer(reply)
    if candidate is None:
        return 0.0
    reference = _reference_answer(answer)
    gold, value = parse_number(reference), parse_number(candidate)
    if gold is not None and value is not None:
        return float(gold == value)
    if gold is not None and not re.search(r"[\d\\]", candidate):
        return 0.0
    return float(symbolic_equal(candidate, reference, timeout))


# What may follow "The answer is" at the very end of a well-formatted reply: the number and a period, nothing else.
_FINAL_TAIL = re.compile(r":? ?" + _NUMBER + r"\.?")


@_inline
def format_reward(reply: str, answer: str | float | None = None) -> float:
    """How well the reply is shaped as reasoning followed by a clearly marked final answer (the answer's value does
    not matter here; `answer` is accepted for the common signature):

    - 1.0: the reply ends with "The answer is N" (case-insensitive, optional trailing period, N a number as
      `extract_final_answer` reads it) and some reasoning comes before it: at least one letter or digit;
    - 0.5: otherwise an explicitly marked final answer exists somewhere ("The answer is ..", "#### ..",
      "\\boxed{..}", "Answer: .."), e.g. with no reasoning before it, text after it, or another marker style;
    - 0.0: no marked final answer (an unmarked last number does not count).
    """
    text = visible_reply(reply).strip()
    # Found with rfind and checked with an anchored pattern: no regex search over the whole reply can backtrack
    # badly on adversarial text (long runs of spaces or digits).
    at = text.lower().rfind("the answer is")
    if at >= 0 and _FINAL_TAIL.fullmatch(text[at + len("the answer is") :].strip()):
        if (at == 0 or not text[at - 1].isalnum()) and re.search(r"[^\W_]", text[:at]):
            return 1.0
    return 0.5 if _marked_answer(text) is not None else 0.0


@_inline
def length_penalty(
    reply: str, answer: str | float | None = None, max_chars: int = 1000, buffer_chars: int = 200
) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025), measured in characters of the visible reply (L):

    0                                   if L <= max_chars - buffer_chars
    (max_chars - buffer_chars - L) / buffer_chars   in the buffer zone (from 0 down to -1)
    -1                                  if L > max_chars
    """
    length = len(visible_reply(reply))
    start = max_chars - buffer_chars
    if length <= start:
        return 0.0
    if length > max_chars or buffer_chars <= 0:
        return -1.0
    return (start - length) / buffer_chars


REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "correctness": correctness_reward,
    "format": format_reward,
    "length": length_penalty,
}

# ----------------------------------------------------------------------------------------------------------------
# Safe composition
# ----------------------------------------------------------------------------------------------------------------


class RewardTimeout(TimeoutError):
    """A reward function ran past its time limit."""


def _call_in_thread(fn: RewardFunction, args: tuple, kwargs: dict, time_limit: float) -> float:
    """Run fn in a daemon thread and wait at most time_limit seconds. A thread that overruns is abandoned (Python
    cannot kill it); being a daemon it never blocks interpreter exit. A fresh thread per call, so one stuck call
    cannot clog a pool for the calls after it."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = error

    worker = threading.Thread(target=target, name="stagelm-reward", daemon=True)
    worker.start()
    worker.join(time_limit)
    if worker.is_alive():
        raise RewardTimeout(f"exceeded {time_limit:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def call_reward(
    fn: RewardFunction, reply: str, answer: Any, time_limit: float | None = 1.0, **options: Any
) -> tuple[float, str | None]:
    """(score, failure) for one reward function on one reply; never raises an Exception.

    failure is None on success, "timeout" when the function ran past time_limit seconds, or "error: <Type: msg>"
    when it raised or returned something that is not a finite number; the score is then 0.0. Functions marked
    inline (the built-ins, bounded by construction) run directly and are timed; any other function runs in a
    watchdog thread, so even one that never returns costs at most time_limit. time_limit=None: no limit.
    """
    start = time.perf_counter()
    try:
        if time_limit is None or getattr(fn, "inline", False):
            value = fn(reply, answer, **options)
        else:
            value = _call_in_thread(fn, (reply, answer), options, time_limit)
        if time_limit is not None and time.perf_counter() - start > time_limit:
            raise RewardTimeout(f"took {time.perf_counter() - start:.2f}s > {time_limit:g}s")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"non-finite reward {value}")
    except RewardTimeout:
        return 0.0, "timeout"
    except Exception as error:  # noqa: BLE001 - any failure of a reward function scores 0 and is counted
        return 0.0, f"error: {type(error).__name__}: {error}"
    return value, None


class RewardResult(NamedTuple):
    total: float  # sum of weight * score
    per_function: dict[str, float]  # name -> unweighted score (0.0 for a failed function)
    failures: dict[str, str]  # name -> "timeout" or "error: ..." for the functions that failed on this reply

    @property
    def errors(self) -> int:
        """How many functions raised (or returned a non-number) on this reply."""
        return sum(not f.startswith("timeout") for f in self.failures.values())

    @property
    def timeouts(self) -> int:
        """How many functions ran past their time limit on this reply."""
        return sum(f.startswith("timeout") for f in self.failures.values())


def _resolve(weights: Mapping[str, float], functions: Mapping[str, RewardFunction] | None) -> dict[str, RewardFunction]:
    table = REWARD_FUNCTIONS if functions is None else {**REWARD_FUNCTIONS, **functions}
    unknown = [name for name in weights if name not in table]
    if unknown:  # a config mistake: fail loudly at once rather than count it as a reply's error
        raise KeyError(f"unknown reward function(s) {unknown}; known: {sorted(table)}")
    return {name: table[name] for name, weight in weights.items() if weight}


def combined_reward(
    reply: str,
    answer: Any,
    weights: Mapping[str, float],
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    functions: Mapping[str, RewardFunction] | None = None,
    time_limit: float | None = 1.0,
) -> RewardResult:
    """sum(weight * function(reply, answer, **options[name])) over the named functions with a non-zero weight.

    weights: name -> weight, e.g. {"correctness": 1.0, "format": 0.1}; names come from REWARD_FUNCTIONS, or from
    `functions` (extra or replacement functions, same signature). options: name -> keyword arguments, e.g.
    {"length": {"max_chars": 400}}. Each function is guarded by `call_reward`: a failure scores 0 and is reported
    in `failures`. An unknown name raises KeyError (a configuration error, not a property of the reply).
    """
    options = options or {}
    per_function: dict[str, float] = {}
    failures: dict[str, str] = {}
    total = 0.0
    for name, fn in _resolve(weights, functions).items():
        score, failure = call_reward(fn, reply, answer, time_limit, **options.get(name, {}))
        per_function[name] = score
        if failure is not None:
            failures[name] = failure
        total += weights[name] * score
    return RewardResult(total, per_function, failures)


@dataclass
class BatchRewards:
    totals: list[float]  # one per reply
    per_function: dict[str, list[float]]  # name -> one unweighted score per reply
    errors: int = 0  # (reply, function) calls that raised
    timeouts: int = 0  # (reply, function) calls that ran past the time limit
    first_failure: str | None = None  # e.g. "format: error: ValueError: ...", for the log
    failures_by_function: dict[str, int] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        """Mean score per function (and "total"), for logging."""
        out = {name: sum(v) / len(v) for name, v in self.per_function.items() if v}
        if self.totals:
            out["total"] = sum(self.totals) / len(self.totals)
        return out


def score_batch(
    replies: Sequence[str],
    answers: Sequence[Any],
    weights: Mapping[str, float],
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    functions: Mapping[str, RewardFunction] | None = None,
    time_limit: float | None = 1.0,
) -> BatchRewards:
    """`combined_reward` over a batch (replies[i] against answers[i]), with the failures counted for logging."""
    if len(replies) != len(answers):
        raise ValueError(f"{len(replies)} replies but {len(answers)} answers")
    names = list(_resolve(weights, functions))
    batch = BatchRewards(totals=[], per_function={name: [] for name in names})
    for reply, answer in zip(replies, answers):
        result = combined_reward(reply, answer, weights, options=options, functions=functions, time_limit=time_limit)
        batch.totals.append(result.total)
        for name in names:
            batch.per_function[name].append(result.per_function[name])
        batch.errors += result.errors
        batch.timeouts += result.timeouts
        for name, failure in result.failures.items():
            batch.failures_by_function[name] = batch.failures_by_function.get(name, 0) + 1
            if batch.first_failure is None:
                batch.first_failure = f"{name}: {failure}"
    return batch
