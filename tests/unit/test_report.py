"""The pipeline report: per stage, headline metrics from metrics.json with their bootstrap intervals and the
verdict on the change (yes / within noise / worse, or the old comparison for runs without per-item values), the
RL sampler's speed from history.jsonl; the scorecard of held-out exact match per family and chat stage, checked
against numbers computed by hand and, end to end, on tiny checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stagelm.intervals import mean_interval
from stagelm.report import render_markdown, scorecard, scorecard_items, stage_summary, write_report
from tests.conftest import tiny_model_config


def test_rollout_speed_is_the_median_over_the_logged_steps(tmp_path: Path) -> None:
    metrics = {"before": {"val/accuracy": 0.2}, "after": {"val/accuracy": 0.3}, "wall_time_s": 60.0}
    (tmp_path / "metrics.json").write_text(json.dumps({**metrics, "tokens_seen": 1000, "global_step": 3}))
    rows = [{"step": 1, "rollout/tokens_per_sec": 900.0}, {"step": 2}, {"step": 3, "rollout/tokens_per_sec": 1100.0}]
    rows.append({"step": 4, "rollout/tokens_per_sec": 1000.0})
    (tmp_path / "history.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    summary = stage_summary(tmp_path, "grpo")
    assert summary["rollout_tokens_per_sec"] == 1000.0
    assert summary["headline"]["val/accuracy"] == {"before": 0.2, "after": 0.3}

    (tmp_path / "history.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0}))
    assert stage_summary(tmp_path, "sft")["rollout_tokens_per_sec"] is None


def test_the_markdown_table_shows_the_rollout_speed() -> None:
    stage = {"headline": {"val/accuracy": {"before": 0.2, "after": 0.3}}, "improved": True, "wall_time_s": 60.0}
    report = {
        "stages": {"grpo": {**stage, "tokens_seen": 2e6, "rollout_tokens_per_sec": 1234.4}},
        "samples": {},
        "plots": [],
        "total_wall_time_s": 60.0,
        "total_tokens_seen": 2e6,
    }
    table = render_markdown(report)
    assert "| change | improved |" in table and "| rollout tokens/s |" in table
    assert "| grpo | val/accuracy | 0.2 | 0.3 | +0.1 | yes | 1.0 min | 2.00M | 1,234 |" in table


# 50 held-out items: 40 go from wrong to right and 10 from right to wrong (+0.6), or 5 flip each way (no change)
BEFORE = [0.0] * 40 + [1.0] * 10
BETTER = [1.0] * 40 + [0.0] * 10
NOISE = [1.0] * 5 + [0.0] * 35 + [1.0] * 5 + [0.0] * 5


def write_metrics(stage_dir: Path, before: dict, after: dict, **items: dict) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    summary = {"before": before, "after": after, "wall_time_s": 60.0, "tokens_seen": 1000, "global_step": 3}
    (stage_dir / "metrics.json").write_text(json.dumps(summary | items))


def test_improved_is_yes_only_beyond_the_uncertainty(tmp_path: Path) -> None:
    write_metrics(
        tmp_path,
        {"val/exact_match": 0.2, "val/format_ok": 0.2},
        {"val/exact_match": 0.8, "val/format_ok": 0.2},
        before_items={"val/exact_match": BEFORE, "val/format_ok": BEFORE},
        after_items={"val/exact_match": BETTER, "val/format_ok": NOISE},
    )
    headline = stage_summary(tmp_path, "sft")["headline"]
    clear, noise = headline["val/exact_match"], headline["val/format_ok"]
    assert clear["before"] == 0.2 and clear["after"] == 0.8  # the old keys, unchanged
    assert clear["before_interval"] == mean_interval(BEFORE).as_list()
    assert clear["after_interval"] == mean_interval(BETTER).as_list()
    assert clear["change"]["estimate"] == pytest.approx(0.6) and clear["change"]["paired"]
    assert clear["change"]["n"] == 50 and clear["change"]["interval"][0] > 0.35
    assert clear["verdict"] == "yes" and noise["verdict"] == "within noise"
    assert noise["change"]["interval"][0] < 0 < noise["change"]["interval"][1]
    # the other way round, for a metric where lower is better: the same figures are a regression
    write_metrics(tmp_path, {"val/loss": 0.8}, {"val/loss": 0.2}, before_items={"val/loss": BETTER})
    write_metrics(
        tmp_path,
        {"val/loss": 0.2},
        {"val/loss": 0.8},
        before_items={"val/loss": BEFORE},
        after_items={"val/loss": BETTER},
    )
    assert stage_summary(tmp_path, "pretrain")["headline"]["val/loss"]["verdict"] == "worse"


def test_the_stage_verdict_follows_the_first_headline_and_old_runs_keep_the_plain_comparison(tmp_path: Path) -> None:
    from stagelm.report import improved, stage_verdict

    write_metrics(
        tmp_path,
        {"val/accuracy": 0.2},
        {"val/accuracy": 0.3},
        before_items={"val/accuracy": BEFORE},
        after_items={"val/accuracy": NOISE},
    )
    headline = stage_summary(tmp_path, "grpo")["headline"]
    assert improved("grpo", headline) is False and stage_verdict("grpo", headline) == "within noise"
    # a run from before per-item values were recorded: "improved" is the plain comparison, no verdict
    write_metrics(tmp_path, {"val/accuracy": 0.2}, {"val/accuracy": 0.3})
    headline = stage_summary(tmp_path, "grpo")["headline"]
    assert headline["val/accuracy"] == {"before": 0.2, "after": 0.3}
    assert improved("grpo", headline) is True and stage_verdict("grpo", headline) is None


def test_the_markdown_table_shows_intervals_and_verdicts(tmp_path: Path) -> None:
    write_metrics(
        tmp_path,
        {"val/accuracy": 0.2},
        {"val/accuracy": 0.8},
        before_items={"val/accuracy": BEFORE},
        after_items={"val/accuracy": BETTER},
    )
    info = stage_summary(tmp_path, "grpo") | {"improved": True}
    report = {"stages": {"grpo": info}, "samples": {}, "plots": [], "total_wall_time_s": 60, "total_tokens_seen": 1000}
    (row,) = [line for line in render_markdown(report).splitlines() if line.startswith("| grpo |")]
    b_low, b_high = info["headline"]["val/accuracy"]["before_interval"]
    c_low, c_high = info["headline"]["val/accuracy"]["change"]["interval"]
    assert f"| 0.2 [{b_low:.3g}, {b_high:.3g}] |" in row
    assert f"| +0.6 [{c_low:+.3g}, {c_high:+.3g}] | yes |" in row


def test_the_scorecard_flags_families_lower_than_sft_beyond_the_uncertainty() -> None:
    # sft gets all 20 right; grpo forgets every "add" item (a change of exactly -1: a zero-width interval) and
    # keeps "sub"; overall it loses 10 of 20: -0.5 +- 1.96 * sqrt(0.25 / 20) = [-0.72, -0.28], below 0 too
    items = {
        "sft": {"all": [1.0] * 20, "sub": [1.0] * 10, "add": [1.0] * 10},
        "grpo": {"all": [0.0] * 10 + [1.0] * 10, "sub": [1.0] * 10, "add": [0.0] * 10},
    }
    card = scorecard(items)
    assert card["families"] == ["all", "add", "sub"]  # overall first, then the world's family order
    sft, grpo = card["stages"]["sft"], card["stages"]["grpo"]
    assert sft["add"] == {"exact_match": 1.0, "interval": [1.0, 1.0], "n": 10}
    assert grpo["add"]["vs_sft"]["interval"] == [-1.0, -1.0] and grpo["add"]["lower"]
    assert grpo["sub"]["vs_sft"]["estimate"] == 0.0 and not grpo["sub"]["lower"]
    low, high = grpo["all"]["vs_sft"]["interval"]
    assert low == pytest.approx(-0.72, abs=0.04) and high == pytest.approx(-0.28, abs=0.04)
    assert [(c["stage"], c["family"]) for c in card["lower_than_sft"]] == [("grpo", "all"), ("grpo", "add")]
    report = {"stages": {}, "samples": {}, "plots": [], "total_wall_time_s": 0, "total_tokens_seen": 0}
    text = render_markdown(report | {"scorecard": card})
    assert "| family | n | sft | grpo |" in text
    assert "| add | 10 | 1 [1, 1] | 0 [0, 0] **lower** |" in text
    assert "Lower than SFT beyond the uncertainty: grpo on all (-0.5 [" in text


def save_tiny_chat_checkpoint(path: Path, stage: str, seed: int, run_config: dict) -> None:
    from stagelm.checkpoint import atomic_torch_save, stagelm_metadata
    from stagelm.model import Transformer
    from stagelm.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.train([])  # printable ASCII: the built-in conversations' characters
    config = tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=128)  # the report answers in 64
    torch.manual_seed(seed)
    state = {f"model.{k}": v for k, v in Transformer(config).state_dict().items()}
    meta = stagelm_metadata(config, tokenizer, stage, run_config=run_config)
    atomic_torch_save({"state_dict": state, "stagelm": meta}, path)


def test_the_report_scores_each_chat_stage_on_sfts_eval_set(tmp_path: Path) -> None:
    from stagelm.data.instruct import InstructDataModule
    from stagelm.data.world import INSTRUCTION_FAMILIES

    data = {"_target_": "stagelm.data.instruct.InstructDataModule", "builtin_val": 40, "eval_examples": 12, "seed": 3}
    run_config = {"data": data, "stage": {"eval_max_new_tokens": 3, "eval_batch_size": 12}}
    for stage, seed in (("sft", 0), ("reward", 0), ("grpo", 0), ("dpo", 1)):
        save_tiny_chat_checkpoint(tmp_path / stage / "checkpoints" / "last.ckpt", stage, seed, run_config)
        write_metrics(tmp_path / stage, {}, {})
    items = scorecard_items(tmp_path, ["sft", "reward", "grpo", "dpo"])
    assert list(items) == ["sft", "grpo", "dpo"]  # the reward model is no chat model
    expected = InstructDataModule(builtin_val=40, eval_examples=12, seed=3).eval_set()
    assert len(expected) == 12 and len(items["sft"]["all"]) == 12
    for family, values in items["sft"].items():
        assert family == "all" or family in INSTRUCTION_FAMILIES
        assert len(values) == (12 if family == "all" else sum(c.family == family for c in expected))
    assert items["grpo"] == items["sft"]  # the same weights answer the same conversations the same way

    # SFT's own last validation gives its column when it scored the final weights (it ran at the last step)
    validated = {"val/exact_match": [1.0] * 12, "val/exact_match_add": [1.0] * 3}
    write_metrics(tmp_path / "sft", {}, {}, after_items=validated)
    (tmp_path / "sft" / "history.jsonl").write_text(json.dumps({"step": 3, "val/exact_match": 1.0}))
    assert scorecard_items(tmp_path, ["sft"])["sft"] == {"all": [1.0] * 12, "add": [1.0] * 3}
    (tmp_path / "sft" / "history.jsonl").write_text(json.dumps({"step": 2, "val/exact_match": 1.0}))
    assert scorecard_items(tmp_path, ["sft"])["sft"] == items["sft"]  # an earlier validation: evaluated afresh

    report_path = write_report(tmp_path, ["sft", "reward", "grpo", "dpo"], ["What is 2 + 2?"], logger="none")
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["scorecard"]["stages"]) == ["sft", "grpo", "dpo"]
    assert report["scorecard"]["stages"]["grpo"]["all"]["vs_sft"]["interval"] == [0.0, 0.0]
    assert "## Held-out exact match per task family" in report_path.read_text()


def test_no_scorecard_when_sfts_eval_set_cannot_be_rebuilt(tmp_path: Path) -> None:
    data = {"_target_": "stagelm.data.instruct.InstructDataModule", "path": str(tmp_path / "moved.jsonl")}
    save_tiny_chat_checkpoint(tmp_path / "sft" / "checkpoints" / "last.ckpt", "sft", 0, {"data": data})
    assert scorecard_items(tmp_path, ["sft"]) == {}
    save_tiny_chat_checkpoint(tmp_path / "sft" / "checkpoints" / "last.ckpt", "sft", 0, {})  # no config saved
    assert scorecard_items(tmp_path, ["sft"]) == {}
