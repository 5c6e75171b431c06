"""The pipeline's plan, without running a stage: how per-stage settings become overrides, which checkpoint each
stage starts from, and which stages a changed setting invalidates (the hash that makes re-runs idempotent)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from stagelm.cli.pipeline import plan, stage_overrides
from tests.conftest import CONF_DIR


def pipeline_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("pipeline", overrides=list(overrides))


def test_stage_settings_become_overrides() -> None:
    settings = {"beta": 0, "trainer": {"max_steps": 5}, "data.levels": [1, 2], "init_from": None, "placebo": True}
    assert stage_overrides(settings) == [
        "stage.beta=0",
        "trainer.max_steps=5",
        "data.levels=[1, 2]",
        "stage.init_from=null",
        "stage.placebo=true",
    ]


def test_each_stage_starts_from_the_one_before(tmp_path: Path) -> None:
    stages = {s.name: s for s in plan(pipeline_config(), tmp_path, "small")}
    assert list(stages) == ["pretrain", "sft", "reward", "ppo", "dpo", "grpo"]

    def ckpt(name: str) -> str:
        return str(tmp_path / name / "checkpoints" / "last.ckpt")

    assert stages["pretrain"].init_from is None
    assert stages["sft"].init_from == ckpt("pretrain")
    assert stages["reward"].init_from == stages["ppo"].init_from == stages["dpo"].init_from == ckpt("sft")
    assert stages["ppo"].reward_model == ckpt("reward")
    assert stages["grpo"].init_from == ckpt("ppo")
    # without PPO, GRPO starts from SFT
    no_ppo = {s.name: s for s in plan(pipeline_config("stages=[pretrain,sft,grpo]"), tmp_path, "small")}
    assert no_ppo["grpo"].init_from == ckpt("sft")
    # the demo's budgets reach the stages as overrides
    assert "trainer.max_steps=4000" in stages["pretrain"].overrides
    assert "model=small" in stages["sft"].overrides


def test_a_changed_setting_invalidates_that_stage_and_those_after_it(tmp_path: Path) -> None:
    before = {s.name: s.key for s in plan(pipeline_config(), tmp_path, "small")}
    cfg = pipeline_config()
    with open_dict(cfg):
        cfg.sft.trainer.max_steps = cfg.sft.trainer.max_steps + 50
    after = {s.name: s.key for s in plan(cfg, tmp_path, "small")}
    assert after["pretrain"] == before["pretrain"]
    assert all(after[s] != before[s] for s in ("sft", "reward", "ppo", "dpo", "grpo"))
    # a GRPO-only change touches GRPO alone; the same config always gives the same keys
    cfg = pipeline_config("++grpo.beta=0.04")  # what stagelm-pipeline rewrites `grpo.beta=0.04` to
    changed = {s.name: s.key for s in plan(cfg, tmp_path, "small")}
    assert [s for s in before if changed[s] != before[s]] == ["grpo"]
    assert {s.name: s.key for s in plan(pipeline_config(), tmp_path, "small")} == before


@pytest.mark.parametrize(
    ("stages", "message"),
    [("[pretrain,banana]", "unknown stage"), ("[pretrain,ppo]", "needs one of"), ("[pretrain,sft,ppo]", "reward")],
)
def test_impossible_stage_lists_are_clear_errors(tmp_path: Path, stages: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        plan(pipeline_config(f"stages={stages}"), tmp_path, "small")


TRICKY = ["a, b", 'it\'s "quoted"', "x=y [z] {w}", "back\\slash", "end\\", "it\\'s", " spaces ", "123", "true", "null"]


def test_setting_values_reach_the_stage_as_they_were_written(tmp_path: Path) -> None:
    # strings with commas, quotes, brackets, `=` or that look like numbers pass through as the same strings
    cfg = pipeline_config()
    with open_dict(cfg):
        cfg.pretrain.sample_prompts = TRICKY
        cfg.pretrain.data = {"path": "/data/a,b/it's.txt"}
    (pretrain, *_) = plan(cfg, tmp_path, "tiny")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        train_cfg = compose("train", overrides=["stage=pretrain", *pretrain.overrides])
    assert list(train_cfg.stage.sample_prompts) == TRICKY
    assert train_cfg.data.path == "/data/a,b/it's.txt"


def test_a_bad_key_in_a_late_stage_fails_before_the_first_stage_runs(tmp_path: Path) -> None:
    import sys
    import time

    from stagelm.cli.pipeline import main

    for bad, named in (("grpo.trainer.max_stepz=3", "max_stepz"), ("grpo.betaa=0", "betaa")):
        saved, sys.argv = sys.argv, ["stagelm-pipeline", "model=tiny", f"out_dir={tmp_path}", "logger=csv", bad]
        started = time.perf_counter()
        try:
            with pytest.raises(SystemExit) as exit_info:
                main()
        finally:
            sys.argv = saved
        message = str(exit_info.value)
        assert message.startswith("error: the settings of stage grpo are invalid") and named in message, message
        assert time.perf_counter() - started < 20
        assert not (tmp_path / "pretrain").exists()  # nothing ran
