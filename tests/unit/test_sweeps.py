"""The multirun summary: one row per run, and per setting repeated over seeds each headline's mean and spread,
against numbers computed by hand, from the files real runs leave (`.hydra/overrides.yaml`, `report.json`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from stagelm.sweeps import SweepSummary, across_runs


def fake_pipeline_run(job_dir: Path, overrides: list[str], sft: float, grpo: float) -> None:
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    report = {
        "stages": {
            "sft": {"headline": {"val/exact_match": {"before": 0.0, "after": sft}}, "verdict": "yes"},
            "grpo": {"headline": {"val/accuracy": {"before": 0.2, "after": grpo}}, "verdict": "yes"},
        }
    }
    if grpo < 0.4:
        report["stages"]["grpo"]["verdict"] = "within noise"
    lower = [{"stage": "grpo", "family": "add", "estimate": -0.3, "interval": [-0.5, -0.1]}] if grpo > 0.5 else []
    report["scorecard"] = {"families": [], "stages": {}, "lower_than_sft": lower}
    (job_dir / "report.json").write_text(json.dumps(report))


def test_a_seed_sweep_shows_each_headlines_mean_and_spread(tmp_path: Path) -> None:
    # sft 0.5, 0.6, 0.7: mean 0.6, sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1; grpo 0.3, 0.3, 0.6: mean 0.4,
    # std sqrt((0.01 + 0.01 + 0.04) / 2) = 0.1732
    for seed, (sft, grpo) in enumerate([(0.5, 0.3), (0.6, 0.3), (0.7, 0.6)]):
        fake_pipeline_run(tmp_path / str(seed), [f"seed={seed}"], sft, grpo)
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    spreads = {s["metric"]: s for s in json.loads((tmp_path / "summary_across_runs.json").read_text())}
    assert set(spreads) == {"sft val/exact_match", "grpo val/accuracy"}
    sft, grpo = spreads["sft val/exact_match"], spreads["grpo val/accuracy"]
    assert sft["setting"] == "(defaults)" and sft["runs"] == 3
    assert sft["mean"] == pytest.approx(0.6) and sft["std"] == pytest.approx(0.1)
    assert (sft["min"], sft["max"]) == (0.5, 0.7)
    assert grpo["mean"] == pytest.approx(0.4) and grpo["std"] == pytest.approx(0.1732, abs=1e-4)
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert len(rows) == 3  # still one row per run, with the stages that improved beyond their uncertainty
    assert [r["improved"] for r in rows] == ["1/2 (grpo: within noise)", "1/2 (grpo: within noise)", "2/2"]
    assert [r["lower than sft"] for r in rows] == ["none", "none", "grpo add"]
    text = (tmp_path / "summary.md").read_text()
    assert "Across runs" in text
    assert "| (defaults) | sft val/exact_match | 0.6 | 0.1 | 0.5 | 0.7 | 3 |" in text


def test_runs_are_grouped_by_their_setting_without_the_seed() -> None:
    rows = [
        {"run": "0", "overrides": "grpo.beta=0 seed=0", "grpo val/accuracy": 0.3},
        {"run": "1", "overrides": "grpo.beta=0 seed=1", "grpo val/accuracy": 0.5},
        {"run": "2", "overrides": "grpo.beta=0.04 seed=0", "grpo val/accuracy": 0.4},
    ]
    # beta=0.04 ran once: it has no spread to show
    (only,) = across_runs(rows)
    assert only["setting"] == "grpo.beta=0" and only["mean"] == pytest.approx(0.4) and only["runs"] == 2
