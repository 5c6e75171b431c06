"""SFT learns the task (slow): from the built-in pre-trained small model, held-out exact match on arithmetic
questions goes from near 0 (the pre-trained model prompted the same way) to >= 50%, and well-formed replies
to >= 90%. The stage's default config is the recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from stagelm.checkpoint import load_checkpoint
from stagelm.data.instruct import builtin_conversations
from stagelm.evaluation import answer_correct, format_ok, generate_replies


def held_out_scores(checkpoint: Path, n: int = 200) -> dict[str, float]:
    loaded = load_checkpoint(checkpoint)
    conversations = builtin_conversations("val", 300, seed=0, quality=1.0)[:n]
    replies = generate_replies(
        loaded.model,
        loaded.tokenizer,
        [c.prompt for c in conversations],
        [c.tools for c in conversations],
        max_new_tokens=64,
    )
    scores = {"exact_match": 0.0, "format_ok": 0.0}
    families: dict[str, list[bool]] = {}
    for conv, reply in zip(conversations, replies):
        ok = answer_correct(reply, conv.answer, conv.reference)
        scores["exact_match"] += ok / len(replies)
        scores["format_ok"] += format_ok(reply) / len(replies)
        families.setdefault(conv.family, []).append(ok)
    scores.update({f"exact_match_{k}": sum(v) / len(v) for k, v in families.items()})
    return scores


@pytest.mark.slow
def test_sft_lifts_exact_match_and_format(small_pretrain_checkpoint: Path, small_sft_checkpoint: Path) -> None:
    before = held_out_scores(small_pretrain_checkpoint)
    after = held_out_scores(small_sft_checkpoint)
    print(f"\nheld-out before SFT: {before}\nheld-out after SFT: {after}")
    assert before["exact_match"] < 0.10
    assert after["exact_match"] >= 0.50
    assert after["exact_match_add"] >= 0.50 and after["exact_match_sub"] >= 0.50
    assert after["format_ok"] >= 0.90
