"""Every config group option and every experiment composes, and the objects it names can be built."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from stagelm.cli.train import build_model_config
from tests.conftest import CONF_DIR, compose_train

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(tmp_path: Path, experiment: str) -> None:
    cfg = compose_train(tmp_path, f"experiment={experiment}")
    assert cfg.stage._target_.startswith("stagelm.stages.")
    build_model_config(cfg, vocab_size=100)


@pytest.mark.parametrize("group", ["model", "trainer", "logger", "tokenizer", "stage", "data", "debug"])
def test_every_group_option_composes(tmp_path: Path, group: str) -> None:
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        cfg = compose_train(tmp_path, f"{group}={option}")
        if group == "model":
            assert build_model_config(cfg, vocab_size=100).num_params() > 0
        if group == "logger":
            for logger_cfg in (cfg.logger or {}).values():
                assert instantiate(logger_cfg) is not None


def test_shakespeare_experiment_matches_the_nanogpt_recipe(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, "experiment=shakespeare_char", "data.path=x.txt")
    assert (cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_model) == (4, 4, 128)
    assert (cfg.data.block_size, cfg.data.batch_size, cfg.trainer.max_steps) == (64, 12, 2000)
    assert cfg.stage.optimizer.lr == 1e-3


def test_sweeper_and_slurm_launcher_configs_compose(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna", "logger=none"], return_hydra_config=True)
        assert cfg.hydra.sweeper.params["stage.optimizer.lr"].startswith("tag(log")
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.trainer.strategy == "ddp"
