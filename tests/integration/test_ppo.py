"""PPO through the real configs with the tiny model: the stage runs, changes the policy (and only the policy and
value model), logs its metrics, and writes a checkpoint every tool loads, without the frozen models; missing or
wrong inputs give clear errors. The learning test (slow) checks that the reward-model score of greedy replies to
held-out prompts rises without hacking the world's true preference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import stagelm
from stagelm.checkpoint import load_checkpoint, read_checkpoint
from stagelm.cli.train import train
from stagelm.errors import CheckpointError, ConfigError, DataError
from stagelm.reward_model import RewardModel
from tests.conftest import compose_train

TINY_PRETRAIN = [
    "model=tiny",
    "data.builtin_chars=200000",
    "data.block_size=64",
    "data.batch_size=16",
    "stage.sample_prompts=[]",
    "trainer.max_steps=30",
    "trainer.val_check_interval=30",
]
TINY_PPO = [
    "stage=ppo",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "data.batch_size=8",
    "data.builtin_train=64",
    "data.builtin_val=16",
    "data.eval_examples=8",
    "stage.max_new_tokens=16",
    "stage.eval_max_new_tokens=16",
    "stage.mini_batch_size=4",
    "stage.ppo_epochs=2",
    "stage.calibration_prompts=16",
    "stage.optimizer.lr=1e-3",
    "stage.warmup_steps=1",
]
PPO_METRICS = [
    "ppo/reward_mean",
    "ppo/kl",
    "ppo/entropy",
    "ppo/clipfrac",
    "ppo/approx_kl",
    "ppo/value_loss",
    "ppo/policy_loss",
    "ppo/explained_variance",
    "ppo/reply_length",
    "ppo/kl_coef",
    "ppo/no_eos_fraction",
    "ppo/true_preference",
    "val/rm_score",
    "val/rm_score_sft",
    "val/rm_score_gain_sd",
    "val/win_rate_vs_sft",
    "val/kl",
]


class KeepModule(L.Callback):
    """Hands the trained LightningModule back to the test (added with +callbacks.keep._target_=...)."""

    last: Any = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        KeepModule.last = pl_module


@pytest.fixture(scope="module")
def tiny_sft_and_reward(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tiny pre-training (30 steps) -> SFT (10 steps) -> reward model (10 steps): seconds."""
    tmp = tmp_path_factory.mktemp("chain")
    train(compose_train(tmp / "pre", *TINY_PRETRAIN))
    pre = tmp / "pre" / "run" / "checkpoints" / "last.ckpt"
    train(
        compose_train(
            tmp / "sft",
            "stage=sft",
            f"init_from={pre}",
            "trainer.max_steps=10",
            "trainer.val_check_interval=10",
            "data.builtin_train=300",
            "data.builtin_val=20",
            "data.eval_examples=8",
            "data.batch_size=8",
            "stage.eval_max_new_tokens=8",
        )
    )
    sft = tmp / "sft" / "run" / "checkpoints" / "last.ckpt"
    train(
        compose_train(
            tmp / "rm",
            "stage=reward",
            f"init_from={sft}",
            "trainer.max_steps=10",
            "trainer.val_check_interval=10",
            "data.builtin_train=200",
            "data.builtin_val=20",
            "data.batch_size=8",
        )
    )
    return sft, tmp / "rm" / "run" / "checkpoints" / "last.ckpt"


def test_ppo_stage_runs_logs_and_reloads(tmp_path: Path, tiny_sft_and_reward: tuple[Path, Path]) -> None:
    sft, rm = tiny_sft_and_reward
    metrics = train(
        compose_train(
            tmp_path,
            *TINY_PPO,
            f"init_from={sft}",
            f"reward_model={rm}",
            f"+callbacks.keep._target_={__name__}.KeepModule",
        )
    )
    missing = [m for m in PPO_METRICS if m not in metrics]
    assert not missing, (missing, sorted(metrics))
    assert 0.0 <= metrics["val/win_rate_vs_sft"] <= 1.0 and metrics["val/kl"] >= 0.0
    assert 0.0 <= metrics["ppo/no_eos_fraction"] <= 1.0
    # a tiny model on a CPU samples thousands of tokens a second, not billions (a lost sampling time once gave 1e12)
    assert 100 < metrics["rollout/tokens_per_sec"] < 1e6

    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    raw = read_checkpoint(ckpt_path)
    assert raw["global_step"] == 3  # one trainer step per PPO iteration, however many mini-batch updates
    assert not [k for k in raw["state_dict"] if k.startswith(("ref_model.", "reward_model."))]
    assert any(k.startswith("value_model.") for k in raw["state_dict"])
    assert raw["stagelm"]["stage"] == "ppo" and raw["stagelm"]["reward_model"] == str(rm)

    policy, tokenizer = stagelm.load(str(ckpt_path))
    before = load_checkpoint(sft)
    assert tokenizer.to_dict() == before.tokenizer.to_dict()
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, before.model.state_dict()[k])]
    assert len(changed) > 0.5 * len(before.model.state_dict())

    module = KeepModule.last
    for name, p in module.ref_model.state_dict().items():  # the frozen reference is still the SFT model
        assert torch.equal(p, before.model.state_dict()[name]), name
    reward = RewardModel.load(rm)
    for name, p in module.reward_model.state_dict().items():
        assert torch.equal(p, reward.state_dict()[name]), name
    assert not any(p.requires_grad for p in module.ref_model.parameters())
    assert not any(p.requires_grad for p in module.reward_model.parameters())
    assert "--- step 3 ---" in (tmp_path / "run" / "val_samples.txt").read_text()


def test_ppo_options_and_resume(tmp_path: Path, tiny_sft_and_reward: tuple[Path, Path]) -> None:
    sft, rm = tiny_sft_and_reward
    options = [
        *TINY_PPO,
        f"init_from={sft}",
        f"reward_model={rm}",
        "stage.value_init=policy",
        "stage.separate_value_optimizer=true",
        "stage.value_lr=1e-3",
        "stage.adaptive_kl=false",
        "stage.missing_eos_mode=replace",
        "stage.normalize_scores=false",
        "stage.samples_per_prompt=2",
        "stage.replay.coef=0.5",
        "stage.replay.builtin_examples=40",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
    ]
    metrics = train(compose_train(tmp_path / "a", *options))
    assert 0 < metrics["ppo/replay_loss"] < 20  # SFT replay on: the cross-entropy of real conversations
    default_kl_coef = compose_train(tmp_path, "stage=ppo").stage.kl_coef
    assert metrics["ppo/kl_coef"] == pytest.approx(default_kl_coef)  # fixed controller
    last = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 2
    resumed = train(
        compose_train(
            tmp_path / "b", *options[:-2], "trainer.max_steps=3", "trainer.val_check_interval=1", f"ckpt_path={last}"
        )
    )
    assert read_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert "ppo/reward_mean" in resumed


def test_ppo_without_reward_model_or_init_from_is_a_clear_error(
    tmp_path: Path, tiny_sft_and_reward: tuple[Path, Path]
) -> None:
    sft, rm = tiny_sft_and_reward
    with pytest.raises(ConfigError, match="reward_model=PATH"):
        train(compose_train(tmp_path, *TINY_PPO, f"init_from={sft}"))
    with pytest.raises(DataError, match="init_from"):
        train(compose_train(tmp_path, "stage=ppo", f"reward_model={rm}"))
    with pytest.raises(CheckpointError, match="not a reward model"):
        train(compose_train(tmp_path, *TINY_PPO, f"init_from={sft}", f"reward_model={sft}"))
    with pytest.raises(ConfigError, match="value_init"):
        train(compose_train(tmp_path, *TINY_PPO, f"init_from={sft}", f"reward_model={rm}", "stage.value_init=zeros"))


@pytest.mark.slow
def test_ppo_raises_the_reward_without_hacking_it(
    tmp_path: Path, small_sft_checkpoint: Path, small_reward_checkpoint: Path
) -> None:
    """The issue's thresholds with the stage's defaults, on greedy replies to held-out prompts: the reward-model
    score rises by >= 1 SD of the SFT policy's scores, KL stays below its target, and the world's true preference
    (not the reward model) prefers the PPO replies to SFT's >= 60% of the time, ties counting half."""
    metrics = train(
        compose_train(
            tmp_path, "stage=ppo", f"init_from={small_sft_checkpoint}", f"reward_model={small_reward_checkpoint}"
        )
    )
    target_kl = compose_train(tmp_path, "stage=ppo").stage.target_kl
    assert metrics["val/rm_score_gain_sd"] >= 1.0, metrics
    assert metrics["val/kl"] < target_kl and metrics["val/kl_sampled"] < target_kl, metrics
    assert metrics["val/win_rate_vs_sft"] >= 0.60, metrics
    # the reward was not hacked: the judge's mean score rises too, and replies still end
    assert metrics["val/true_preference"] > metrics["val/true_preference_sft"], metrics
    assert metrics["val/no_eos_fraction"] <= metrics["val/no_eos_fraction_sft"], metrics
    # the same holds, more weakly, for replies sampled like the rollouts
    assert metrics["val/rm_score_gain_sd_sampled"] >= 0.3 and metrics["val/win_rate_vs_sft_sampled"] >= 0.55, metrics
