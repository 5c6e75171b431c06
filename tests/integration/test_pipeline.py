"""The whole pipeline with the tiny model (slow): every stage runs from the checkpoint of the one before, the
report has its keys and every stage improved its headline metric; a second run skips everything, and changing
one stage's setting re-runs only that stage and those after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagelm.cli.pipeline import main
from tests.conftest import run_main_in_process

# budgets with which the tiny model (0.24M parameters) improves every stage's headline metric, measured 12.5 minutes
# on 2 cores: SFT needs 1,500 steps before its exact match gives GRPO a policy worth sharpening (at 1,200 it reached
# 0.18 and 40 GRPO steps lowered greedy accuracy), PPO's reward-model score needs ~150 iterations to rise past noise,
# and GRPO's greedy accuracy wobbles by +-0.05 between validations for its first ~60 steps.
TINY = [
    "model=tiny",
    "pretrain.trainer.max_steps=3000",
    "pretrain.trainer.val_check_interval=1500",
    "pretrain.data.block_size=64",
    "sft.trainer.max_steps=1500",
    "sft.trainer.val_check_interval=750",
    "sft.data.builtin_train=6000",
    "sft.data.eval_examples=100",
    "reward.trainer.max_steps=60",
    "reward.trainer.val_check_interval=30",
    "ppo.trainer.max_steps=150",
    "ppo.trainer.val_check_interval=75",
    "dpo.trainer.max_steps=40",
    "dpo.trainer.val_check_interval=20",
    "grpo.trainer.max_steps=80",
    "grpo.trainer.val_check_interval=40",
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
        assert info["improved"] is True, (stage, info["headline"])
    assert set(report["samples"]["What is 23 + 48?"]) == {"pretrain", "sft", "ppo", "dpo", "grpo"}
    assert {"loss.png", "expert_load.png"} <= set(report["plots"])
    assert (out / "report.md").read_text().startswith("# stagelm pipeline report")

    again = pipeline(out)
    assert again.stdout.count("skipped") == 6

    changed = pipeline(out, "grpo.trainer.max_steps=7")
    assert changed.stdout.count("skipped") == 5 and (out / "grpo.previous").is_dir()
