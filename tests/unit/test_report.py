"""The pipeline report's per-stage summary: headline metrics from metrics.json, the RL sampler's speed from
history.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from stagelm.report import render_markdown, stage_summary


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
    assert "| rollout tokens/s |" in table
    assert "| grpo | val/accuracy | 0.2 | 0.3 | yes | 1.0 min | 2.00M | 1,234 |" in table
