"""The built-in "small world": one seeded, stdlib-only generator for all four kinds of training data.

Every stage of stagelm can train on data about the same few things (small numbers, their words, sums and
differences, short stories about apples and pencils), so each stage visibly builds on the last:

- ``pretrain_corpus``: raw English-ish text (facts in digits and words, worked solutions, counting, number
  words, simple sentences), documents separated by a blank line;
- ``instruction_examples``: chat records (OpenAI message shape) in seven families, with a realistic share
  of chatty, terse, verbose, badly formatted and wrong replies (``STYLE_MIX``), and ``calculator`` tool calls;
- ``preference_examples``: a prompt with a reply that follows the rule (correct, concise, well formed) and
  one that breaks it; ``judge`` scores any reply by the same rule;
- ``math_problems``: multi-step problems with exact integer answers and difficulty levels, for GRPO.

Held-out data is disjoint from training by one global rule: an arithmetic item is identified by its
operands, ``(a, op, b)`` (``+`` and ``*`` ignore operand order), and a stable hash of that key (blake2b, not
Python's salted ``hash``) puts about 10% of items in "val". Everything generated for "train", the pre-training
corpus included, uses only train items, so a held-out question was never seen in any form: not as a fact,
not as a step of a worked solution, not in words. The same rule covers the other kinds of item: a multi-step
problem is keyed by its whole chain (and a train chain needs every step and sub-chain to be train), a
number-words item (numbers >= 100) by its number, a formatting task by its (start, stop, step).

Canonical replies (the "preference rule"; the answer is always easy to extract):

- one-operation questions (``add``, ``sub``, ``tool``): ``"23 + 48 = 71."`` (the answer is the last number);
- problems (``word_problem``, ``multi_step``): one equation per step, then the answer sentence:
  ``"12 + 7 = 19. 19 - 5 = 14. The answer is 14."``;
- ``words``: the number in words and a full stop: ``"seventy-one."``;
- ``format``: the list, comma separated, and a full stop: ``"3, 4, 5, 6, 7."``.

See docs/small_world.md for the record shapes and examples.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stagelm.chat import render as render_chat
from stagelm.tokenizer import SPECIAL_TOKENS
from stagelm.tools import CALCULATOR_SCHEMA, CONVERTER_SCHEMA, UNIT_FACTORS, evaluate_arithmetic
from stagelm.tools import convert as convert_units

VAL_FRACTION = 0.1
SPLITS = ("train", "val")
# "tool_error" is not drawn on its own: it is a conversion whose units do not convert (TOOL_ERROR_RATE of them)
INSTRUCTION_FAMILIES = (
    "add", "sub", "words", "word_problem", "multi_step", "format", "tool", "convert", "two_calls", "tool_error",
)  # fmt: skip
PREFERENCE_RULES = ("correct", "concise", "well_formed")
STYLES = ("canonical", "verbose", "chatty", "terse", "bad_format", "wrong")

# Default mixtures. Two-digit addition and subtraction dominate because they are the skill the learning tests
# measure; the rest gives SFT, the reward model and GRPO something of every kind.
INSTRUCTION_MIX = {
    "add": 0.2,
    "sub": 0.2,
    "words": 0.1,
    "word_problem": 0.1,
    "multi_step": 0.2,
    "format": 0.08,
    "tool": 0.12,
    "convert": 0.06,
    "two_calls": 0.04,
}
PREFERENCE_MIX = {"add": 0.2, "sub": 0.2, "words": 0.12, "word_problem": 0.12, "multi_step": 0.24, "format": 0.12}

# The SFT replies' styles, per family: as in real instruction data, only some follow the rule, and the off-rule
# habits are common enough that the SFT policy keeps them (its greedy reply is the habit, not the rule), so the
# later stages have something to fix:
# - short questions mostly get a chatty opener ("Sure, happy to help with that! 39 + 81 = 120."): correct, but
#   not concise; preference tuning (RM + PPO, DPO) should remove it. 70%, so that greedy decoding keeps it: at 50%
#   the demo's SFT model opened 2.5% of its greedy replies with it (seed 0), leaving PPO and DPO nothing to win but
#   arithmetic (PPO win rate 0.53/0.515/0.495 over seeds 0/1/2); at 70%, 37% and PPO 0.645/0.565/0.695 (with GAE
#   lambda 1);
# - multi-step problems often get a bare answer with no working ("The answer is 14."): concise, but a small model
#   that answers without working is mostly wrong, so GRPO's verifier should teach it to show its work.
STYLE_MIX: dict[str, dict[str, float]] = {
    "short": {"canonical": 0.13, "chatty": 0.7, "verbose": 0.07, "bad_format": 0.05, "wrong": 0.05},
    "worked": {"canonical": 0.4, "terse": 0.45, "verbose": 0.05, "bad_format": 0.05, "wrong": 0.05},
    # no "wrong": a reply that contradicts the calculator's result in context is not a habit to teach
    "tool": {"canonical": 0.75, "verbose": 0.16, "bad_format": 0.09},
}
_STYLE_GROUP = {
    "add": "short",
    "sub": "short",
    "words": "short",
    "format": "short",
    "word_problem": "worked",
    "multi_step": "worked",
    "tool": "tool",
}
CHATTY_OPENER = "Sure, happy to help with that!"

# Conversations (see "Conversations" below). Tools are in context for TOOL_OFFER_RATE of the conversations that
# need none, so "tools present" never means "call one"; the assistant calls only where the world says so.
TURNS_MIX = {1: 0.6, 2: 0.25, 3: 0.1, 4: 0.05}
FOLLOW_UP_RATE = 0.6  # a later turn refers back to the one before ("And 35?", "Now subtract 7 from that.")
TOOL_OFFER_RATE = 0.6
TOOL_ERROR_RATE = 0.1  # of conversions: units that do not convert, reported honestly
# A system prompt changes the reply, but the assistant still writes its working before an answer it computes:
# "Answer in words." gets "54 + 91 = 145, in words one hundred forty-five." and "Reply with the number only." is
# for answers a tool gives (the result copied), never for sums done in the head. Measured on the demo (seeds 0/1/2,
# the same pre-trained models): with both prompts asking for the bare answer ("one hundred forty-five.", "145.") on
# two-digit sums and differences, the SFT model got 0.10 of those conversations right against 0.52 of the others,
# and exact match 0.46/0.405/0.425 overall; with the working written first, 0.595/0.575/0.475.
SYSTEM_PROMPTS = {"words": "Answer in words.", "number": "Reply with the number only."}
SYSTEM_MIX = {None: 0.8, "words": 0.1, "number": 0.1}
_SYSTEM_FAMILIES = {"words": ("add", "sub"), "number": ("tool", "convert")}
# rendered with its tools, a conversation stays within SFT's max_length (conf/data/instruct.yaml)
MAX_CONVERSATION_TOKENS = 300

# One binary operation of a solution: (left, op, right, result), written "left op right = result".
Step = tuple[int, str, int, int]
_SPECIAL_TOKEN_RX = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))
_OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}

# ----------------------------------------------------------------------------------------------------------
# Number words

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_TENS = ["", ""] + "twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_to_words(n: int) -> str:
    """English words for 0..9999, American style without "and": 115 -> "one hundred fifteen"."""
    if not 0 <= n <= 9999:
        raise ValueError(f"number_to_words covers 0..9999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_to_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    return f"{_ONES[thousands]} thousand" + (f" {number_to_words(rest)}" if rest else "")


# A maximal run of number words ("four thousand one hundred twenty-one"); longer words first so that
# "seventeen" is not read as "seven".
_WORD_TOKEN = "(?:(?:{tens})(?:-(?:{units}))?|{ones}|hundred|thousand)".format(
    tens="|".join(_TENS[2:]),
    units="|".join(_ONES[1:10]),
    ones="|".join(sorted(_ONES, key=len, reverse=True)),
)
_WORD_RUN = rf"\b{_WORD_TOKEN}(?: {_WORD_TOKEN})*\b"
_WORD_RUN_RX = re.compile(_WORD_RUN, re.IGNORECASE)

# ----------------------------------------------------------------------------------------------------------
# The split rule


@functools.lru_cache(maxsize=1 << 18)
def _is_val_key(key: str) -> bool:
    """Stable across processes and Python versions: the first 8 bytes of blake2b(key) as a fraction."""
    digest = hashlib.blake2b(key.encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < VAL_FRACTION


def _item_key(a: int, op: str, b: int) -> str:
    if op in "+*" and a > b:  # commutative: "48 + 23" is the same item as "23 + 48"
        a, b = b, a
    return f"{a}{op}{b}"


def split_of(a: int, op: str, b: int) -> str:
    """The split ("train" or "val") of the arithmetic item ``a op b``; the same for every seed.

    Items with an operand 0 or 1 are always train: counting ("37, 38, 39") teaches them anyway.
    """
    if op not in _OPS:
        raise ValueError(f"unknown operation {op!r}")
    if min(a, b) <= 1:
        return "train"
    return "val" if _is_val_key(_item_key(a, op, b)) else "train"


def _chain_key(steps: Sequence[Step]) -> str:
    if len(steps) == 1:
        x, op, n, _ = steps[0]
        return _item_key(x, op, n)
    head = _item_key(*steps[0][:3])
    return "c" + head + "".join(f"{op}{n}" for _, op, n, _ in steps[1:])


def _chain_split(steps: Sequence[Step]) -> str:
    """Split of a multi-step problem (steps, each starting from the last result): "val", "train" or "excluded".

    A chain is val when its own key hashes to val (for one step: when the item is val). It is train only when
    every step and every shorter chain inside it (prefix, suffix or middle) is train, so no train solution ever
    works through a val problem on the way ("... = 22. 22 - 17 = 5. 5 - 3 = 2." solves "22 - 17 - 3").
    The rest is left out of both splits.
    """
    if len(steps) == 1:
        return split_of(*steps[0][:3])
    if _is_val_key(_chain_key(steps)):
        return "val"
    if any(split_of(x, op, n) == "val" for x, op, n, _ in steps):
        return "excluded"
    inner = [steps[i:j] for i in range(len(steps)) for j in range(i + 2, len(steps) + 1) if j - i < len(steps)]
    if any(_is_val_key(_chain_key(part)) for part in inner):
        return "excluded"
    return "train"


@functools.cache
def _words_split(n: int) -> str:
    """Split of the number-words item for n: numbers below 100 are vocabulary (always train); 100..9999 hash.

    A train number of 1000 or more also needs its last three digits' words to be train, so "one hundred
    fifteen" never reaches training as the tail of "two thousand one hundred fifteen".
    """
    if n < 100:
        return "train"
    if _is_val_key(f"w{n}"):
        return "val"
    if n >= 1000 and n % 1000 >= 100 and _words_split(n % 1000) != "train":
        return "excluded"
    return "train"


def _format_values(start: int, stop: int, step: int) -> list[int]:
    return list(range(start, stop + (1 if step > 0 else -1), step))


def _format_split(start: int, stop: int, step: int) -> str:
    if _is_val_key(f"f{start}:{stop}:{step}"):
        return "val"
    # Counting by 2, 3, 5 or 10 states facts such as 15 + 5 = 20: those must be train items too.
    values = _format_values(start, stop, step)
    if step > 1 and any(split_of(x, "+", step) == "val" for x in values[:-1]):
        return "excluded"
    return "train"


@functools.cache
def _pools() -> dict[str, dict[str, list[Any]]]:
    """Every item of the small finite families, sorted into splits once (about 20k hashes, ~20 ms)."""
    facts: dict[str, list[tuple[int, str, int]]] = {
        "add2": [(a, "+", b) for a in range(10, 100) for b in range(10, 100)],
        "add_small": [(a, "+", b) for a in range(21) for b in range(21)],
        "sub2": [(a, "-", b) for a in range(10, 100) for b in range(10, a + 1)],
        "sub_small": [(a, "-", b) for a in range(21) for b in range(a + 1)],
        "mul": [(a, "*", b) for a in range(13) for b in range(13)],
    }
    pools: dict[str, dict[str, list[Any]]] = {}
    for name, items in facts.items():
        pools[name] = {s: [it for it in items if split_of(*it) == s] for s in SPLITS}
    for digits, (lo, hi) in {2: (0, 100), 3: (100, 1000), 4: (1000, 10000)}.items():
        pools[f"words{digits}"] = {s: [n for n in range(lo, hi) if _words_split(n) == s] for s in SPLITS}
    fmt = [(a, a + length - 1, 1) for a in range(96) for length in range(3, 9) if a + length - 1 <= 100]
    fmt += [(a, a - length + 1, -1) for a in range(2, 101) for length in range(3, 9) if a - length + 1 >= 0]
    fmt += [
        (a, a + k * (length - 1), k)
        for k in (2, 3, 5, 10)
        for a in range(0, 61)
        for length in range(3, 7)
        if a + k * (length - 1) <= 100 and (k < 5 or a % k == 0)
    ]
    pools["format"] = {s: [f for f in fmt if _format_split(*f) == s] for s in SPLITS}
    return pools


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def _rng(seed: int, *tags: str) -> random.Random:
    # Seeding from a string is deterministic (sha512 inside random), and each (seed, kind, split) gets its own
    # stream, so asking for more train data never changes the val data.
    return random.Random("|".join([str(seed), *tags]))


# ----------------------------------------------------------------------------------------------------------
# The calculator tool

# One implementation, shared with chat: the tool a conversation calls is the one the data was made with.
CALCULATOR_TOOL: dict[str, Any] = CALCULATOR_SCHEMA
CONVERTER_TOOL: dict[str, Any] = CONVERTER_SCHEMA
BUILTIN_TOOLS = [CALCULATOR_TOOL, CONVERTER_TOOL]
calculator = evaluate_arithmetic


# ----------------------------------------------------------------------------------------------------------
# Templates. Each is used both ways: to write prompts and (compiled to a regex) to read them back, so judge
# and canonical_reply work from a prompt alone.

PHRASINGS: dict[str, list[str]] = {
    "+": [
        "What is {a} + {b}?",
        "Compute {a} plus {b}.",
        "Add {a} and {b}.",
        "{a} + {b} = ?",
        "What is the sum of {a} and {b}?",
        "Calculate {a} + {b}.",
    ],
    "-": [
        "What is {a} - {b}?",
        "What is {a} minus {b}?",
        "Subtract {b} from {a}.",
        "{a} - {b} = ?",
        "Compute {a} minus {b}.",
        "Calculate {a} - {b}.",
    ],
    "*": [
        "What is {a} * {b}?",
        "Compute {a} times {b}.",
        "Multiply {a} by {b}.",
        "{a} * {b} = ?",
        "Calculate {a} * {b}.",
    ],
}
WORDS_PHRASINGS = ["Write {n} in words.", "How do you write {n} in words?", "Spell out the number {n}."]
FORMAT_PHRASINGS: dict[str, list[str]] = {
    "up": [
        "List the numbers from {a} to {b}, separated by commas.",
        "Count from {a} to {b}, separated by commas.",
        "Write the numbers from {a} to {b} in order, separated by commas.",
    ],
    "down": [
        "Count down from {a} to {b}, separated by commas.",
        "List the numbers from {a} down to {b}, separated by commas.",
    ],
    "step": [
        "Count from {a} to {b} in steps of {k}, separated by commas.",
        "List the numbers from {a} to {b} counting by {k}s, separated by commas.",
    ],
}
PROBLEM_PHRASINGS = ["Solve: {expr}.", "Work out {expr}.", "Find the value of {expr}."]
# Only read, never written: lets judge handle a free-form multi-step question such as "What is 12 + 7 - 5?".
_QUESTION_EXPR = ["What is {expr}?", "{expr} = ?", "Calculate {expr}.", "Compute {expr}."]

_NAMES = [
    ("Tom", "He"), ("Anna", "She"), ("Sam", "He"), ("Mia", "She"), ("Ben", "He"), ("Lily", "She"),
    ("Max", "He"), ("Emma", "She"), ("Leo", "He"), ("Zoe", "She"), ("Jack", "He"), ("Nora", "She"),
]  # fmt: skip
_OBJECTS = "apples pencils marbles books stickers cookies coins cards shells eggs balloons stamps".split()
_BOXES = [("bag", "bags"), ("box", "boxes"), ("jar", "jars"), ("basket", "baskets")]
_PLACES = ["in the box", "in the basket", "in the bag", "on the table", "on the shelf", "in the jar", "in the drawer"]
_STORY_START = "{name} has {n} {obj}."
_STORY_BOX = "{name} has {a} {boxes} with {b} {obj} in each {box}."
_STORY_STEPS: dict[str, list[str]] = {
    "+": [
        "{He} buys {n} more.",
        "{He} finds {n} more.",
        "{He} gets {n} more from a friend.",
        "{He} picks up {n} more.",
    ],
    "-": ["{He} gives away {n}.", "{He} loses {n}.", "{He} sells {n}.", "{He} gives {n} to a friend."],
    "*": ["Then the number of {obj} is multiplied by {n}."],
}
_STORY_QUESTIONS = ["How many {obj} does {name} have now?", "How many {obj} does {name} have in the end?"]

_SLOT_RX = {
    "a": r"(?P<a>\d+)",
    "b": r"(?P<b>\d+)",
    "n": r"(?P<n>\d+)",
    "k": r"(?P<k>\d+)",
    "expr": r"(?P<expr>[\d+\-*() ]+?)",
    "name": "[A-Z][a-z]+",
    "He": "(?:He|She)",
    "he": "(?:he|she)",
    "obj": "[a-z]+",
    "box": "[a-z]+",
    "boxes": "[a-z]+",
}


@functools.cache
def _template_rx(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("".join(_SLOT_RX[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts))


# ----------------------------------------------------------------------------------------------------------
# Problems: one internal description per prompt, rendered into any reply style


@dataclass
class _Problem:
    family: str
    prompt: str
    kind: str  # "number" (answer = last integer), "words" (last run of number words) or "list" (last list)
    answer: str
    steps: list[Step] = field(default_factory=list)  # kind "number"
    worked: bool = False  # True: steps then "The answer is N."; False: the single "a op b = c."
    value: int = 0  # kind "words"
    values: list[int] = field(default_factory=list)  # kind "list"


def _canonical(p: _Problem) -> str:
    if p.kind == "words":
        return f"{number_to_words(p.value)}."
    if p.kind == "list":
        return ", ".join(map(str, p.values)) + "."
    equations = " ".join(f"{x} {op} {n} = {y}." for x, op, n, y in p.steps)
    return f"{equations} The answer is {p.steps[-1][3]}." if p.worked else equations


def _expr_of(steps: Sequence[Step]) -> str:
    """Write a chain as one expression, with parentheses only where precedence would change the order."""
    text, low_precedence = str(steps[0][0]), False
    for _, op, n, _ in steps:
        if op == "*" and low_precedence:
            text = f"({text})"
        text, low_precedence = f"{text} {op} {n}", op in "+-"
    return text


def _steps_of_expr(expr: str) -> list[Step]:
    """Read an expression left to right into steps; refuse it when that order is not the real one."""
    tokens = re.findall(r"\d+|[+\-*]", expr)
    if len(tokens) < 3 or len(tokens) % 2 == 0:
        raise ValueError(f"not an arithmetic chain: {expr!r}")
    steps, cur = [], int(tokens[0])
    for op, n in zip(tokens[1::2], tokens[2::2]):
        steps.append((cur, op, int(n), _OPS[op](cur, int(n))))
        cur = steps[-1][3]
    if str(cur) != calculator(expr):
        raise ValueError(f"expression is not evaluated left to right: {expr!r}")
    return steps


def _number_problem(family: str, prompt: str, steps: list[Step], worked: bool) -> _Problem:
    return _Problem(family, prompt, "number", str(steps[-1][3]), steps=steps, worked=worked)


def _arith_problem(rng: random.Random, family: str, a: int, op: str, b: int) -> _Problem:
    prompt = rng.choice(PHRASINGS[op]).format(a=a, b=b)
    return _number_problem(family, prompt, [(a, op, b, _OPS[op](a, b))], worked=False)


def _words_problem(rng: random.Random, n: int) -> _Problem:
    prompt = rng.choice(WORDS_PHRASINGS).format(n=n)
    return _Problem("words", prompt, "words", number_to_words(n), value=n)


def _format_problem(rng: random.Random, start: int, stop: int, step: int) -> _Problem:
    direction = "up" if step == 1 else "down" if step == -1 else "step"
    prompt = rng.choice(FORMAT_PHRASINGS[direction]).format(a=start, b=stop, k=step)
    values = _format_values(start, stop, step)
    return _Problem("format", prompt, "list", ", ".join(map(str, values)), values=values)


def _random_chain(rng: random.Random, level: int) -> list[Step]:
    """``level`` operations on small numbers; every value stays in 2..99, so answers are small and non-negative."""
    steps: list[Step] = []
    if rng.random() < 0.2:  # start with a product: "Tom has 3 bags with 4 apples in each bag."
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        steps.append((a, "*", b, a * b))
        cur = a * b
    else:
        cur = rng.randint(2, 60)
    while len(steps) < level:
        options = [op for op, ok in (("+", cur <= 97), ("-", cur >= 4), ("*", cur <= 24)) if ok]
        op = rng.choices(options, weights=[{"+": 4, "-": 4, "*": 2}[o] for o in options])[0]
        if op == "+":
            n = rng.randint(2, min(50, 99 - cur))
        elif op == "-":
            n = rng.randint(2, cur - 2)
        else:
            n = rng.randint(2, min(9, 99 // cur))
        steps.append((cur, op, n, _OPS[op](cur, n)))
        cur = steps[-1][3]
    return steps


def _sample_chain(rng: random.Random, split: str, level: int) -> list[Step]:
    while True:  # rejection sampling: about 1 in 10 chains is val, about 6 in 10 three-step chains are train
        steps = _random_chain(rng, level)
        if _chain_split(steps) == split:
            return steps


def _story(rng: random.Random, steps: Sequence[Step]) -> tuple[str, str]:
    """The story prompt for a chain, and the narrated solution the corpus uses ("..., so he has 12 + 7 = 19")."""
    name, he = rng.choice(_NAMES)
    obj = rng.choice(_OBJECTS)
    box, boxes = rng.choice(_BOXES)
    slots = {"name": name, "He": he, "he": he.lower(), "obj": obj, "box": box, "boxes": boxes}
    prompt: list[str] = []
    narrated: list[str] = []
    rest = list(steps)
    if steps[0][1] == "*" and rng.random() < 0.7:
        x, _, n, _ = rest.pop(0)
        sentence = _STORY_BOX.format(a=x, b=n, **slots)
        prompt.append(sentence)
        narrated.append(f"{sentence[:-1]}, so {slots['he']} has {x} * {n} = {x * n} {obj}.")
    else:
        sentence = _STORY_START.format(n=steps[0][0], **slots)
        prompt.append(sentence)
        narrated.append(sentence)
    for x, op, n, y in rest:
        sentence = rng.choice(_STORY_STEPS[op]).format(n=n, **slots)
        prompt.append(sentence)
        narrated.append(f"{sentence[:-1]}, so {slots['he']} has {x} {op} {n} = {y} {obj}.")
    prompt.append(rng.choice(_STORY_QUESTIONS).format(**slots))
    narrated.append(f"The answer is {steps[-1][3]}.")
    return " ".join(prompt), " ".join(narrated)


def _chain_problem(rng: random.Random, split: str, level: int, family: str, story: bool | None = None) -> _Problem:
    steps = _sample_chain(rng, split, level)
    if story is None:
        story = rng.random() < 0.5
    prompt = _story(rng, steps)[0] if story else rng.choice(PROBLEM_PHRASINGS).format(expr=_expr_of(steps))
    return _number_problem(family, prompt, steps, worked=True)


def _tool_item(rng: random.Random, split: str) -> tuple[int, str, int]:
    while True:
        op = rng.choices(["*", "+", "-"], weights=[0.7, 0.15, 0.15])[0]
        if op == "*":
            a, b = rng.randint(100, 9999), rng.randint(10, 999)
        else:
            a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
            if op == "-" and a < b:
                a, b = b, a
        if split_of(a, op, b) == split:
            return a, op, b


def _make_problem(rng: random.Random, family: str, split: str) -> _Problem:
    pools = _pools()
    if family == "add":
        return _arith_problem(rng, family, *_pick(rng, pools["add2"][split]))
    if family == "sub":
        return _arith_problem(rng, family, *_pick(rng, pools["sub2"][split]))
    if family == "tool":
        return _arith_problem(rng, family, *_tool_item(rng, split))
    if family == "words":
        # Numbers below 100 are vocabulary (train only); held-out number words are three and four digits long.
        weights = (0.4, 0.45, 0.15) if split == "train" else (0.0, 0.75, 0.25)
        digits = rng.choices((2, 3, 4), weights=weights)[0]
        return _words_problem(rng, _pick(rng, pools[f"words{digits}"][split]))
    if family == "format":
        return _format_problem(rng, *_pick(rng, pools["format"][split]))
    if family == "word_problem":
        return _chain_problem(rng, split, 1, family, story=True)
    if family == "multi_step":
        return _chain_problem(rng, split, rng.choices((1, 2), weights=(0.4, 0.6))[0], family)
    raise ValueError(f"unknown family {family!r}; expected one of {INSTRUCTION_FAMILIES}")


def _pick(rng: random.Random, items: Sequence[Any]) -> Any:
    return items[rng.randrange(len(items))]


# ----------------------------------------------------------------------------------------------------------
# Reply styles: canonical, verbose (correct but long), bad_format (correct number, broken form), wrong

_OP_TASK = {"+": "add {x} and {n}", "-": "subtract {n} from {x}", "*": "multiply {x} by {n}"}
_OP_GERUND = {"+": "Adding them", "-": "Subtracting", "*": "Multiplying them"}
_OP_THEN = {"+": "then add {n}", "-": "then take away {n}", "*": "then multiply by {n}"}


def _verbose(p: _Problem, rng: random.Random, template: int | None = None) -> str:
    """A correct but rambling reply, the kind real instruction data is full of. ``template`` picks one variant."""
    if p.kind == "words":
        w, v = number_to_words(p.value), p.value
        options = [
            f"Sure! The number {v} is written as {w} in words. So the answer is {w}.",
            f"In words, the number {v} is spelled {w}. I hope that helps!",
            f"Good question. When we write {v} using words instead of digits, we get {w}.",
        ]
    elif p.kind == "list":
        text = ", ".join(map(str, p.values))
        options = [
            f"Sure, here are the numbers: {text}. Let me know if you need more!",
            f"Okay! Counting them out in order, we get {text}. That is the full list.",
        ]
    elif not p.worked:
        x, op, n, y = p.steps[0]
        task = _OP_TASK[op].format(x=x, n=n)
        options = [
            f"Let me think about this. We need to {task}. {_OP_GERUND[op]} gives {y}. So the answer is {y}, "
            "I hope that helps!",
            f"Sure! To work this out, I will {task}. The result is {y}. So {x} {op} {n} = {y}.",
            f"Great question! {x} {op} {n} equals {y}. Let me know if you have any other questions.",
            f"Okay, so we start with {x} and {_OP_THEN[op].format(n=n)}. That gives us {y}. Therefore, the answer "
            f"is {y}.",
        ]
    else:
        y = p.steps[-1][3]
        firsts = ["First", "Next", "Then", "After that"]
        steps = " ".join(f"{firsts[i]}, {x} {op} {n} = {r}." for i, (x, op, n, r) in enumerate(p.steps))
        prose = " ".join(f"We {_OP_TASK[op].format(x=x, n=n)} and get {r}." for x, op, n, r in p.steps)
        options = [
            f"Let's solve this step by step. {steps} So the final answer is {y}. I hope this helps!",
            f"Sure! Here is how I would solve it. {prose} After all of that, we get {y}. The answer is {y}.",
            f"This is a nice problem. Let me work through it carefully. {steps} Putting it all together, the "
            f"result is {y}.",
        ]
    return options[rng.randrange(len(options)) if template is None else template % len(options)]


def _bad_format(p: _Problem, rng: random.Random, allow_missing: bool = False) -> str:
    """A reply with the right answer in a broken form (or, when ``allow_missing``, with no answer at all)."""
    if p.kind == "words":
        w = number_to_words(p.value)
        options = [f"{w.upper()}!!", f"{w}. {w}. {w}.", f"{p.value}={w}", f"{w} ..."]
        missing = ["In words it is", "The number in words."]
    elif p.kind == "list":
        options = [",".join(map(str, p.values)), f"{p.answer}. {p.answer}.", f"numbers: {p.answer} ..."]
        missing = ["Here are the numbers:", "Counting now..."]
    else:
        y = p.steps[-1][3]
        canonical = _canonical(p)
        options = [
            " ".join(f"{x}{op}{n}={r}" for x, op, n, r in p.steps) + f" answer {y}",
            f"answer: {y}!!",
            f"{canonical} {canonical}",
            f"{y} {y} {y}",
            f"The answer is {y} ###",
            " ".join(f"{x} {op} {n} = {r}" for x, op, n, r in p.steps)
            + ("" if not p.worked else f" The answer is {y}"),
        ]
        x, op, n, _ = p.steps[0]
        missing = ["The answer is", f"Let me {_OP_TASK[op].format(x=x, n=n)}.", "I am not sure."]
    return rng.choice(options + missing if allow_missing else options)


def _chatty(p: _Problem) -> str:
    """The canonical reply behind a friendly opener: right and well formed, but not concise."""
    return f"{CHATTY_OPENER} {_canonical(p)}"


def _terse(p: _Problem) -> str:
    """The bare final answer of a worked problem, with no working."""
    if not p.worked:
        raise ValueError(f"terse replies are for worked problems, not {p.family!r}")
    return f"The answer is {p.answer}."


def _wrong_copy(p: _Problem, rng: random.Random, split: str) -> _Problem:
    """The same problem with a wrong final answer (off by a little, as real mistakes are)."""
    if p.kind == "words":
        candidates = [p.value + d for d in (-10, -2, -1, 1, 2, 10) if 0 <= p.value + d <= 9999]
        # A train reply must not spell out a held-out number, even wrongly.
        candidates = [v for v in candidates if split == "val" or _words_split(v) == "train"] or [p.value + 1]
        v = rng.choice(candidates)
        return replace(p, value=v, answer=number_to_words(v))
    if p.kind == "list":
        values = list(p.values)
        after = values[-1] + (values[-1] - values[-2])
        if rng.random() < 0.5 or after < 0:
            del values[rng.randrange(1, len(values) - 1)]  # skip one in the middle
        else:
            values.append(after)  # one too many
        return replace(p, values=values, answer=", ".join(map(str, values)))
    x, op, n, y = p.steps[-1]
    wrong = rng.choice([y + d for d in (-10, -2, -1, 1, 2, 10) if y + d >= 0])
    return replace(p, steps=[*p.steps[:-1], (x, op, n, wrong)], answer=str(wrong))


def _styled_reply(p: _Problem, style: str, rng: random.Random, split: str) -> str:
    if style == "canonical":
        return _canonical(p)
    if style == "verbose":
        return _verbose(p, rng)
    if style == "chatty":
        return _chatty(p)
    if style == "terse":
        return _terse(p)
    if style == "bad_format":
        return _bad_format(p, rng)
    if style == "wrong":
        return _canonical(_wrong_copy(p, rng, split))
    raise ValueError(f"unknown style {style!r}")


# ----------------------------------------------------------------------------------------------------------
# Reading prompts back: the canonical reply and the expected answer of any prompt the world writes


def _parse_story(text: str) -> list[Step] | None:
    sentences = re.split(r"(?<=[.?]) ", text)
    if len(sentences) < 2:
        return None
    steps: list[Step] = []
    if m := _template_rx(_STORY_START).fullmatch(sentences[0]):
        cur = int(m["n"])
    elif m := _template_rx(_STORY_BOX).fullmatch(sentences[0]):
        a, b = int(m["a"]), int(m["b"])
        steps.append((a, "*", b, a * b))
        cur = a * b
    else:
        return None
    if not any(_template_rx(q).fullmatch(sentences[-1]) for q in _STORY_QUESTIONS):
        return None
    for sentence in sentences[1:-1]:
        for op, templates in _STORY_STEPS.items():
            m = next((m for t in templates if (m := _template_rx(t).fullmatch(sentence))), None)
            if m:
                n = int(m["n"])
                steps.append((cur, op, n, _OPS[op](cur, n)))
                cur = steps[-1][3]
                break
        else:
            return None
    return steps or None


def _parse_prompt(text: str) -> _Problem:
    text = text.strip()
    for t in WORDS_PHRASINGS:
        if (m := _template_rx(t).fullmatch(text)) and int(m["n"]) <= 9999:
            return _Problem("words", text, "words", number_to_words(int(m["n"])), value=int(m["n"]))
    for direction, templates in FORMAT_PHRASINGS.items():
        for t in templates:
            if m := _template_rx(t).fullmatch(text):
                a, b = int(m["a"]), int(m["b"])
                step = {"up": 1, "down": -1}.get(direction) or int(m["k"])
                values = _format_values(a, b, step)
                if step and len(values) >= 2 and values[-1] == b:
                    return _Problem("format", text, "list", ", ".join(map(str, values)), values=values)
    if steps := _parse_story(text):
        return _number_problem("word_problem" if len(steps) == 1 else "multi_step", text, steps, worked=True)
    for op, templates in PHRASINGS.items():
        for t in templates:
            if m := _template_rx(t).fullmatch(text):
                a, b = int(m["a"]), int(m["b"])
                family = "tool" if max(a, b) >= 100 else {"+": "add", "-": "sub", "*": "mul"}[op]
                return _number_problem(family, text, [(a, op, b, _OPS[op](a, b))], worked=False)
    for templates, always_worked in ((PROBLEM_PHRASINGS, True), (_QUESTION_EXPR, False)):
        for t in templates:
            if m := _template_rx(t).fullmatch(text):
                steps = _steps_of_expr(m["expr"])
                worked = always_worked or len(steps) > 1
                family = "multi_step" if worked else {"+": "add", "-": "sub", "*": "mul"}[steps[0][1]]
                return _number_problem(family, text, steps, worked=worked)
    raise ValueError(f"not a prompt of the small world: {text!r}")


def _prompt_text(prompt: str | Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> str:
    """The question text from a string, a message list, or an instruction / preference / math record."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Mapping):
        inner = prompt.get("messages", prompt.get("prompt"))
        if inner is None:
            raise ValueError("record has neither 'messages' nor 'prompt'")
        return _prompt_text(inner)
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError("no user message in the prompt")
    return users[-1]


def canonical_reply(prompt: str | Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> str:
    """The reply that follows the preference rule, for any prompt the world writes (the SFT target format).

    For math problems it is the short worked solution: ``"12 + 7 = 19. 19 - 5 = 14. The answer is 14."``.
    """
    return _canonical(_parse_prompt(_prompt_text(prompt)))


def extract_answer(reply: str, kind: str = "number") -> str | None:
    """The final answer of a reply: the last integer (kind "number"), the last run of number words ("words"),
    or the last comma-separated list, normalised to ", " ("list"). None when there is none."""
    if kind == "number":
        found = re.findall(r"\d+", reply)
        return found[-1] if found else None
    if kind == "words":
        runs = _WORD_RUN_RX.findall(reply)
        return runs[-1].lower() if runs else None
    if kind == "list":
        lists = re.findall(r"\d+(?:\s*,\s*\d+)+", reply)
        return ", ".join(re.findall(r"\d+", lists[-1])) if lists else None
    raise ValueError(f"kind must be 'number', 'words' or 'list', got {kind!r}")


# ----------------------------------------------------------------------------------------------------------
# The "true preference": judge

JUDGE_WEIGHTS = {"correct": 0.6, "concise": 0.2, "well_formed": 0.2}
_GARBAGE_RX = re.compile(r"[#@~^_|<>{}\[\]\\`$%&]|!!|\?\?|\.\.|==|\s{2,}|\d[+\-*/=]|[+*/=]\d|[A-Z]{3,}")
_ENDING_RX = {
    "number": re.compile(r"(?:= |\b[Tt]he answer is )\d+\.$"),
    "words": re.compile(rf"(?:^|\s){_WORD_RUN}\.$", re.IGNORECASE),
    "list": re.compile(r"(?:^|\s)\d+(?:, \d+)+\.$"),
}


def _repeats(reply: str) -> bool:
    sentences = [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", reply) if s.strip()]
    words = reply.lower().split()
    return len(set(sentences)) < len(sentences) or any(
        words[i] == words[i + 1] == words[i + 2] for i in range(len(words) - 2)
    )


def judge_breakdown(prompt: str | Sequence[Mapping[str, Any]] | Mapping[str, Any], reply: str) -> dict[str, float]:
    """The parts of ``judge``'s score: correct, concise, well_formed (each in [0, 1]) and their weighted score.

    - correct (weight 0.6): the extracted final answer equals the true answer;
    - concise (0.2): 1 up to 1.25 x the canonical reply's length + 5 characters, then allowed / length;
    - well_formed (0.2): half for ending with the answer sentence ("= N." / "The answer is N." / the words / the
      list, with a full stop), half for being clean (no stray symbols, shouting, "!!", squashed "23+48", repeated
      sentences or a word three times in a row).
    The canonical reply scores exactly 1, an empty reply 0.
    """
    text = _prompt_text(prompt)
    try:
        problem = _parse_prompt(text)
        answer, kind, reference = problem.answer, problem.kind, _canonical(problem)
    except ValueError:
        if not isinstance(prompt, Mapping) or "answer" not in prompt:
            raise
        answer = str(prompt["answer"])  # a record from elsewhere: judge against its answer field
        kind = "number" if answer.isdigit() else "list" if "," in answer else "words"
        reference = f"The answer is {answer}."
    reply = reply.strip()
    if not reply:  # saying nothing is not concise, it is no answer
        return {"correct": 0.0, "concise": 0.0, "well_formed": 0.0, "score": 0.0}
    correct = float(extract_answer(reply, kind) == answer)
    allowed = 1.25 * len(reference) + 5
    concise = 1.0 if len(reply) <= allowed else allowed / len(reply)
    ends_well = bool(_ENDING_RX[kind].search(reply))
    clean = not _GARBAGE_RX.search(reply) and not _repeats(reply)
    well_formed = 0.5 * ends_well + 0.5 * clean
    score = sum(w * v for w, v in zip(JUDGE_WEIGHTS.values(), (correct, concise, well_formed)))
    return {"correct": correct, "concise": concise, "well_formed": well_formed, "score": score}


def judge(prompt: str | Sequence[Mapping[str, Any]] | Mapping[str, Any], reply: str) -> float:
    """The world's "true preference" for ``reply`` to ``prompt`` (text, messages or a record), in [0, 1]."""
    return judge_breakdown(prompt, reply)["score"]


# ----------------------------------------------------------------------------------------------------------
# Conversations: several user turns, tools offered far more often than needed, and the world's tool decision


def needs_calculator(a: int, op: str, b: int) -> bool:
    """The world's rule for what a model does in its head: + and - on numbers below 100, * inside the 12 x 12
    table (what the corpus teaches as facts). Anything bigger is the calculator's job."""
    if op == "*":
        return max(a, b) > 12
    return max(a, b) >= 100


def _convert_split(value: int, from_unit: str, to_unit: str) -> str:
    return "val" if _is_val_key(f"u{value}{from_unit}>{to_unit}") else "train"


def _rendered_tokens(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """Length of a conversation as the chat format renders it, one token a character (the char tokenizer's count;
    a BPE tokenizer needs fewer), each special token one."""
    return len(_SPECIAL_TOKEN_RX.sub("#", render_chat(messages, tools=tools)))


@dataclass
class _Turn:
    """One user question and everything the assistant does for it: tool calls, their results, the reply."""

    family: str
    prompt: str
    standalone: str  # the same question asked alone (the prompt itself unless it refers back)
    reply: str
    answer: str | None  # None: no answer to check by number or words (an honest "the tool failed" reply)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (tool name, arguments), in order
    results: list[str] = field(default_factory=list)
    problem: _Problem | None = None  # for the reply styles
    value: int | None = None  # the number "that" refers to in a follow-up
    again: Callable[[random.Random], tuple[int, _Turn] | None] | None = None  # the same question for another number
    style: str = "canonical"


def _mode_reply(mode: str | None, step: Step, canonical: str) -> str:
    if mode == "words":
        return "{} {} {} = {}, in words {}.".format(*step, number_to_words(step[3]))
    if mode == "number":
        return f"{step[3]}."
    return canonical


def _mode_answer(mode: str | None, value: int) -> str:
    return number_to_words(value) if mode == "words" else str(value)


def _arith_turn(rng: random.Random, split: str, mode: str | None, p: _Problem) -> _Turn | None:
    """A one-operation question (add, sub, tool), with a calculator call where the world says it is needed."""
    step = p.steps[0]
    x, op, y, result = step
    if mode == "words" and (needs_calculator(x, op, y) or (split == "train" and _words_split(result) != "train")):
        return None  # a train reply never spells a held-out number
    tool = needs_calculator(x, op, y)
    if tool and p.family != "tool":  # a follow-up such as "Multiply that by 8." on a two-digit answer
        p = replace(p, family="tool")
    turn = _Turn(
        "tool" if tool else p.family,
        p.prompt,
        p.prompt,
        _mode_reply(mode, step, _canonical(p)),
        _mode_answer(mode, result),
        calls=[("calculator", {"expression": f"{x} {op} {y}"})] if tool else [],
        results=[str(result)] if tool else [],
        problem=p if mode is None else None,
        value=result,
    )

    def again(rng: random.Random) -> tuple[int, _Turn] | None:
        for _ in range(20):  # the other operand, of the same size, from the same split
            lo, hi = (10, 99) if y < 100 else (10 ** (len(str(y)) - 1), 10 ** len(str(y)) - 1)
            hi = min(hi, x) if op == "-" else hi
            if hi < lo:
                return None
            other = rng.randint(lo, hi)
            if other != y and split_of(x, op, other) == split:
                question = f"What is {x} {op} {other}?"
                new = _arith_turn(
                    rng, split, mode, _number_problem(p.family, question, [(x, op, other, _OPS[op](x, other))], False)
                )
                if new is not None:
                    return other, new
        return None

    turn.again = again
    return turn


def _words_turn(rng: random.Random, split: str, p: _Problem) -> _Turn:
    turn = _Turn("words", p.prompt, p.prompt, _canonical(p), p.answer, problem=p)
    digits = max(2, len(str(p.value)))  # the pools: words2 (0..99), words3, words4

    def again(rng: random.Random) -> tuple[int, _Turn] | None:
        other = _pick(rng, _pools()[f"words{digits}"][split])
        return other, _words_turn(rng, split, _words_problem(rng, other))

    turn.again = again
    return turn


CONVERT_PHRASINGS = ["Convert {v} {f} to {t}.", "How many {t} are in {v} {f}?", "What is {v} {f} in {t}?"]
_UNITS = sorted({unit for pair in UNIT_FACTORS for unit in pair})


def _convert_turn(rng: random.Random, split: str, mode: str | None, error_rate: float = 0.0) -> _Turn:
    """A unit conversion: always the converter's job. With ``error_rate``, units that do not convert: the tool
    says so and the assistant reports it honestly instead of inventing a number."""
    from_unit, to_unit = _pick(rng, list(UNIT_FACTORS))
    if rng.random() < error_rate:
        to_unit = rng.choice(
            [u for u in _UNITS if u != from_unit and convert_units(6000, from_unit, u).startswith("error")]
        )
    while True:
        value = rng.randint(2, 999)
        if _convert_split(value, from_unit, to_unit) == split:
            break
    return _convert_turn_for(rng, split, mode, value, from_unit, to_unit)


def _convert_turn_for(
    rng: random.Random, split: str, mode: str | None, value: int, from_unit: str, to_unit: str
) -> _Turn:
    prompt = rng.choice(CONVERT_PHRASINGS).format(v=value, f=from_unit, t=to_unit)
    args = {"value": value, "from_unit": from_unit, "to_unit": to_unit}
    result = convert_units(value, from_unit, to_unit)
    if result.startswith("error"):
        reply = f"The convert tool could not do it ({result.removeprefix('error: ')}), so I have no answer."
        return _Turn("tool_error", prompt, prompt, reply, None, calls=[("convert", args)], results=[result])
    converted = int(result)
    canonical = f"{value} {from_unit} = {converted} {to_unit}."
    reply = f"{converted}." if mode == "number" else canonical
    turn = _Turn("convert", prompt, prompt, reply, str(converted), [("convert", args)], [result], value=converted)

    def again(rng: random.Random) -> tuple[int, _Turn] | None:
        for _ in range(20):
            other = rng.randint(2, 999)
            if other != value and _convert_split(other, from_unit, to_unit) == split:
                new = _convert_turn_for(rng, split, mode, other, from_unit, to_unit)
                new.prompt = new.standalone = f"Convert {other} {from_unit} to {to_unit}."
                return other, new
        return None

    turn.again = again
    return turn


def _two_calls_turn(rng: random.Random, split: str) -> _Turn:
    """Two questions in one message, each needing a tool: both calls in one assistant turn, both results used."""
    parts = []
    for _ in range(2):
        if rng.random() < 0.5:
            parts.append(_convert_turn(rng, split, None))
        else:
            parts.append(_arith_turn(rng, split, None, _arith_problem(rng, "tool", *_tool_item(rng, split))))
    first, second = parts
    prompt = f"{first.prompt} {second.prompt}"
    reply = " ".join(_canonical(t.problem) if t.problem else t.reply for t in parts)
    return _Turn(
        "two_calls", prompt, prompt, reply, second.answer, first.calls + second.calls, first.results + second.results
    )


_AGAIN_PHRASINGS = ["And {n}?", "What about {n}?", "And for {n}?"]
_THAT_PHRASINGS = {
    "+": ["Now add {n} to that.", "Add {n} to that."],
    "-": ["Now subtract {n} from that.", "Take away {n} from that."],
    "*": ["Now multiply that by {n}.", "Multiply that by {n}."],
}


def _follow_up(rng: random.Random, split: str, mode: str | None, before: _Turn) -> _Turn | None:
    """A question that refers back to the turn before: the same question for another number ("And 35?"), or an
    operation on its answer ("Now subtract 7 from that."); None when the turn before allows neither."""
    if before.again is not None and rng.random() < 0.5:
        made = before.again(rng)
        if made is not None:
            n, turn = made
            turn.prompt = rng.choice(_AGAIN_PHRASINGS).format(n=n)
            return turn
    value = before.value
    if value is None:
        return None
    ops = ["+"] + (["-"] if value >= 4 else []) + (["*"] if mode != "words" and value > 12 else [])
    op = rng.choice(ops)
    for _ in range(20):
        n = rng.randint(2, 9) if op == "*" else rng.randint(2, 50 if op == "+" else min(50, value - 1))
        if n >= 2 and (op != "-" or n < value) and split_of(value, op, n) == split:
            break
    else:
        return None
    standalone = f"What is {value} {op} {n}?"
    turn = _arith_turn(
        rng,
        split,
        mode,
        _number_problem("add" if op == "+" else "sub", standalone, [(value, op, n, _OPS[op](value, n))], False),
    )
    if turn is None:
        return None
    turn.prompt = rng.choice(_THAT_PHRASINGS[op]).format(n=n)
    return turn


def _fresh_turn(rng: random.Random, split: str, mode: str | None, family: str) -> _Turn | None:
    if family == "convert":
        return _convert_turn(rng, split, mode, error_rate=TOOL_ERROR_RATE)
    if family == "two_calls":
        return _two_calls_turn(rng, split)
    p = _make_problem(rng, family, split)
    if family in ("add", "sub", "tool"):
        return _arith_turn(rng, split, mode, p)
    if family == "words":
        return _words_turn(rng, split, p)
    value = int(p.answer) if p.kind == "number" else None
    return _Turn(family, p.prompt, p.prompt, _canonical(p), p.answer, problem=p, value=value)


def _turn_messages(turn: _Turn, prompt: str, first_call: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    if turn.calls:
        ids = [f"call_{first_call + i}" for i in range(len(turn.calls))]
        calls = [
            {"id": i, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
            for i, (name, args) in zip(ids, turn.calls)
        ]
        messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        messages += [{"role": "tool", "tool_call_id": i, "content": r} for i, r in zip(ids, turn.results)]
    messages.append({"role": "assistant", "content": turn.reply})
    return messages


def _conversation(
    rng: random.Random, split: str, mix: Mapping[str, float], quality: float | None, wrong_rate: float
) -> dict[str, Any]:
    n_turns = rng.choices(list(TURNS_MIX), weights=list(TURNS_MIX.values()))[0]
    mode = rng.choices(list(SYSTEM_MIX), weights=list(SYSTEM_MIX.values()))[0]
    turn_mix = {f: w for f, w in mix.items() if mode is None or f in _SYSTEM_FAMILIES[mode]}
    if not turn_mix:
        mode, turn_mix = None, dict(mix)
    names, weights = list(turn_mix), list(turn_mix.values())
    # the tools are drawn first (a conversation that needs one always gets them), so the length budget counts
    # their description
    offered = rng.random() < TOOL_OFFER_RATE
    tools = list(BUILTIN_TOOLS) if rng.random() < 0.75 else [CALCULATOR_TOOL]
    system = [{"role": "system", "content": SYSTEM_PROMPTS[mode]}] if mode else []
    turns: list[_Turn] = []
    messages = list(system)
    while len(turns) < n_turns:
        turn = None
        if turns and rng.random() < FOLLOW_UP_RATE:
            turn = _follow_up(rng, split, mode, turns[-1])
            # the families this conversation draws from: "Multiply that by 8." needs a tool, not in a subset without
            # one; "Now add 5 to that." under "Reply with the number only." would be a sum done in the head
            if turn is not None and turn.family not in turn_mix:
                turn = None
        while turn is None:
            turn = _fresh_turn(rng, split, mode, rng.choices(names, weights=weights)[0])
        needs_converter = any(name == "convert" for name, _ in turn.calls)
        turn_tools = list(BUILTIN_TOOLS) if needs_converter else tools
        first_call = sum(1 for m in messages for _ in m.get("tool_calls", []))
        longer = messages + _turn_messages(turn, turn.prompt, first_call)
        turn_offered = offered or bool(turn.calls)
        if turns and _rendered_tokens(longer, turn_tools if turn_offered else None) > MAX_CONVERSATION_TOKENS:
            break  # a shorter conversation rather than one cut off in the middle
        turns.append(turn)
        messages, tools, offered = longer, turn_tools, turn_offered
    last = turns[-1]
    tools = tools if offered else None
    if last.problem is not None:  # the last reply takes its family's style mix; earlier ones are canonical
        style = _pick_style(rng, last.problem.family, quality, wrong_rate)
        if last.calls and style == "wrong":
            style = "canonical"  # a reply that contradicts the tool's result is no habit to teach
        last.style, last.reply = style, _styled_reply(last.problem, style, rng, split)
        messages[-1] = {"role": "assistant", "content": last.reply}
    record: dict[str, Any] = {
        "messages": messages,
        "answer": last.answer,
        "family": last.family,
        "style": last.style,
        "turns": len(turns),
        "needed_calls": [{"name": name, "arguments": args} for name, args in last.calls],
    }
    if len(turns) > 1:
        record["standalone"] = system + _turn_messages(last, last.standalone, 0)
    if tools:
        record["tools"] = tools
    return record


# ----------------------------------------------------------------------------------------------------------
# Public generators


def _mixture(families: Sequence[str] | Mapping[str, float] | None, default: Mapping[str, float]) -> dict[str, float]:
    if families is None:
        return dict(default)
    mix = dict(families) if isinstance(families, Mapping) else {f: default.get(f, 1.0) for f in families}
    unknown = set(mix) - set(default)
    if unknown or not mix:
        raise ValueError(f"unknown families {sorted(unknown)}; expected some of {sorted(default)}")
    return mix


def _unique_problems(rng: random.Random, mix: Mapping[str, float], split: str, n: int) -> list[_Problem]:
    """n problems drawn from the mixture, avoiding repeated prompts while the pools allow it."""
    names, weights = list(mix), list(mix.values())
    seen: set[str] = set()
    out: list[_Problem] = []
    while len(out) < n:
        family = rng.choices(names, weights=weights)[0]
        for _ in range(10):
            p = _make_problem(rng, family, split)
            if p.prompt not in seen:
                break
        seen.add(p.prompt)
        out.append(p)
    return out


def _pick_style(rng: random.Random, family: str, quality: float | None, wrong_rate: float) -> str:
    if quality is None:
        mix = STYLE_MIX[_STYLE_GROUP[family]]
        return rng.choices(list(mix), weights=list(mix.values()))[0]
    u = rng.random()
    wrong = min(wrong_rate, 1.0 - quality)
    if u < quality:
        return "canonical"
    if u < quality + wrong:
        return "wrong"
    # The rest is correct but off-rule: mostly rambling, some badly formatted.
    return "verbose" if rng.random() < 0.65 else "bad_format"


def instruction_examples(
    split: str,
    n: int,
    seed: int = 0,
    quality: float | None = None,
    families: Sequence[str] | Mapping[str, float] | None = None,
    wrong_rate: float = 0.05,
) -> list[dict[str, Any]]:
    """Chat records for SFT: ``{"messages", "answer", "family", "style", "turns", "needed_calls", "standalone"}``,
    plus ``"tools"`` where tools are offered (see "Conversations" above: multi-turn, tool decisions).

    ``answer``, ``family``, ``style`` and ``needed_calls`` describe the last user turn, the one evaluation asks;
    ``standalone`` is that question asked alone (the same system prompt and tools) as a full record's messages.
    ``quality=None`` draws the last reply's style from its family's ``STYLE_MIX``. A number instead makes that the
    fraction of canonical replies for every family; of the rest, ``wrong_rate`` (of all) are wrong and the others
    correct but verbose or badly formatted. Earlier turns are canonical, and the val split is always canonical, so
    evaluation is clean. ``families`` picks a subset (names) or a mixture (name -> weight) of
    ``INSTRUCTION_FAMILIES``.
    """
    _check_split(split)
    if quality is not None and not 0.0 <= quality <= 1.0:
        raise ValueError(f"quality must be in [0, 1], got {quality}")
    if split == "val":
        quality, wrong_rate = 1.0, 0.0
    rng = _rng(seed, "instructions", split)
    mix = _mixture(families, INSTRUCTION_MIX)
    records = []
    seen: set[str] = set()
    while len(records) < n:
        for _ in range(10):  # avoid repeated conversations while the pools allow it
            record = _conversation(rng, split, mix, quality, wrong_rate)
            key = json.dumps(record["messages"])
            if key not in seen:
                break
        seen.add(key)
        records.append(record)
    return records


def preference_examples(
    split: str, n: int, seed: int = 0, families: Sequence[str] | Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """Preference pairs: ``{"prompt", "chosen", "rejected", "rule", "answer", "family"}``.

    ``chosen`` follows the rule ``rule`` and ``rejected`` breaks it: "correct" -> a wrong final number (in the
    canonical form, or 30% of the time both replies in the same verbose form so length tells nothing);
    "concise" -> a correct reply behind a chatty opener (40%) or a rambling one; "well_formed" -> broken form or
    no final answer.
    """
    _check_split(split)
    rng = _rng(seed, "preferences", split)
    records = []
    for p in _unique_problems(rng, _mixture(families, PREFERENCE_MIX), split, n):
        rule = rng.choice(PREFERENCE_RULES)
        chosen = _canonical(p)
        if rule == "correct":
            wrong = _wrong_copy(p, rng, split)
            if rng.random() < 0.3:
                template = rng.randrange(1000)
                chosen, rejected = _verbose(p, rng, template), _verbose(wrong, rng, template)
            else:
                rejected = _canonical(wrong)
        elif rule == "concise":
            rejected = _chatty(p) if rng.random() < 0.4 else _verbose(p, rng)
        else:
            rejected = _bad_format(p, rng, allow_missing=True)
        records.append(
            {
                "prompt": [{"role": "user", "content": p.prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "rule": rule,
                "answer": p.answer,
                "family": p.family,
            }
        )
    return records


def math_problems(split: str, n: int, seed: int = 0, levels: Sequence[int] = (1, 2, 3)) -> list[dict[str, Any]]:
    """GRPO prompts with verifiable answers: ``{"prompt", "answer", "level", "solution"}``.

    Level L has L operations on L + 1 numbers (+, -, and small *), half as a short story and half as an
    expression ("Work out (12 + 7) * 3."); every value stays below 100 and the answer is a non-negative integer.
    ``solution`` is the canonical worked reply, the format SFT teaches (``canonical_reply`` gives it too).
    """
    _check_split(split)
    if not levels or any(level not in (1, 2, 3) for level in levels):
        raise ValueError(f"levels must be a non-empty subset of (1, 2, 3), got {levels}")
    rng = _rng(seed, "math", split)
    seen: set[str] = set()
    records = []
    while len(records) < n:
        level = rng.choice(list(levels))
        for _ in range(10):
            p = _chain_problem(rng, split, level, "multi_step")
            if p.prompt not in seen:
                break
        seen.add(p.prompt)
        records.append({"prompt": p.prompt, "answer": p.answer, "level": level, "solution": _canonical(p)})
    return records


# ----------------------------------------------------------------------------------------------------------
# The pre-training corpus: one generator per kind of document, all drawing only train items


def _fact(rng: random.Random) -> Step:
    name = rng.choices(["add2", "add_small", "sub2", "sub_small", "mul"], weights=[35, 15, 25, 10, 15])[0]
    a, op, b = _pick(rng, _pools()[name]["train"])
    return a, op, b, _OPS[op](a, b)


def _fact_in_words(rng: random.Random) -> Step:
    while True:  # skip the few facts whose result is a held-out number-words item (>= 100)
        step = _fact(rng)
        if _words_split(step[3]) == "train":
            return step


_OP_WORD = {"+": "plus", "-": "minus", "*": "times"}


def _say(step: Step) -> str:
    x, op, n, y = step
    return f"{number_to_words(x)} {_OP_WORD[op]} {number_to_words(n)} is {number_to_words(y)}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _doc_digit_facts(rng: random.Random) -> str:
    return "\n".join("{} {} {} = {}".format(*_fact(rng)) for _ in range(rng.randint(6, 14)))


def _doc_word_facts(rng: random.Random) -> str:
    return " ".join(_cap(_say(_fact_in_words(rng))) + "." for _ in range(rng.randint(3, 6)))


def _doc_mixed_facts(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        x, op, n, y = step = _fact_in_words(rng)
        lines.append(f"{x} {op} {n} = {y}. {_cap(_say(step))}.")
    return "\n".join(lines)


def _doc_questions(rng: random.Random) -> str:
    """Questions in the phrasings SFT uses, each followed by its canonical answer."""
    lines = []
    for _ in range(rng.randint(3, 6)):
        kind = rng.choices(["add", "sub", "mul", "words", "format"], weights=[30, 30, 15, 15, 10])[0]
        if kind == "mul":
            p = _arith_problem(rng, "mul", *_pick(rng, _pools()["mul"]["train"]))
        else:
            p = _make_problem(rng, kind, "train")
        lines.append(f"{p.prompt} {_canonical(p)}")
    return "\n".join(lines)


def _doc_story(rng: random.Random) -> str:
    return _story(rng, _sample_chain(rng, "train", rng.choice((1, 2, 2, 3))))[1]


def _doc_problem(rng: random.Random) -> str:
    p = _chain_problem(rng, "train", rng.choice((1, 2, 2, 3)), "multi_step")
    return f"{p.prompt} {_canonical(p)}"


def _doc_counting(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        a = rng.randint(0, 90)
        values = list(range(a, a + rng.randint(5, 15)))
        return f"Counting from {a} to {values[-1]}: " + ", ".join(map(str, values)) + "."
    if kind == 1:
        a = rng.randint(0, 85)
        return _cap(", ".join(number_to_words(v) for v in range(a, a + rng.randint(4, 12)) if v < 100)) + "."
    if kind == 2:
        start, stop, step = _pick(rng, [f for f in _pools()["format"]["train"] if f[2] > 1])
        return f"Counting by {step}s from {start}: " + ", ".join(map(str, _format_values(start, stop, step))) + "."
    if kind == 3:
        a = rng.randint(5, 100)
        values = range(a, max(-1, a - rng.randint(5, 12)), -1)
        return f"Counting down from {a}: " + ", ".join(map(str, values)) + "."
    lines = []
    for _ in range(rng.randint(3, 6)):
        v = rng.randint(1, 120)
        lines.append(f"After {v} comes {v + 1}. Before {v} comes {v - 1}.")
    return " ".join(lines)


def _doc_number_words(rng: random.Random) -> str:
    pools = _pools()
    if rng.random() < 0.4:  # a run of consecutive numbers
        a = rng.randint(0, 990)
        values = [v for v in range(a, a + rng.randint(4, 10)) if _words_split(v) == "train"]
        return "\n".join(f"{v} is {number_to_words(v)}." for v in values) or "0 is zero."
    lines = []
    for _ in range(rng.randint(3, 6)):
        digits = rng.choices((2, 3, 4), weights=(0.4, 0.4, 0.2))[0]
        v = _pick(rng, pools[f"words{digits}"]["train"])
        w = number_to_words(v)
        lines.append(
            rng.choice([f"The number {v} is written {w}.", f"{v} in words is {w}.", f"Write {v} in words. {w}."])
        )
    return "\n".join(lines)


def _doc_objects(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 5)):
        (name, he), (other, _) = rng.sample(_NAMES, 2)
        obj, place = rng.choice(_OBJECTS), rng.choice(_PLACES)
        a, b = rng.sample(range(2, 40), 2)
        options = [
            f"{name} has {a} {obj}.",
            f"There are {a} {obj} {place}.",
            f"{name} puts {a} {obj} {place}.",
            f"{name} has {a} {obj} and {other} has {b} {obj}. {name} has {'more' if a > b else 'fewer'} {obj}, "
            f"because {a} is {'more' if a > b else 'less'} than {b}.",
            f"{a} is {'greater' if a > b else 'less'} than {b}.",
            f"{a} is an {'even' if a % 2 == 0 else 'odd'} number.",
            f"{name} counts the {obj} {place}. {he} counts {a} {obj}.",
            rng.choice(["A week has 7 days.", "A year has 12 months.", "A dog has 4 legs.", "A hand has 5 fingers."]),
        ]
        sentences.append(rng.choice(options))
    return " ".join(sentences)


def _doc_tool_notes(rng: random.Random) -> str:
    """Worked notes of the tools' jobs in plain prose (train items only): the question, the call written as the
    chat writes it (the tool's name, then its JSON arguments), the result, the answer. One or two questions a
    note, as a chat message may ask two. Copying numbers, operators and unit names from the question into the
    call, and the result into the answer, is what tool use needs; raw text teaches it far more cheaply than SFT's
    few tool turns (measured: with notes in prose only, the demo's SFT model got 25 of 51 held-out calls right,
    every wrong conversion naming the units "kg" and "m" whatever the question said)."""
    lines = []
    for _ in range(rng.randint(2, 4)):
        turns = [_tool_note_turn(rng) for _ in range(rng.choice((1, 1, 2)))]
        question = " ".join(t.prompt for t in turns)
        calls = " ".join(f"{name} {json.dumps(args)}" for t in turns for name, args in t.calls)
        results = " and ".join(t.results[0] for t in turns)
        says = "says" if any(t.results[0].startswith("error") for t in turns) else "gives"
        lines.append(f"{question} {calls} {says} {results}. {' '.join(t.reply for t in turns)}")
    return "\n".join(lines)


def _tool_note_turn(rng: random.Random) -> _Turn:
    if rng.random() < 0.55:
        return _arith_turn(rng, "train", None, _arith_problem(rng, "tool", *_tool_item(rng, "train")))
    return _convert_turn(rng, "train", None, error_rate=TOOL_ERROR_RATE)


# Arithmetic facts and questions weigh most: held-out two-digit sums and differences are learned from the facts
# alone (they must generalise), and they are half of SFT's evaluation. Measured on the demo (tiny model, 2,400
# pre-training steps, seeds 0/1/2): with facts 16 and questions 16, held-out "a + b =" 0.43 (seed 0) and SFT exact
# match 0.31/0.365/0.26; with 32 and 24 (and the notes' calls in JSON), 0.87/0.54/0.73 and 0.46/0.405/0.425.
_DOCS: list[tuple[Callable[[random.Random], str], float]] = [
    (_doc_digit_facts, 32),
    (_doc_word_facts, 10),
    (_doc_mixed_facts, 8),
    (_doc_questions, 24),
    (_doc_story, 12),
    (_doc_problem, 12),
    (_doc_counting, 10),
    (_doc_number_words, 8),
    (_doc_objects, 8),
    (_doc_tool_notes, 8),
]


def pretrain_corpus(seed: int = 0, n_chars: int = 3_000_000) -> str:
    """Raw ASCII text of at most ``n_chars`` characters, documents separated by a blank line (~1 s for 3 MB).

    It teaches the facts (train items only) and the phrasings and answer formats SFT will use.
    """
    rng = _rng(seed, "corpus")
    makers, weights = [m for m, _ in _DOCS], [w for _, w in _DOCS]
    docs: list[str] = []
    total = 0
    while True:
        doc = rng.choices(makers, weights=weights)[0](rng)
        if total + len(doc) + 2 > n_chars:
            break
        docs.append(doc)
        total += len(doc) + 2
    return "\n\n".join(docs) + "\n"


def write_builtin_files(
    out_dir: str | Path,
    seed: int = 0,
    n_chars: int = 3_000_000,
    n_instructions: int = 20_000,
    n_preferences: int = 5_000,
    n_math: int = 5_000,
    n_val: int = 500,
    quality: float = 0.7,
) -> dict[str, Path]:
    """Write corpus.txt and {instructions,preferences,math}_{train,val}.jsonl; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out / "corpus.txt"}
    paths["corpus"].write_text(pretrain_corpus(seed, n_chars), encoding="ascii")
    for split in SPLITS:
        sets = {
            "instructions": instruction_examples(split, n_instructions if split == "train" else n_val, seed, quality),
            "preferences": preference_examples(split, n_preferences if split == "train" else n_val, seed),
            "math": math_problems(split, n_math if split == "train" else n_val, seed),
        }
        for name, records in sets.items():
            path = paths[f"{name}_{split}"] = out / f"{name}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="ascii")
    return paths
