"""Preference tuning through the real configs, with the tiny model: the reward model and DPO run, change the
weights, log their metrics and write checkpoints that reload (`stagelm.load`, `RewardModel.load`); the reward-model
API scores text and conversations. Learning tests (slow) hold the issue's thresholds on the small model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import stagelm
from stagelm.checkpoint import load_checkpoint, read_checkpoint
from stagelm.cli.train import train
from stagelm.errors import CheckpointError, ConfigError
from stagelm.generation import left_pad
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
TINY_SFT = [
    "stage=sft",
    "trainer.max_steps=10",
    "trainer.val_check_interval=10",
    "data.builtin_train=300",
    "data.builtin_val=20",
    "data.eval_examples=4",
    "data.batch_size=8",
    "stage.eval_max_new_tokens=8",
]
TINY_PREFERENCE = [
    "data.builtin_train=200",
    "data.builtin_val=24",
    "data.batch_size=8",
    "data.eval_examples=6",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
]


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("pretrain")
    train(compose_train(tmp, *TINY_PRETRAIN))
    sft_dir = tmp_path_factory.mktemp("sft")
    train(compose_train(sft_dir, *TINY_SFT, f"init_from={tmp / 'run' / 'checkpoints' / 'last.ckpt'}"))
    return sft_dir / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def tiny_reward(tiny_sft: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    tmp = tmp_path_factory.mktemp("reward")
    metrics = train(compose_train(tmp, "stage=reward", f"init_from={tiny_sft}", *TINY_PREFERENCE))
    return tmp / "run" / "checkpoints" / "last.ckpt", metrics


def changed_fraction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return sum(not torch.equal(v, after[k]) for k, v in before.items()) / len(before)


def test_reward_stage_runs_logs_and_reloads(tiny_sft: Path, tiny_reward: tuple[Path, dict[str, float]]) -> None:
    path, metrics = tiny_reward
    for name in (
        "train/loss",
        "train/accuracy",
        "val/accuracy",
        "val/margin",
        "val/reward_mean",
        "val/reward_std",
        "val/accuracy_correct",
        "val/accuracy_concise",
        "val/accuracy_well_formed",
    ):
        assert name in metrics, sorted(metrics)
    assert 0.0 <= metrics["val/accuracy"] <= 1.0 and metrics["val/reward_std"] > 0
    ckpt = read_checkpoint(path)
    assert ckpt["stagelm"]["stage"] == "reward"
    assert {"reward_head.proj.weight", "reward_head.proj.bias"} <= set(ckpt["state_dict"])
    model, tokenizer = stagelm.load(str(path))  # the backbone alone, like any stage's checkpoint
    assert changed_fraction(load_checkpoint(tiny_sft).model.state_dict(), model.state_dict()) > 0.9
    assert tokenizer.to_dict() == load_checkpoint(tiny_sft).tokenizer.to_dict()
    assert (path.parent / "best.ckpt").is_file()


def test_reward_model_api_scores_text_conversations_and_padded_batches(tiny_reward: tuple[Path, dict]) -> None:
    rm = RewardModel.load(tiny_reward[0])
    assert not rm.training and float(rm.head.proj.weight.detach().abs().sum()) > 0
    assert float(rm.head.lm_coef) == 1.0  # the default: head + the reply's log-likelihood
    prompts = ["What is 2 + 3?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}]]
    replies = ["2 + 3 = 5.", "Hello.<|end|>"]
    scores = rm.score(prompts, replies)
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
    conversations = [
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
        [*prompts[1], {"role": "assistant", "content": "Hello."}],
    ]
    assert rm.score_conversations(conversations) == pytest.approx(scores, abs=1e-5)
    # one at a time (no padding) == left-padded batch (the sampler's layout) == right-padded batch
    from stagelm.chat import render

    ids = [rm.tokenizer.encode(render(c)) for c in conversations]
    alone = [float(rm(torch.tensor([i]))) for i in ids]
    assert alone == pytest.approx(scores, abs=1e-5)
    input_ids, mask = left_pad(ids, rm.tokenizer.pad_id)
    assert rm(input_ids, mask).tolist() == pytest.approx(scores, abs=1e-5)
    width = max(map(len, ids))
    right = torch.tensor([i + [rm.tokenizer.pad_id] * (width - len(i)) for i in ids])
    right_mask = torch.tensor([[True] * len(i) + [False] * (width - len(i)) for i in ids])
    assert rm(right, right_mask).tolist() == pytest.approx(scores, abs=1e-5)
    with pytest.raises(ValueError, match="2 prompts but 1 replies"):
        rm.score(prompts, replies[:1])


def test_reward_model_load_rejects_other_stages(tiny_sft: Path) -> None:
    with pytest.raises(CheckpointError, match="expected stage 'reward', found 'sft'"):
        RewardModel.load(tiny_sft)


@pytest.mark.parametrize(("loss_type", "precompute", "positive"), [("sigmoid", False, 10.0), ("ipo", True, 0.0)])
def test_dpo_stage_runs_logs_and_reloads(
    tiny_sft: Path, tmp_path: Path, loss_type: str, precompute: bool, positive: float
) -> None:
    cfg = compose_train(
        tmp_path,
        "stage=dpo",
        f"init_from={tiny_sft}",
        *TINY_PREFERENCE,
        f"stage.loss_type={loss_type}",
        f"stage.precompute_ref={precompute}",
        f"stage.positive_lambda={positive}",
        "stage.eval_max_new_tokens=8",
    )
    metrics = train(cfg)
    for name in (
        "train/loss",
        "train/rewards_chosen",
        "train/rewards_rejected",
        "train/margin",
        "train/accuracy",
        "val/loss",
        "val/accuracy",
        "val/margin",
        "val/win_rate_vs_sft",
        "val/judge_score",
    ):
        assert name in metrics, sorted(metrics)
    assert 0.0 <= metrics["val/win_rate_vs_sft"] <= 1.0
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(path)
    assert ckpt["stagelm"]["stage"] == "dpo"
    assert not any(k.startswith("ref_model.") for k in ckpt["state_dict"])  # the reference is never saved
    model, _ = stagelm.load(str(path))
    assert changed_fraction(load_checkpoint(tiny_sft).model.state_dict(), model.state_dict()) > 0.9
    assert "--- step 6 ---" in (tmp_path / "run" / "val_replies.txt").read_text()


def test_dpo_resumes_without_the_reference_in_the_checkpoint(tiny_sft: Path, tmp_path: Path) -> None:
    args = ["stage=dpo", f"init_from={tiny_sft}", *TINY_PREFERENCE, "stage.eval_max_new_tokens=4"]
    args += ["stage.replay.coef=0.5", "stage.replay.builtin_examples=40"]  # with SFT replay on
    train(compose_train(tmp_path / "a", *args, "trainer.max_steps=3"))
    last = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    metrics = train(compose_train(tmp_path / "b", *args, f"ckpt_path={last}"))
    assert "val/accuracy" in metrics and 0 < metrics["train/replay_loss"] < 20
    assert read_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_preference_stages_read_user_jsonl(tiny_sft: Path, tmp_path: Path) -> None:
    rows = [
        {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5.", "rejected": "2 + 3 = 6.", "answer": "5"},
        {
            "chosen": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
            "rejected": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "HI!!"}],
        },
    ] * 10
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = [
        f"init_from={tiny_sft}",
        f"data.path={path}",
        "data.val_fraction=0.3",
        "data.batch_size=4",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
    ]
    # the plain head (no log-likelihood term) on user data
    assert "val/accuracy" in train(compose_train(tmp_path / "rm", "stage=reward", *common, "stage.lm_coef=null"))
    rm = RewardModel.load(tmp_path / "rm" / "run" / "checkpoints" / "last.ckpt")
    assert rm.head.lm_coef is None and len(rm.score(["Say hi."], ["hi"])) == 1
    # only the pairs with an answer can be judged: the win rate is measured on those
    metrics = train(compose_train(tmp_path / "dpo", "stage=dpo", *common, "stage.eval_max_new_tokens=4"))
    assert "val/accuracy" in metrics


def test_dpo_rejects_bad_config(tiny_sft: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stage.loss_type: expected 'sigmoid', 'ipo' or 'hinge', found 'kto'"):
        train(compose_train(tmp_path, "stage=dpo", f"init_from={tiny_sft}", "stage.loss_type=kto"))
    with pytest.raises(ConfigError, match="stage.positive_lambda must be >= 0, found -1"):
        train(compose_train(tmp_path, "stage=dpo", f"init_from={tiny_sft}", "stage.positive_lambda=-1"))


# --------------------------------------------------------------------------------------------------------------
# Learning tests: the thresholds on the small model, from an SFT checkpoint trained on the built-in world.


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs(small_sft_checkpoint: Path, tmp_path: Path) -> None:
    metrics = train(compose_train(tmp_path, "stage=reward", f"init_from={small_sft_checkpoint}"))
    assert metrics["val/accuracy"] >= 0.90, metrics
    # form is easy; the reply log-likelihood term is what lets it see wrong answers (the plain head: ~0.5)
    assert metrics["val/accuracy_concise"] >= 0.95 and metrics["val/accuracy_well_formed"] >= 0.95, metrics
    assert metrics["val/accuracy_correct"] >= 0.75, metrics


@pytest.mark.slow
def test_dpo_beats_sft_on_the_true_preference(small_sft_checkpoint: Path, tmp_path: Path) -> None:
    metrics = train(compose_train(tmp_path, "stage=dpo", f"init_from={small_sft_checkpoint}"))
    assert metrics["val/accuracy"] >= 0.80, metrics
    # greedy replies stay well formed and beat SFT's on the world's true preference (ties count half): the SFT
    # policy's chatty opener goes, and no answers get worse
    assert metrics["val/format_ok"] >= 0.95 and metrics["val/win_rate_vs_sft"] >= 0.60, metrics
    assert metrics["val/correct"] >= metrics["val/correct_sft"] - 0.02, metrics
