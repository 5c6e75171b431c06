"""Every stage writes, next to its before/after headline metrics in metrics.json, the per-item values they are
means of: the same held-out items in the same order before and after (so the report can pair them), and means
that reproduce the logged figures. Tiny model, a few steps per stage, on the fault-tolerance tests' chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagelm.cli.train import train
from stagelm.stages.facts import STAGES
from tests.conftest import compose_train
from tests.integration.test_fault_tolerance import chain, stage_args  # noqa: F401 - chain is a fixture


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo", "dpo", "grpo"])
def test_metrics_json_holds_the_items_behind_each_headline(stage: str, chain: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    train(compose_train(tmp_path, *stage_args(stage, chain, 2), "validate_before=true", "checkpoint_every_n_steps=0"))
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    headlines = [m for m, _ in STAGES[stage].headlines if m in summary["after"]]
    assert headlines, sorted(summary["after"])
    for when in ("before", "after"):
        items = summary[f"{when}_items"]
        for metric in headlines:
            assert metric in items, (when, metric, sorted(items))
            values = items[metric]
            assert sum(values) / len(values) == pytest.approx(summary[when][metric], rel=1e-4, abs=1e-5), metric
    for metric in headlines:
        assert len(summary["before_items"][metric]) == len(summary["after_items"][metric]), metric
    if stage == "sft":  # per family too: the report's scorecard reads them
        after, items = summary["after"], summary["after_items"]
        families = [k for k in items if k.startswith("val/exact_match_")]
        assert families
        for key in families:
            assert sum(items[key]) / len(items[key]) == pytest.approx(after[key]), key
