"""The built-in small world: determinism, held-out disjointness, correct answers, the quality knob and the judge."""

from __future__ import annotations

import json
import random
import re
import time

import pytest

from stagelm.data import world

# A binary fact "a op b" that starts an expression: not preceded by a digit, nor by "x op " (then it would be the
# middle of a chain such as "12 + 7 - 5", which states no fact "7 - 5").
DIGIT_FACT = re.compile(r"(?<![\d)] [+\-*] )(?<!\d)(\d+) ([+\-*]) (\d+)(?!\d)")
WORD_RUN = re.compile(world._WORD_RUN, re.IGNORECASE)
WORD_FACT = re.compile(rf"({world._WORD_RUN}) (plus|minus|times) ({world._WORD_RUN})", re.IGNORECASE)
WORD_OPS = {"plus": "+", "minus": "-", "times": "*"}
FROM_WORDS = {world.number_to_words(n): n for n in range(10_000)}


@pytest.fixture(scope="module")
def corpus() -> str:
    start = time.perf_counter()
    text = world.pretrain_corpus(seed=0)
    assert time.perf_counter() - start < 5.0, "the 3 MB corpus should take about a second"
    return text


@pytest.fixture(scope="module")
def train() -> dict[str, list[dict]]:
    return {
        "instructions": world.instruction_examples("train", 4000),
        "preferences": world.preference_examples("train", 2500),
        "math": world.math_problems("train", 2500),
    }


@pytest.fixture(scope="module")
def val() -> dict[str, list[dict]]:
    return {
        "instructions": world.instruction_examples("val", 600),
        "preferences": world.preference_examples("val", 600),
        "math": world.math_problems("val", 600),
    }


def texts_of(data: dict[str, list[dict]]) -> list[str]:
    """Every string a model would read: prompts, replies, tool arguments and results, solutions."""
    out: list[str] = []
    for r in data["instructions"]:
        for m in r["messages"]:
            out.append(m["content"])
            out += [c["function"]["arguments"] for c in m.get("tool_calls", [])]
    for r in data["preferences"]:
        out += [m["content"] for key in ("prompt", "chosen", "rejected") for m in r[key]]
    for r in data["math"]:
        out += [r["prompt"], r["solution"]]
    return out


def question(record: dict) -> str:
    """The question a record's last turn asks, in full (a follow-up such as "And 35?" spelled out)."""
    messages = record.get("standalone", record["messages"])
    return next(m["content"] for m in messages if m["role"] == "user")


def single_turn(records: list[dict]) -> list[dict]:
    """The one-question records of the families every stage shares: no system prompt, no conversion."""
    return [r for r in records if r["turns"] == 1 and r["messages"][0]["role"] == "user"
            and r["family"] in world._STYLE_GROUP]  # fmt: skip


def user_prompts(data: dict[str, list[dict]]) -> set[str]:
    prompts = {question(r) for r in data["instructions"]}
    prompts |= {r["prompt"][0]["content"] for r in data["preferences"]}
    return prompts | {r["prompt"] for r in data["math"]}


def last_reply(record: dict) -> str:
    return record["messages"][-1]["content"]


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (13, "thirteen"),
        (21, "twenty-one"),
        (100, "one hundred"),
        (115, "one hundred fifteen"),
        (1000, "one thousand"),
        (9999, "nine thousand nine hundred ninety-nine"),
        (71, "seventy-one"),
        (4821, "four thousand eight hundred twenty-one"),
    ],
)
def test_number_words(n: int, words: str) -> None:
    assert world.number_to_words(n) == words


def test_number_words_range() -> None:
    with pytest.raises(ValueError):
        world.number_to_words(10_000)
    with pytest.raises(ValueError):
        world.number_to_words(-1)
    assert len(FROM_WORDS) == 10_000  # every number has its own words


def test_split_rule() -> None:
    # Stable: pinned values guard against an accidental change of the hash (which would reshuffle every split).
    items = [(23, "+", 48), (48, "-", 23), (10, "+", 12), (12, "+", 10), (17, "-", 11), (11, "-", 17), (3, "*", 9)]
    assert [world.split_of(*item) for item in items] == ["train", "train", "val", "val", "val", "train", "val"]
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    val = [(a, b) for a, b in pairs if world.split_of(a, "+", b) == "val"]
    assert 0.08 < len(val) / len(pairs) < 0.12
    assert all(world.split_of(b, "+", a) == "val" for a, b in val)  # addition ignores operand order
    assert {world.split_of(a, op, 1) for a in range(100) for op in "+-*"} == {"train"}  # counting facts
    assert world.split_of(*next((a, "+", b) for a, b in val)) == "val"


def test_deterministic_for_a_seed() -> None:
    assert world.pretrain_corpus(seed=0, n_chars=50_000) == world.pretrain_corpus(seed=0, n_chars=50_000)
    assert world.pretrain_corpus(seed=0, n_chars=50_000) != world.pretrain_corpus(seed=1, n_chars=50_000)
    for make in (world.instruction_examples, world.preference_examples, world.math_problems):
        assert make("train", 300, seed=0) == make("train", 300, seed=0)
        assert make("train", 300, seed=0) != make("train", 300, seed=1)
        assert make("val", 100, seed=3) == make("val", 100, seed=3)


def test_heldout_arithmetic_items_never_in_training(corpus: str, train: dict) -> None:
    """No val item appears in any train text or the corpus, in digits or in words, in either operand order."""
    sources = {"corpus": corpus, "train data": "\n".join(texts_of(train))}
    for name, text in sources.items():
        facts = [(int(a), op, int(b)) for a, op, b in DIGIT_FACT.findall(text)]
        assert len(facts) > 1000, name
        leaked = [f for f in facts if world.split_of(*f) == "val"]
        assert not leaked, f"val items in {name}: {leaked[:5]}"
    spoken = [(FROM_WORDS.get(a.lower()), WORD_OPS[op.lower()], FROM_WORDS.get(b.lower())) for a, op, b in
              WORD_FACT.findall(corpus)]  # fmt: skip
    assert len(spoken) > 1000 and all(a is not None and b is not None for a, _, b in spoken)
    assert not [f for f in spoken if world.split_of(*f) == "val"]


def test_heldout_prompts_never_in_training(corpus: str, train: dict, val: dict) -> None:
    val_prompts, train_prompts = user_prompts(val), user_prompts(train)
    assert not val_prompts & train_prompts
    train_text = "\n".join(texts_of(train))
    for prompt in random.Random(0).sample(sorted(val_prompts), 150):
        assert prompt not in corpus and prompt not in train_text, prompt
    # A held-out multi-step problem is not solved on the way to a train one either.
    multi_step = [r for r in val["math"] if r["level"] > 1]
    for record in random.Random(0).sample(multi_step, 150):
        equations = record["solution"].rsplit(" The answer is", 1)[0]
        assert equations not in corpus and equations not in train_text, record


def test_heldout_number_words_never_in_training(corpus: str, train: dict, val: dict) -> None:
    held_out = {int(re.search(r"\d+", question(r))[0]) for r in val["instructions"]
                if r["family"] == "words"}  # fmt: skip
    assert len(held_out) > 20 and min(held_out) >= 100
    for text in (corpus, "\n".join(texts_of(train))):
        runs = {FROM_WORDS.get(run.lower()) for run in WORD_RUN.findall(text)}
        assert not runs & held_out


def test_answers_are_correct(train: dict, val: dict) -> None:
    for record in single_turn(train["instructions"] + val["instructions"]):
        prompt, answer, family = record["messages"][0]["content"], record["answer"], record["family"]
        numbers = [int(x) for x in re.findall(r"\d+", prompt)]
        if family in ("add", "sub", "tool"):
            a, b = numbers
            if prompt.startswith("Subtract"):  # "Subtract b from a."
                a, b = b, a
            op = (
                "+"
                if re.search(r"\+|plus|Add|sum", prompt)
                else "-"
                if re.search(r" - |minus|Subtract", prompt)
                else "*"
            )
            assert eval(f"{a} {op} {b}") == int(answer), record
        elif family == "words":
            assert world.number_to_words(numbers[0]) == answer
        elif family == "format":
            a, b, *k = numbers
            step = k[0] if k else (-1 if "down" in prompt else 1)
            assert answer == ", ".join(map(str, range(a, b + (1 if step > 0 else -1), step))), record
        if family == "tool":
            call, result = record["messages"][1]["tool_calls"][0], record["messages"][2]
            assert (
                eval(json.loads(call["function"]["arguments"])["expression"]) == int(result["content"]) == int(answer)
            )
        if record["style"] == "canonical":
            assert last_reply(record) == world.canonical_reply(record)
            if family not in ("words", "format"):
                assert re.findall(r"\d+", last_reply(record))[-1] == answer
    problems = train["math"] + val["math"]
    problems += [{"prompt": r["messages"][0]["content"], "answer": r["answer"], "solution": last_reply(r)}
                 for r in single_turn(train["instructions"]) if r["family"] in ("word_problem", "multi_step")
                 and r["style"] == "canonical"]  # fmt: skip
    for record in problems:
        check_solution(record)


def check_solution(record: dict) -> None:
    """Each step of the worked solution is right, continues from the last result, and ends at the answer."""
    steps = re.findall(r"(\d+) ([+\-*]) (\d+) = (\d+)\.", record["solution"])
    assert record["solution"].endswith(f"The answer is {record['answer']}.")
    for i, (a, op, b, c) in enumerate(steps):
        assert eval(f"{a} {op} {b}") == int(c), record
        if i:
            assert a == steps[i - 1][3], record
    assert steps[-1][3] == record["answer"]
    prompt = record["prompt"]
    if m := re.fullmatch(r"(?:Solve: |Work out |Find the value of )([\d+\-*() ]+)\.", prompt):
        assert eval(m[1]) == int(record["answer"]), record
    else:  # a story: its numbers are the operands, in order
        operands = [int(steps[0][0])] + [int(b) for _, _, b, _ in steps]
        assert [int(x) for x in re.findall(r"\d+", prompt)] == operands, record


def test_style_mix_and_quality_knob(train: dict, val: dict) -> None:
    records = single_turn(train["instructions"])
    for group, mix in world.STYLE_MIX.items():
        mine = [r for r in records if world._STYLE_GROUP[r["family"]] == group]
        for style, share in mix.items():
            found = sum(r["style"] == style for r in mine) / len(mine)
            assert abs(found - share) < 4 * (share * (1 - share) / len(mine)) ** 0.5, (group, style, found, share)
    # The off-rule habit is the most common reply of its group, so an SFT policy keeps it in its greedy replies.
    assert world.STYLE_MIX["short"]["chatty"] > world.STYLE_MIX["short"]["canonical"]
    assert world.STYLE_MIX["worked"]["terse"] > world.STYLE_MIX["worked"]["canonical"]
    assert {r["style"] for r in val["instructions"]} == {"canonical"}
    assert {r["style"] for r in world.instruction_examples("train", 500, quality=1.0)} == {"canonical"}
    low = single_turn(world.instruction_examples("train", 1500, quality=0.2))
    assert 0.15 < sum(r["style"] == "canonical" for r in low) / len(low) < 0.25
    chatty = next(r for r in records if r["style"] == "chatty")
    assert last_reply(chatty) == f"{world.CHATTY_OPENER} {world.canonical_reply(chatty['messages'][0]['content'])}"
    terse = next(r for r in records if r["style"] == "terse")
    assert last_reply(terse) == f"The answer is {terse['answer']}."
    # The judge agrees with the styles: canonical replies score 1, others less (except a terse reply, which is
    # concise and well formed: only the GRPO format reward asks for working); only "wrong" ones are wrong.
    for record in records[:2000] + single_turn(val["instructions"]):
        parts = world.judge_breakdown(record, last_reply(record))
        if record["style"] in ("canonical", "terse"):
            assert parts["score"] == 1.0, record
        else:
            assert parts["score"] < 1.0 and parts["correct"] == float(record["style"] != "wrong"), (record, parts)


def test_judge_ranks_chosen_above_rejected(train: dict, val: dict) -> None:
    for record in train["preferences"] + val["preferences"]:
        chosen, rejected = record["chosen"][0]["content"], record["rejected"][0]["content"]
        good, bad = world.judge_breakdown(record, chosen), world.judge_breakdown(record, rejected)
        assert good["score"] > bad["score"], (record, good, bad)
        assert world.judge(record["prompt"], chosen) == good["score"]  # messages alone are enough
        assert 0.0 <= bad["score"] < 1.0
        assert good["score"] == 1.0 or (record["rule"] == "correct" and good["correct"] == 1.0)
        rule_part = {"correct": "correct", "concise": "concise", "well_formed": "well_formed"}[record["rule"]]
        assert bad[rule_part] < 1.0, (record, bad)
    assert {r["rule"] for r in train["preferences"]} == set(world.PREFERENCE_RULES)


def test_judge_examples() -> None:
    prompt = "What is 23 + 48?"
    assert world.judge(prompt, "23 + 48 = 71.") == 1.0
    assert world.judge(prompt, "The answer is 71.") == 1.0
    assert world.judge(prompt, "23 + 48 = 72.") == pytest.approx(0.4)
    rambling = "Let me think about this. We need to add 23 and 48. Adding them gives 71. So the answer is 71, I hope!"
    assert 0.6 < world.judge(prompt, rambling) < 0.9
    assert world.judge(prompt, "71 71 71") < world.judge(prompt, "23 + 48 = 71.")
    assert world.judge(prompt, "") == 0.0
    assert world.judge("Write 71 in words.", "seventy-one.") == 1.0
    assert world.judge("Write 71 in words.", "seventy.") < 0.5
    assert world.judge("Count from 3 to 7, separated by commas.", "3, 4, 5, 6, 7.") == 1.0
    assert (
        world.canonical_reply("Solve: (12 + 7) * 3 - 5.") == "12 + 7 = 19. 19 * 3 = 57. 57 - 5 = 52. The answer is 52."
    )
    with pytest.raises(ValueError):
        world.judge("Tell me a joke.", "no")


def test_math_levels(train: dict) -> None:
    records = train["math"]
    assert {r["level"] for r in records} == {1, 2, 3}
    for r in records:
        steps = re.findall(r"\d+ [+\-*] \d+ = \d+\.", r["solution"])
        assert len(steps) == r["level"], r
        assert len(re.findall(r"\d+", r["prompt"])) == r["level"] + 1, r
        assert r["answer"].isdigit() and 0 <= int(r["answer"]) < 100
        if m := re.fullmatch(r"(?:Solve: |Work out |Find the value of )([\d+\-*() ]+)\.", r["prompt"]):
            assert len(re.findall(r"[+\-*]", m[1])) == r["level"]
    assert {r["level"] for r in world.math_problems("train", 200, levels=(3,))} == {3}
    assert {r["level"] for r in world.math_problems("val", 200, levels=(1, 2))} == {1, 2}


def test_instruction_families_and_tool_shape(train: dict) -> None:
    records = train["instructions"]
    assert {r["family"] for r in records} == set(world.INSTRUCTION_FAMILIES)
    tool = next(r for r in single_turn(records) if r["family"] == "tool")
    assert [m["role"] for m in tool["messages"]] == ["user", "assistant", "tool", "assistant"]
    call = tool["messages"][1]
    assert call["content"] == "" and call["tool_calls"][0]["id"] == "call_0"
    assert call["tool_calls"][0]["type"] == "function" and call["tool_calls"][0]["function"]["name"] == "calculator"
    assert tool["messages"][2]["tool_call_id"] == "call_0"
    assert world.CALCULATOR_TOOL in tool["tools"]
    phrasings = {re.sub(r"\d+", "N", r["messages"][0]["content"]) for r in single_turn(records) if r["family"] == "add"}
    assert len(phrasings) >= 4
    only = world.instruction_examples("train", 200, families=["add", "sub"])
    assert {r["family"] for r in only} == {"add", "sub"}
    val_conversations = [json.dumps(r["messages"]) for r in world.instruction_examples("val", 500)]
    assert len(set(val_conversations)) == len(val_conversations)  # held-out conversations are unique


def test_speed() -> None:
    start = time.perf_counter()
    world.instruction_examples("train", 20_000, seed=5)
    # conversations cost more than single questions (each turn is rendered to check the length budget)
    assert time.perf_counter() - start < 6.0


def test_corpus(corpus: str) -> None:
    assert corpus.isascii()
    assert 2_900_000 <= len(corpus) <= 3_000_000
    docs = corpus.strip("\n").split("\n\n")
    assert len(docs) > 5000 and all(doc.strip() == doc and doc for doc in docs)
    for phrase in (" + ", " - ", " * ", " plus ", " minus ", " times ", "The answer is", "in words", "Counting"):
        assert phrase in corpus, phrase
    assert len(world.pretrain_corpus(n_chars=10_000)) <= 10_000


NOTE_CALL = re.compile(r"(calculator|convert) (\{[^}]*\})")


def test_tool_notes_write_each_call_as_the_chat_does_with_its_true_result(corpus: str) -> None:
    """The corpus's tool notes teach the call itself: the tool's name and its JSON arguments exactly as a chat
    tool call carries them, made from the question before it, then the result the real tool gives."""
    from stagelm.tools import run_tool_call

    notes = [line for line in corpus.splitlines() if NOTE_CALL.search(line)]
    assert len(notes) > 500
    kinds = set()
    for line in notes[:400]:
        calls = NOTE_CALL.findall(line)
        question, rest = line.split(f"{calls[0][0]} {{", 1)
        stated = re.search(r" (?:gives|says) (.*?)\. ", rest).group(1).split(" and ")
        assert len(stated) == len(calls) in (1, 2), line
        for (name, arguments), result in zip(calls, stated):
            args = json.loads(arguments)
            assert result == run_tool_call({"function": {"name": name, "arguments": arguments}}), line
            # every argument comes from the question: the expression's numbers, or the value and both units
            if name == "calculator":
                parts = re.findall(r"\d+", args["expression"])
            else:
                parts = [str(args["value"]), f" {args['from_unit']}", f" {args['to_unit']}"]
            assert all(part in question for part in parts), line
            kinds.add((name, len(calls), result.startswith("error")))
    assert {("calculator", 1, False), ("convert", 1, False), ("convert", 1, True)} <= kinds
    assert any(n == 2 for _, n, _ in kinds)


def test_calculator() -> None:
    assert world.calculator("4821 * 37") == "178377"
    assert world.calculator("(12 + 7) * 3 - 5") == "52"
    for bad in ("__import__('os')", "2 ** 100000", "1 / 2", "x + 1"):
        with pytest.raises(ValueError):
            world.calculator(bad)


def test_write_builtin_files(tmp_path) -> None:
    paths = world.write_builtin_files(
        tmp_path, n_chars=20_000, n_instructions=50, n_preferences=30, n_math=40, n_val=10
    )
    assert set(paths) == {"corpus"} | {
        f"{k}_{s}" for k in ("instructions", "preferences", "math") for s in world.SPLITS
    }
    assert paths["corpus"].read_text().isascii()
    lines = paths["math_train"].read_text().splitlines()
    assert len(lines) == 40 and set(json.loads(lines[0])) == {"prompt", "answer", "level", "solution"}
    assert len(paths["instructions_val"].read_text().splitlines()) == 10
