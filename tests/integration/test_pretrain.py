"""Pre-training end to end through the real configs: learning, checkpoints, resume, bad input, DDP, multirun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import stagelm
from stagelm.cli.train import train
from tests.conftest import compose_train, run_cli, run_main_in_process

FAST = [
    "model=tiny",
    "data.builtin_chars=300000",
    "data.block_size=64",
    "data.batch_size=16",
    "data.val_windows=64",
    "stage.warmup_steps=20",
    "stage.sample_prompts=[]",
]


def _ckpt(run_dir: Path, name: str = "last.ckpt") -> Path:
    return run_dir / "checkpoints" / name


def test_tiny_pretraining_lowers_val_loss_and_checkpoint_generates(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, *FAST, "trainer.max_steps=200", "trainer.val_check_interval=100")
    metrics = train(cfg)
    # a uniform guess over ~110 symbols costs ln(110) = 4.7 nats; the tiny model must learn real structure
    assert metrics["val/loss"] < 2.0, metrics
    assert metrics["val/bpc"] == pytest.approx(metrics["val/loss"] / 0.6931, rel=0.02)
    model, tok = stagelm.load(str(_ckpt(tmp_path / "run", "best.ckpt")))
    from stagelm.generation import complete

    out = complete(model, tok, ["12 + 7 ="], 10, greedy=True)
    assert isinstance(out[0], str) and len(out[0]) > 0


def test_resume_continues_the_step_count(tmp_path: Path) -> None:
    first = compose_train(tmp_path / "a", *FAST, "trainer.max_steps=10", "trainer.val_check_interval=10")
    train(first)
    last = _ckpt(tmp_path / "a" / "run")
    assert torch.load(last, weights_only=False)["global_step"] == 10
    second = compose_train(
        tmp_path / "b", *FAST, "trainer.max_steps=16", "trainer.val_check_interval=8", f"ckpt_path={last}"
    )
    train(second)
    assert torch.load(_ckpt(tmp_path / "b" / "run"), weights_only=False)["global_step"] == 16


def test_compile_auto_resolves_before_the_stage_is_built(tmp_path: Path, caplog, monkeypatch) -> None:
    # a short run is too short to repay a cold compile: eager, and the checkpoint records what was chosen
    import logging

    # an in-process Hydra run earlier in the suite configures logging with disable_existing_loggers
    monkeypatch.setattr(logging.getLogger("stagelm"), "disabled", False)
    cfg = compose_train(tmp_path, *FAST, "trainer.max_steps=4", "trainer.val_check_interval=4")
    assert cfg.compile == "auto"
    with caplog.at_level(logging.INFO, logger="stagelm"):
        train(cfg)
    assert "compile=auto -> false: 4,096 training tokens < 5,000,000" in caplog.text
    saved = torch.load(_ckpt(tmp_path / "run"), weights_only=False)["stagelm"]["run_config"]
    assert saved["compile"] is False and saved["stage"]["compile"] is False


def test_a_compiled_run_and_an_eager_one_share_checkpoint_keys(tmp_path: Path) -> None:
    # compile=auto may compile a long run and not its shorter resumption: both must load the same checkpoint
    from stagelm.stages.pretrain import PretrainModule
    from stagelm.tokenizer import CharTokenizer
    from tests.conftest import tiny_model_config

    tokenizer = CharTokenizer.train(["abc"])
    config = tiny_model_config(vocab_size=tokenizer.vocab_size)
    kwargs = dict(model_config=config, tokenizer=tokenizer, optimizer=torch.optim.AdamW)
    compiled, eager = PretrainModule(**kwargs, compile=True), PretrainModule(**kwargs, compile=False)
    assert compiled.forward_model is not compiled.model  # the compiled wrapper, used by training_step
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    eager.load_state_dict(compiled.state_dict())


def _cli(tmp_path: Path, *args: str, flags: tuple[str, ...] = (), in_process: bool = False):
    if in_process:
        from stagelm.cli.train import main

        return run_main_in_process(
            main,
            *flags,
            *FAST,
            "logger=none",
            f"paths.cache_dir={tmp_path}/cache",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            *args,
            cwd=tmp_path,
        )
    return run_cli(
        "train",
        *flags,
        *FAST,
        "logger=none",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        *args,
        cwd=tmp_path,
    )


def _one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[-1]


def test_bad_input_gives_one_line_errors(tmp_path: Path) -> None:
    _one_line_error(
        _cli(tmp_path, f"data.path={tmp_path}/missing.txt", in_process=True), "does not exist", "missing.txt"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{oops\n")
    _one_line_error(_cli(tmp_path, f"data.path={bad}", in_process=True), "bad.jsonl:2")
    _one_line_error(_cli(tmp_path, "model.n_kv_heads=3", in_process=True), "n_kv_heads=3")
    unknown = _cli(tmp_path, "model.widht=3")
    assert unknown.returncode != 0 and "widht" in unknown.stderr and "Traceback" not in unknown.stderr


def test_resuming_into_a_different_model_is_refused_and_overwrites_nothing(tmp_path: Path) -> None:
    first = _cli(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = next(tmp_path.glob("outputs/train/runs/*/checkpoints/last.ckpt"))
    before = last.read_bytes()
    result = _cli(tmp_path, "model.d_model=96", f"ckpt_path={last}", in_process=True)
    _one_line_error(result, "d_model: expected 96, found 64")
    assert last.read_bytes() == before


def test_ddp_on_cpu_with_two_processes(tmp_path: Path) -> None:
    result = _cli(
        tmp_path,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = next(tmp_path.glob("outputs/train/runs/*/checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=False)["global_step"] == 6


def test_multirun_sweeps_model_settings(tmp_path: Path) -> None:
    result = _cli(tmp_path, "model.n_experts=0,4", flags=("-m",))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpts = sorted(tmp_path.glob("outputs/train/multiruns/*/*/checkpoints/last.ckpt"))
    assert len(ckpts) == 2
    experts = sorted(torch.load(c, weights_only=False)["stagelm"]["model_config"]["n_experts"] for c in ckpts)
    assert experts == [0, 4]
    summary = next(tmp_path.glob("outputs/train/multiruns/*/summary.md")).read_text()
    assert "model.n_experts=0" in summary and "model.n_experts=4" in summary and "val/loss" in summary
    assert "sweep summary" in result.stdout


def test_optuna_search_runs_trials_and_reports_the_best(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = _cli(
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = next(tmp_path.glob("outputs/train/multiruns/*/optimization_results.yaml")).read_text()
    assert "best_params" in best and "stage.optimizer.lr" in best


@pytest.mark.slow  # ~1 min on a CPU without native bf16, where bf16 matmuls run a slow reference kernel
def test_bf16_mixed_training_learns_like_fp32(tmp_path: Path) -> None:
    # what precision=auto picks where the CPU (or GPU) has native bf16; on CPUs without it bf16 is slow, not wrong
    steps = ["trainer.max_steps=120", "trainer.val_check_interval=120"]
    fp32 = train(compose_train(tmp_path / "fp32", *FAST, *steps, "trainer.precision=32-true"))
    bf16 = train(compose_train(tmp_path / "bf16", *FAST, *steps, "trainer.precision=bf16-mixed"))
    assert bf16["val/loss"] < 2.5, bf16
    assert abs(bf16["val/loss"] - fp32["val/loss"]) / fp32["val/loss"] < 0.05, (bf16["val/loss"], fp32["val/loss"])
