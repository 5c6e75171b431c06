"""Fault tolerance through the real CLI and configs with the tiny model: a run killed with SIGKILL after a checkpoint
and resumed with `ckpt_path=auto` ends in the same state as an uninterrupted run (weights, optimizer, schedule,
tokens seen, RNG, KL coefficient, and the examples each step trained on) and reports the same metrics before and
after, as does resuming a run killed after its final save; SIGTERM saves `last.ckpt` and exits
within seconds; a kill during a save keeps the previous checkpoint; non-finite steps are skipped, and too many in a
row stop the run with a clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from stagelm.cli.train import train
from stagelm.stages.facts import STAGES
from tests.conftest import compose_train

REPO = Path(__file__).resolve().parents[2]
TINY_PRETRAIN = [
    "model=tiny",
    "data.builtin_chars=200000",
    "data.block_size=64",
    "data.batch_size=16",
    "data.val_windows=32",
    "stage.sample_prompts=[]",
    "stage.warmup_steps=5",
]
TINY_SFT = [
    "stage=sft",
    "data.builtin_train=300",
    "data.builtin_val=10",
    "data.eval_examples=4",
    "data.batch_size=8",
    "stage.eval_max_new_tokens=8",
    "stage.warmup_steps=5",
]
TINY_PREFERENCE = [
    "data.builtin_train=200",
    "data.builtin_val=16",
    "data.batch_size=8",
    "data.eval_examples=4",
    "stage.warmup_steps=2",
]
TINY_PPO = [
    "stage=ppo",
    "data.batch_size=4",
    "data.builtin_train=64",
    "data.builtin_val=8",
    "data.eval_examples=4",
    "data.eval_batch_size=4",
    "stage.max_new_tokens=12",
    "stage.eval_max_new_tokens=8",
    "stage.mini_batch_size=2",
    "stage.ppo_epochs=2",
    "stage.calibration_prompts=8",
    "stage.eval_sampled=false",
    "stage.warmup_steps=1",
]
TINY_GRPO = [
    "stage=grpo",
    "data.batch_size=2",
    "stage.num_generations=4",
    "stage.max_new_tokens=16",
    "stage.eval_max_new_tokens=8",
    "data.builtin_train=50",
    "data.builtin_val=8",
    "data.eval_examples=4",
    "data.eval_batch_size=4",
    "stage.pass_k=2",
    "stage.pass_k_examples=2",
    "data.max_prompt_length=200",
    "stage.warmup_steps=1",
]


def _last(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny pre-training -> SFT -> reward model, seconds: the starting points of the later stages."""
    tmp = tmp_path_factory.mktemp("chain")
    train(compose_train(tmp / "pre", *TINY_PRETRAIN, "trainer.max_steps=30", "trainer.val_check_interval=30"))
    pre = _last(tmp / "pre" / "run")
    train(compose_train(tmp / "sft", *TINY_SFT, f"init_from={pre}", "trainer.max_steps=10"))
    sft = _last(tmp / "sft" / "run")
    train(compose_train(tmp / "rm", "stage=reward", f"init_from={sft}", *TINY_PREFERENCE, "trainer.max_steps=10"))
    return {"pretrain": pre, "sft": sft, "reward": _last(tmp / "rm" / "run")}


def stage_args(stage: str, chain: dict[str, Path], steps: int) -> list[str]:
    """Overrides of a short run of `stage`: validation twice, last.ckpt every few steps besides."""
    every = max(1, steps // 4)
    common = [
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps // 2}",
        f"checkpoint_every_n_steps={every}",
        "trainer.limit_val_batches=2",
    ]
    specific = {
        "pretrain": TINY_PRETRAIN,
        "sft": [*TINY_SFT, f"init_from={chain.get('pretrain')}"],
        "reward": ["stage=reward", *TINY_PREFERENCE, f"init_from={chain.get('sft')}"],
        "dpo": ["stage=dpo", *TINY_PREFERENCE, "stage.eval_max_new_tokens=8", f"init_from={chain.get('sft')}"],
        "ppo": [*TINY_PPO, f"init_from={chain.get('sft')}", f"reward_model={chain.get('reward')}"],
        "grpo": [*TINY_GRPO, f"init_from={chain.get('sft')}", "stage.beta=0.04"],
    }[stage]
    return [*specific, *common]


def recorder(path: Path) -> list[str]:
    return ["+callbacks.recorder._target_=tests.fault_hooks.BatchRecorder", f"+callbacks.recorder.path={path}"]


def spawn_train(root: Path, *args: str) -> subprocess.Popen:
    """`stagelm-train` in a subprocess, writing to root/run, with the same thread count as this process (float
    reductions, hence bitwise results, depend on it)."""
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "stagelm.cli.train",
        "logger=none",
        f"paths.log_dir={root}/logs",
        f"paths.cache_dir={root}/cache",
        f"hydra.run.dir={root}/run",
        *args,
    ]
    log = open(root / "subprocess.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def wait_for(condition: Any, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_equal_state(a: Any, b: Any, where: str) -> None:
    """Nested checkpoint contents equal: tensors bitwise, everything else by value."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, set(a) ^ set(b)))}"
        for k in a:
            assert_equal_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def in_run_folder(value: Any, run: Path) -> Any:
    """`value` with the run folder's path written as <run> (keys included): each run writes in its own."""
    if isinstance(value, str):
        return value.replace(str(run), "<run>")
    if isinstance(value, dict):
        return {in_run_folder(k, run): in_run_folder(v, run) for k, v in value.items()}
    return value


def report_inputs(run: Path) -> dict[str, Any]:
    """What the pipeline report reads from a stage's metrics.json: the metrics before and after (validation ones;
    train/ ones include timings) and their per-item values."""
    summary = json.loads((run / "metrics.json").read_text())
    after = {k: v for k, v in summary["after"].items() if k.startswith("val/")}
    return {k: summary[k] for k in ("before", "before_items", "after_items")} | {"after": after}


def kill_and_resume(stage: str, chain: dict[str, Path], tmp_path: Path, steps: int, *extra: str) -> None:
    args = [*stage_args(stage, chain, steps), "validate_before=true", *extra]
    metrics = train(compose_train(tmp_path / "a", *args, *recorder(tmp_path / "a.jsonl")))
    facts = STAGES[stage]  # what the report and sweeps read must be what the stage logs
    assert {m for m, _ in facts.headlines} | {facts.monitor[0]} <= set(metrics), sorted(metrics)
    (tmp_path / "b").mkdir()
    killed = spawn_train(tmp_path / "b", *args, *recorder(tmp_path / "b.jsonl"))
    last = _last(tmp_path / "b" / "run")
    wait_for(last.exists, killed, 300, "the first checkpoint")
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    assert killed.returncode == -signal.SIGKILL
    saved_at = torch.load(last, weights_only=False)["global_step"]
    assert 0 < saved_at < steps, saved_at
    train(compose_train(tmp_path / "b", *args, *recorder(tmp_path / "c.jsonl"), "ckpt_path=auto"))

    full = torch.load(_last(tmp_path / "a" / "run"), weights_only=False)
    resumed = torch.load(last, weights_only=False)
    assert full["global_step"] == resumed["global_step"] == steps
    assert full["stagelm"]["tokens_seen"] == resumed["stagelm"]["tokens_seen"] > 0
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "rng", "callbacks", "ppo"):
        if key in full or key in resumed:
            a, b = in_run_folder(full.get(key), tmp_path / "a"), in_run_folder(resumed.get(key), tmp_path / "b")
            assert_equal_state(a, b, key)
    # the data: steps before the checkpoint from the killed run, the rest from the resumed one, no step twice
    before = [r for r in records(tmp_path / "b.jsonl") if r["step"] < saved_at]
    after = records(tmp_path / "c.jsonl")
    assert after[0]["step"] == saved_at
    assert before + after == records(tmp_path / "a.jsonl")
    # the report of the resumed run: the same starting point and the same final metrics, per item
    expected = report_inputs(tmp_path / "a" / "run")
    assert expected["before"] and expected["after"]
    assert report_inputs(tmp_path / "b" / "run") == expected
    # killed after its final save (the pipeline had not marked it done): resuming measures the end again
    train(compose_train(tmp_path / "b", *args, "ckpt_path=auto"))
    assert report_inputs(tmp_path / "b" / "run") == expected


# automatic optimization (pretrain, sft) and manual optimization with a value model and the adaptive KL
# coefficient (ppo) or a frozen reference (grpo, beta > 0); reward and dpo, automatic too, are in the slow tier
@pytest.mark.parametrize("stage", ["pretrain", "sft", "ppo", "grpo"])
def test_kill9_and_resume_ends_in_the_uninterrupted_state(stage: str, chain: dict[str, Path], tmp_path: Path) -> None:
    kill_and_resume(stage, chain, tmp_path, steps={"pretrain": 40, "sft": 16}.get(stage, 8))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "extra"),
    [("reward", []), ("dpo", []), ("grpo", ["stage.mu=2", "checkpoint_every_n_steps=3"])],
    ids=["reward", "dpo", "grpo-two-updates-per-batch"],
)
def test_kill9_and_resume_later_stages(stage: str, extra: list[str], chain: dict[str, Path], tmp_path: Path) -> None:
    kill_and_resume(stage, chain, tmp_path, 8, *extra)


def signal_after_five_steps(
    tmp_path: Path, args: list[str], signum: int, start_timeout: float
) -> tuple[subprocess.Popen, float, str]:
    """Start `stagelm-train args`, send `signum` once five steps have run, wait for it to exit: the process, the
    seconds from the signal to the exit, and its output."""
    steps = tmp_path / "steps.jsonl"
    proc = spawn_train(tmp_path, *args, *recorder(steps))
    wait_for(lambda: steps.exists() and len(steps.read_text().splitlines()) >= 5, proc, start_timeout, "five steps")
    sent = time.monotonic()
    proc.send_signal(signum)
    proc.wait(60)
    return proc, time.monotonic() - sent, (tmp_path / "subprocess.log").read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_last_ckpt_and_exits_within_seconds(signum: int, chain: dict[str, Path], tmp_path: Path) -> None:
    # no periodic checkpoint and a validation only at the end: what the signal saves is the only last.ckpt
    args = [
        *TINY_PRETRAIN,
        "trainer.max_steps=100000",
        "trainer.val_check_interval=100000",
        "checkpoint_every_n_steps=0",
    ]
    proc, took, output = signal_after_five_steps(tmp_path, args, signum, start_timeout=120)
    assert proc.returncode == 128 + signum, output[-2000:]
    assert took < 10, took
    name = signal.Signals(signum).name
    assert f"stopped by {name} at step" in output and "ckpt_path=auto" in output
    assert "Traceback" not in output
    saved = torch.load(_last(tmp_path / "run"), weights_only=False)
    assert saved["global_step"] >= 5
    # relaunching the same command resumes from there
    resumed = compose_train(tmp_path, *TINY_PRETRAIN, f"trainer.max_steps={saved['global_step'] + 2}", "ckpt_path=auto")
    train(resumed)
    assert torch.load(_last(tmp_path / "run"), weights_only=False)["global_step"] == saved["global_step"] + 2


@pytest.mark.slow  # two processes start twice: about a minute
def test_ddp_sigterm_saves_stops_and_resumes(chain: dict[str, Path], tmp_path: Path) -> None:
    args = [
        *TINY_PRETRAIN,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=100000",
        "trainer.val_check_interval=100000",
        "checkpoint_every_n_steps=0",
    ]
    proc, took, output = signal_after_five_steps(tmp_path, args, signal.SIGTERM, start_timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert took < 15
    assert "stopped by SIGTERM at step" in output
    saved = torch.load(_last(tmp_path / "run"), weights_only=False)["global_step"]
    assert saved >= 5
    # relaunched under DDP, it resumes there; each process continues its share of the data where it stopped
    (tmp_path / "steps.jsonl").unlink()
    again = [a for a in args if not a.startswith("trainer.max_steps")] + [f"trainer.max_steps={saved + 3}"]
    proc = spawn_train(tmp_path, *again, "ckpt_path=auto", *recorder(tmp_path / "steps.jsonl"))
    assert proc.wait(180) == 0, (tmp_path / "subprocess.log").read_text()[-3000:]
    assert torch.load(_last(tmp_path / "run"), weights_only=False)["global_step"] == saved + 3
    assert [r["step"] for r in records(tmp_path / "steps.jsonl")] == [saved, saved + 1, saved + 2]


SAVER = """
import sys, time
from pathlib import Path
from stagelm.training import AtomicCheckpointIO

class SlowToPickle:
    # pickling it announces that the save has started, then stalls: the test kills the process there
    def __reduce__(self):
        Path(sys.argv[2]).write_text("saving")
        time.sleep(60)
        return (int, (0,))

AtomicCheckpointIO().save_checkpoint({"global_step": 2, "state_dict": {}, "stall": SlowToPickle()}, sys.argv[1])
"""


def test_a_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    from stagelm.training import AtomicCheckpointIO

    last = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "state_dict": {"w": torch.arange(1000)}}, last)
    before = last.read_bytes()
    started = tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(last), str(started)], env=env)
    wait_for(started.exists, proc, 60, "the save to start")
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert last.read_bytes() == before  # the previous complete checkpoint, untouched
    assert torch.load(last, weights_only=True)["global_step"] == 1
    assert [p.name for p in last.parent.iterdir()] != ["last.ckpt"]  # the partial file lies beside, never in place


def nonfinite(steps: list[int], where: str) -> list[str]:
    return [
        "+callbacks.inject._target_=tests.fault_hooks.InjectNonFinite",
        f"+callbacks.inject.steps={steps}",
        f"+callbacks.inject.where={where}",
    ]


@pytest.mark.parametrize("stage", ["pretrain", "grpo"])  # automatic and manual optimization
def test_nonfinite_steps_are_skipped_and_leave_the_weights_untouched(
    stage: str, chain: dict[str, Path], tmp_path: Path
) -> None:
    from stagelm.training import NonFiniteGuard

    digests = tmp_path / "weights.jsonl"
    where = "loss" if stage == "pretrain" else "grad"
    metrics = train(
        compose_train(
            tmp_path,
            *stage_args(stage, chain, steps=6),
            *nonfinite([2, 3], where),  # the 3rd and 4th steps
            "+callbacks.weights._target_=tests.fault_hooks.WeightDigests",
            f"+callbacks.weights.path={digests}",
        )
    )
    after = [r["digest"] for r in records(digests)]  # the weights after steps 1..6
    assert len(after) == 6 and len(set(after)) == 4, after
    assert after[1] == after[2] == after[3]  # steps 3 and 4 changed nothing
    saved = torch.load(_last(tmp_path / "run"), weights_only=False)
    guard = next(v for k, v in saved["callbacks"].items() if k.startswith(NonFiniteGuard.__name__))
    assert guard == {"skipped": 2, "in_a_row": 0}
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    assert all(torch.isfinite(t).all() for st in saved["optimizer_states"][0]["state"].values() for t in st.values())
    assert metrics["train/skipped_steps"] == 2


def test_too_many_nonfinite_steps_in_a_row_stop_with_a_clear_error(chain: dict[str, Path], tmp_path: Path) -> None:
    proc = spawn_train(
        tmp_path,
        *stage_args("pretrain", chain, steps=20),
        "max_nonfinite_steps=3",
        *nonfinite(list(range(8, 20)), "loss"),
    )
    proc.wait(120)
    output = (tmp_path / "subprocess.log").read_text()
    assert proc.returncode == 2, output[-2000:]
    error = [line for line in output.splitlines() if line.startswith("error:")]
    assert error == [error[0]] and "step 11: 3 optimizer steps in a row had non-finite values" in error[0], output[
        -2000:
    ]
    assert "first: the loss (nan)" in error[0]
    assert "Traceback" not in output
    # the last checkpoint holds good weights: the validation's at step 10, after two skipped steps
    saved = torch.load(_last(tmp_path / "run"), weights_only=False)
    assert saved["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_a_flipped_byte_in_a_stage_output_is_refused_naming_the_file(chain: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from stagelm.checkpoint import MANIFEST
    from stagelm.cli.pipeline import StagePlan, check_inputs
    from stagelm.errors import CheckpointError

    copied = tmp_path / "sft" / "checkpoints"
    shutil.copytree(chain["sft"].parent, copied)
    manifest = json.loads((copied / MANIFEST).read_text())
    assert manifest["stage"] == "sft" and set(manifest["sha256"]) >= {"last.ckpt"} and manifest["config_hash"]
    ckpt = copied / "last.ckpt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x01
    ckpt.write_bytes(bytes(data))

    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"init_from={ckpt} changed since its run finished"):
        train(compose_train(tmp_path / "dpo", *stage_args("dpo", {"sft": ckpt}, steps=2)))
    assert time.perf_counter() - started < 10
    with pytest.raises(SystemExit, match=f"stage dpo: init_from={ckpt} changed"):
        check_inputs(StagePlan("dpo", str(ckpt), None, [], "key"))


def test_a_resume_refuses_an_init_from_that_changed_under_it(chain: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from stagelm.errors import CheckpointError

    start = tmp_path / "start" / "last.ckpt"
    start.parent.mkdir()
    shutil.copy(chain["pretrain"], start)  # no manifest beside it: taken as it is, its digest recorded
    args = stage_args("sft", {"pretrain": start}, steps=4)
    train(compose_train(tmp_path, *args))
    shutil.copy(chain["sft"], start)  # another model at the same path
    with pytest.raises(CheckpointError, match="init_from changed since this run started"):
        train(compose_train(tmp_path, *args[:-4], "trainer.max_steps=6", "ckpt_path=auto"))


@pytest.mark.slow
def test_pipeline_hands_stages_on_through_manifests_and_refuses_a_changed_one(tmp_path: Path) -> None:
    """Two tiny stages through `stagelm-pipeline`: a string setting with a comma reaches the stage intact, each stage
    leaves a manifest, a second run skips both, and after a flipped byte in pretrain's output the next run stops
    at the stage that starts from it, naming the file."""
    from stagelm.cli.pipeline import main
    from tests.conftest import run_main_in_process

    out = tmp_path / "p"
    args = [
        f"out_dir={out}",
        "model=tiny",
        "stages=[pretrain,sft]",
        f"pretrain.paths.cache_dir={tmp_path}/cache",
        "pretrain.trainer.max_steps=6",
        "pretrain.trainer.val_check_interval=6",
        "pretrain.data.builtin_chars=100000",
        "pretrain.trainer.limit_val_batches=2",
        "pretrain.stage.sample_prompts=['12, 7 and 3', 'Tom has']",
        "sft.trainer.max_steps=2",
        "sft.trainer.val_check_interval=2",
        "sft.data.builtin_train=50",
        "sft.data.builtin_val=4",
        "sft.data.eval_examples=2",
        "sft.stage.eval_max_new_tokens=4",
        "report_prompts=[]",
    ]
    first = run_main_in_process(main, *args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("pretrain", "sft"):
        assert (out / stage / "checkpoints" / "manifest.json").is_file()
    ran = torch.load(_last(out / "pretrain"), weights_only=False)["stagelm"]["run_config"]
    assert ran["stage"]["sample_prompts"] == ["12, 7 and 3", "Tom has"]
    again = run_main_in_process(main, *args, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("skipped") == 2, again.stdout[-2000:]

    ckpt = _last(out / "pretrain")
    data = bytearray(ckpt.read_bytes())
    data[-100] ^= 0x01
    ckpt.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=f"stage sft: init_from={ckpt} changed since its run finished"):
        import sys

        saved, sys.argv = sys.argv, ["stagelm-pipeline", *args]
        try:
            main()
        finally:
            sys.argv = saved


@pytest.mark.slow
def test_sigterm_during_validation_saves_and_exits_the_same_way(tmp_path: Path) -> None:
    args = [*TINY_PRETRAIN, "trainer.max_steps=100", "trainer.val_check_interval=5", "checkpoint_every_n_steps=0"]
    hook = ["+callbacks.signal._target_=tests.fault_hooks.SignalDuringValidation", "+callbacks.signal.signum=15"]
    proc = spawn_train(tmp_path, *args, *hook)
    proc.wait(120)
    output = (tmp_path / "subprocess.log").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "stopped by SIGTERM at step 5" in output and "Traceback" not in output
    assert torch.load(_last(tmp_path / "run"), weights_only=False)["global_step"] == 5
