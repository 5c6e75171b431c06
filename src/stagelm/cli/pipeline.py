"""`stagelm-pipeline`: all four stages in one command, from random weights to a reasoning-tuned model.

    pretrain -> sft -> reward -> ppo -> grpo,   and dpo as a branch from sft

Each stage runs as its own `stagelm-train` process (forked from a server that has imported it), initialised from the
checkpoint of the stage before, in `<out_dir>/<stage>/`. The pipeline is resumable and idempotent: a stage whose
output exists for the same effective config (a hash of its overrides and of the stages it builds on) is skipped;
changing a stage's settings re-runs it and every stage after it; an interrupted stage resumes from its `last.ckpt`
(`ckpt_path=auto`). Before the first stage runs, every stage's config is composed with exactly the overrides it will
get, so a bad late-stage setting fails in seconds; values are passed in Hydra's quoted grammar, so any string
survives. A stage starts only from checkpoints whose bytes match their stage's manifest. At the end it writes
`report.md`, `report.json` and plots (see `stagelm.report`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from stagelm import __version__
from stagelm.checkpoint import atomic_write_json
from stagelm.config import register_resolvers
from stagelm.stages.facts import STAGES

log = logging.getLogger("stagelm.pipeline")
register_resolvers()

# config groups of conf/train.yaml: per-stage keys not in this list are settings of the stage itself
GROUP_KEYS = {
    "model",
    "data",
    "tokenizer",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "stage",
    "seed",
    "monitor",
    "compile",
    "experiment",
    "debug",
}


@dataclass
class StagePlan:
    name: str
    init_from: str | None
    reward_model: str | None
    overrides: list[str]
    key: str  # hash of everything that determines this stage's output


def _override_value(value: Any) -> str:
    """A value in Hydra's override grammar that parses back to itself: strings are quoted (commas, spaces, quotes,
    brackets and `=` survive), lists and dicts are written element by element."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_override_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        # Hydra's quoted strings: a backslash escapes only a quote, or a backslash run before a quote or the end
        escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
        return f"'{escaped}'"
    return str(value)


def flatten(prefix: str, value: Any) -> list[str]:
    """{"trainer": {"max_steps": 5}} -> ["trainer.max_steps=5"]."""
    if isinstance(value, dict):
        return [o for k, v in value.items() for o in flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [f"{prefix}={_override_value(value)}"]


def stage_overrides(settings: dict[str, Any]) -> list[str]:
    """Per-stage settings: group keys pass through (`trainer.max_steps`), anything else is a stage setting
    (`beta: 0` -> `stage.beta=0`), so `stagelm-pipeline grpo.beta=0` works."""
    overrides = []
    for key, value in settings.items():
        if key.split(".")[0] in GROUP_KEYS:
            overrides += flatten(key, value)
        else:
            overrides += flatten(f"stage.{key}", value)
    return overrides


def group_choice(cfg: DictConfig, group: str) -> str:
    """The option chosen for a config group (`model=tiny` -> "tiny"), passed on to each stage by name."""
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().runtime.choices[group])


def plan(cfg: DictConfig, out_dir: Path, model: str) -> list[StagePlan]:
    stages = list(cfg.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"error: unknown stage(s) {unknown}; choose from {list(STAGES)}")
    plans: dict[str, StagePlan] = {}
    common = stage_overrides(OmegaConf.to_container(cfg.common, resolve=True) or {})
    for name in stages:
        parents = [p for p in STAGES[name].upstream if p in plans][:1]
        if STAGES[name].upstream and not parents:
            raise SystemExit(f"error: stage {name} needs one of {STAGES[name].upstream} before it in `stages`")
        init_from = str(out_dir / parents[0] / "checkpoints" / "last.ckpt") if parents else None
        reward_model = None
        if STAGES[name].needs_reward_model:
            if "reward" not in plans:
                raise SystemExit("error: stage ppo needs stage reward before it in `stages`")
            reward_model = str(out_dir / "reward" / "checkpoints" / "last.ckpt")
        settings = OmegaConf.to_container(cfg.get(name) or {}, resolve=True) or {}
        overrides = [
            f"model={model}",
            *flatten("model", OmegaConf.to_container(cfg.model)),
            f"seed={cfg.seed}",
            *common,
            *stage_overrides(settings),
        ]
        upstream_keys = [plans[p].key for p in parents] + ([plans["reward"].key] if reward_model else [])
        key = hashlib.sha256(json.dumps([__version__, name, overrides, upstream_keys]).encode()).hexdigest()[:16]
        plans[name] = StagePlan(name, init_from, reward_model, overrides, key)
    return list(plans.values())


def train_command_overrides(stage: StagePlan, logger: str, group: str) -> list[str]:
    """Everything the stage's `stagelm-train` gets after the module name: its config, where, and where from. A
    stage interrupted earlier resumes from its own last.ckpt (`ckpt_path=auto`), a fresh one starts anew."""
    overrides = [
        f"stage={stage.name}",
        f"task_name={stage.name}",
        f"logger={logger}",
        "validate_before=true",
        "ckpt_path=auto",
        *stage.overrides,
    ]
    if stage.init_from:
        overrides.append(f"init_from={_override_value(stage.init_from)}")
    if stage.reward_model:
        overrides.append(f"reward_model={_override_value(stage.reward_model)}")
    if logger == "wandb":
        overrides += [f"+logger.wandb.group={group}", f"logger.wandb.name={stage.name}"]
    return overrides


def validate(stages: list[StagePlan], out_dir: Path, logger: str, group: str) -> None:
    """Compose and resolve every stage's `stagelm-train` config before the first stage runs, with exactly the
    overrides it will get: a bad key or value in the last stage's settings fails in seconds, not after the
    stages before it have trained. (Checkpoints that do not exist yet are not checked.)"""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    initialized_here = not GlobalHydra.instance().is_initialized()
    if initialized_here:
        initialize_config_module("stagelm.conf", version_base="1.3")
    try:
        for stage in stages:
            output_dir = f"paths.output_dir={_override_value(str(out_dir / stage.name))}"
            overrides = [*train_command_overrides(stage, logger, group), output_dir]
            try:
                cfg = compose("train", overrides=overrides)
                OmegaConf.to_container(cfg, resolve=True)
            except (HydraException, OmegaConfBaseException) as e:
                message = " ".join(str(e).split())
                raise SystemExit(f"error: the settings of stage {stage.name} are invalid: {message}") from None
    finally:
        if initialized_here:
            GlobalHydra.instance().clear()


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def check_inputs(stage: StagePlan) -> None:
    """The checkpoints a stage starts from must be the bytes their stage's manifest records."""
    from stagelm.checkpoint import verify_against_manifest
    from stagelm.errors import CheckpointError

    for role, path in (("init_from", stage.init_from), ("reward_model", stage.reward_model)):
        if path:
            try:
                verify_against_manifest(path, role)
            except CheckpointError as e:
                raise SystemExit(f"error: stage {stage.name}: {e}") from None


def _train_in_forked_child(argv: list[str], environ: dict[str, str], cwd: str) -> None:
    """A child of the fork server becomes `stagelm-train ARGV`, in the pipeline's current environment and folder
    (the server keeps those of the moment it started)."""
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    if environ.get("OMP_NUM_THREADS", "").isdigit():
        import torch

        torch.set_num_threads(int(environ["OMP_NUM_THREADS"]))
    from stagelm.cli.train import main

    sys.argv = ["stagelm-train", *argv]
    main()


def launch_train(argv: list[str]) -> int:
    """Run `stagelm-train ARGV` in a process of its own and return its exit status. Where the platform allows, the
    process is forked from a server that imported torch and Lightning once (several seconds, which each of the six
    stages would pay again in a new interpreter) and has run no torch op (a process forked after OpenMP has run
    hangs at its first parallel op); elsewhere a new interpreter is started."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["stagelm.cli.train"])
        child = context.Process(target=_train_in_forked_child, args=(argv, dict(os.environ), os.getcwd()))
        child.start()
        child.join()
        return child.exitcode
    return subprocess.run([sys.executable, "-m", "stagelm.cli.train", *argv]).returncode


def run_stage(stage: StagePlan, out_dir: Path, logger: str, group: str) -> None:
    stage_dir = out_dir / stage.name
    marker = stage_dir / "stage.json"
    if marker.exists() and json.loads(marker.read_text()).get("key") != stage.key:
        # a different config: keep the old outputs beside, never overwrite them silently
        backup = out_dir / f"{stage.name}.previous"
        shutil.rmtree(backup, ignore_errors=True)
        stage_dir.rename(backup)
    check_inputs(stage)
    if (stage_dir / "checkpoints" / "last.ckpt").exists():
        log.info("resuming %s from its last.ckpt", stage.name)
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"key": stage.key, "status": "running", "overrides": stage.overrides}, indent=2)
    returncode = launch_train(
        [f"hydra.run.dir={_override_value(str(stage_dir))}", *train_command_overrides(stage, logger, group)]
    )
    if returncode != 0:
        raise SystemExit(f"error: stage {stage.name} failed (exit {returncode}); re-run to resume it")
    atomic_write_json(marker, {"key": stage.key, "status": "done", "overrides": stage.overrides}, indent=2)


def is_done(stage: StagePlan, out_dir: Path) -> bool:
    marker = out_dir / stage.name / "stage.json"
    if not marker.exists():
        return False
    state = json.loads(marker.read_text())
    return state.get("key") == stage.key and state.get("status") == "done"


def run_pipeline(cfg: DictConfig) -> Path:
    if cfg.get("out_dir"):
        out_dir = Path(cfg.out_dir).resolve()
    else:
        from hydra.core.hydra_config import HydraConfig

        out_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = plan(cfg, out_dir, group_choice(cfg, "model"))
    logger = group_choice(cfg, "logger")
    group = f"pipeline-{hashlib.sha256(str(out_dir).encode()).hexdigest()[:8]}"
    validate(stages, out_dir, logger, group)
    expected = {s.name: float(cfg.expected_minutes.get(s.name, 1.0)) * 60 for s in stages}
    started = time.perf_counter()
    spent_ratio: list[float] = []
    for i, stage in enumerate(stages, 1):
        elapsed = time.perf_counter() - started
        speed = sum(spent_ratio) / len(spent_ratio) if spent_ratio else 1.0
        remaining = speed * sum(expected[s.name] for s in stages[i - 1 :] if not is_done(s, out_dir))
        header = f"[stage {i}/{len(stages)}] {stage.name}"
        if is_done(stage, out_dir):
            check_inputs(stage)
            print(f"{header}: done earlier with the same config, skipped", flush=True)
            continue
        print(f"{header}  (elapsed {_fmt(elapsed)}, about {_fmt(remaining)} to go)", flush=True)
        t0 = time.perf_counter()
        run_stage(stage, out_dir, logger, group)
        spent_ratio.append((time.perf_counter() - t0) / expected[stage.name])
    print(f"all {len(stages)} stages done in {_fmt(time.perf_counter() - started)}; writing the report", flush=True)
    from stagelm.report import write_report

    report = write_report(out_dir, [s.name for s in stages], list(cfg.report_prompts), logger=logger, group=group)
    print(f"report: {report}", flush=True)
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="pipeline")
def _hydra_main(cfg: DictConfig) -> None:
    run_pipeline(cfg)


def open_stage_settings(argv: list[str]) -> list[str]:
    """Per-stage settings are free-form (`grpo.beta=0`), but Hydra only adds new keys with `++`: add it."""
    free = tuple(f"{name}." for name in [*STAGES, "common"])
    return [f"++{a}" if a.startswith(free) and "=" in a else a for a in argv]


def main() -> None:
    sys.argv = [sys.argv[0], *open_stage_settings(sys.argv[1:])]
    _hydra_main()


if __name__ == "__main__":
    main()
