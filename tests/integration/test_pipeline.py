"""The whole pipeline with the tiny model (slow): every stage runs from the checkpoint of the one before, the
report has its keys and every stage improved its headline metric; a second run skips everything, and changing
one stage's setting re-runs only that stage and those after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagelm.cli.pipeline import main
from tests.conftest import run_main_in_process

# small budgets so the tiny model finishes every stage in about a minute each on 2 cores
TINY = [
    "model=tiny",
    "pretrain.trainer.max_steps=300",
    "pretrain.trainer.val_check_interval=150",
    "pretrain.data.builtin_chars=400000",
    "pretrain.data.block_size=64",
    "sft.trainer.max_steps=300",
    "sft.trainer.val_check_interval=150",
    "sft.data.builtin_train=3000",
    "sft.data.eval_examples=60",
    "reward.trainer.max_steps=60",
    "reward.trainer.val_check_interval=30",
    "ppo.trainer.max_steps=20",
    "ppo.trainer.val_check_interval=10",
    "dpo.trainer.max_steps=40",
    "dpo.trainer.val_check_interval=20",
    "grpo.trainer.max_steps=6",
    "grpo.trainer.val_check_interval=3",
]


def pipeline(out: Path, *extra: str):
    result = run_main_in_process(main, f"out_dir={out}", *TINY, *extra, cwd=out.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "pipeline"
    first = pipeline(out)
    assert "[stage 1/6] pretrain" in first.stdout and "[stage 6/6] grpo" in first.stdout
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == ["pretrain", "sft", "reward", "ppo", "dpo", "grpo"]
    for stage, info in report["stages"].items():
        assert info["headline"], stage
        assert info["wall_time_s"] > 0 and info["global_step"] > 0, stage
    # The tiny model (0.12M parameters) cannot learn two-digit arithmetic in a minute, so SFT is judged by its second
    # headline metric, PPO by the world's true preference (its reward-model score moves by noise in 20 iterations)
    # and GRPO, which starts near 0, not at all; the small model's thresholds are in the per-stage learning tests.
    for stage in ("pretrain", "reward", "dpo"):
        assert report["stages"][stage]["improved"] is True, (stage, report["stages"][stage]["headline"])
    sft = report["stages"]["sft"]["headline"]["val/format_ok"]
    assert sft["after"] > sft["before"] + 0.5
    assert report["stages"]["ppo"]["headline"]["val/win_rate_vs_sft"]["after"] > 0.5
    assert set(report["samples"]["What is 23 + 48?"]) == {"pretrain", "sft", "ppo", "dpo", "grpo"}
    assert {"loss.png", "expert_load.png"} <= set(report["plots"])
    assert (out / "report.md").read_text().startswith("# stagelm pipeline report")

    again = pipeline(out)
    assert again.stdout.count("skipped") == 6

    changed = pipeline(out, "grpo.trainer.max_steps=7")
    assert changed.stdout.count("skipped") == 5 and (out / "grpo.previous").is_dir()
