"""`stagelm-train`: the one Hydra entry point that runs any stage.

It builds, in order: the data module, the tokenizer (trained on the data, or taken from `init_from`), the model
config, the stage's LightningModule, loggers, callbacks and the Trainer; then fits. Errors a user can fix
(bad data, bad config value, a checkpoint that does not fit) print one line and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torchmetrics import Metric

from stagelm.checkpoint import (
    atomic_write_json,
    config_hash,
    load_checkpoint,
    read_checkpoint,
    verify_against_manifest,
    write_manifest,
)
from stagelm.compile_policy import resolve_compile
from stagelm.config import register_resolvers
from stagelm.errors import CheckpointError, ConfigError, StagelmError
from stagelm.model import ModelConfig
from stagelm.precision import resolve_precision
from stagelm.tokenizer import Tokenizer, train_tokenizer
from stagelm.training import AtomicCheckpointIO, LastCheckpoint, Preempted

log = logging.getLogger("stagelm")
register_resolvers()


def build_tokenizer(cfg: DictConfig, datamodule: Any) -> Tokenizer:
    kind = cfg.tokenizer.kind
    vocab_size = cfg.tokenizer.get("vocab_size") or 2048
    return train_tokenizer(kind, datamodule.documents(), vocab_size, cfg.tokenizer.get("include_ascii", True))


def build_model_config(cfg: DictConfig, vocab_size: int) -> ModelConfig:
    values = OmegaConf.to_container(cfg.model, resolve=True)
    values["vocab_size"] = vocab_size
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


def _scalars(metrics: Any) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if (torch.is_tensor(v) and v.numel() == 1) or isinstance(v, float)}


def instantiate_dict(group: DictConfig | None) -> list[Any]:
    """Loggers and callbacks are dicts of `_target_` configs (lightning-hydra-template style)."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def resume_path(cfg: DictConfig) -> str | None:
    """`ckpt_path`, with `auto` meaning the run folder's last.ckpt when there is one (else a fresh start)."""
    value = cfg.get("ckpt_path")
    if value != "auto":
        return value or None
    last = Path(cfg.paths.output_dir) / "checkpoints" / LastCheckpoint.FILENAME
    if last.is_file():
        return str(last)
    log.info("ckpt_path=auto: no %s yet, starting fresh", last)
    return None


BEFORE_FILE = "validation_before.json"


def validation_before(
    trainer: L.Trainer, module: L.LightningModule, datamodule: Any, path: Path, resumed: bool
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The starting point's metrics and per-item values, for before/after reports: measured once, before training,
    and kept in the run folder, so that a resumed run reports the same starting point."""
    if resumed:
        if path.is_file():
            saved = json.loads(path.read_text())
            return saved["metrics"], saved["items"]
        log.warning("resuming without %s: the report will have no 'before' for this stage", path)
        return {}, {}
    metrics = _scalars(trainer.validate(module, datamodule=datamodule, verbose=False)[0])
    items, module.val_items = module.val_items, {}
    for metric in module.modules():  # states written under inference mode cannot be updated in training
        if isinstance(metric, Metric):
            metric.reset()
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"metrics": metrics, "items": items})
    return metrics, items


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one stage as configured; return the final logged metrics."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    datamodule = instantiate(cfg.data)

    if cfg.get("init_from"):
        verify_against_manifest(cfg.init_from, "init_from")  # before anything else: a clear error, in seconds
        loaded = load_checkpoint(cfg.init_from)
        tokenizer, model_config = loaded.tokenizer, loaded.model_config
        log.info("starting from %s (stage %s)", cfg.init_from, loaded.stage)
    elif cfg.get("teacher"):  # distillation into a fresh student of `model=`: it must speak the teacher's tokens
        verify_against_manifest(cfg.teacher, "teacher")
        tokenizer = load_checkpoint(cfg.teacher).tokenizer
        model_config = build_model_config(cfg, tokenizer.vocab_size)
        log.info("a fresh student with the tokenizer of teacher=%s", cfg.teacher)
    else:
        tokenizer = build_tokenizer(cfg, datamodule)
        model_config = build_model_config(cfg, tokenizer.vocab_size)
    if hasattr(datamodule, "set_tokenizer"):
        datamodule.set_tokenizer(tokenizer)
    ckpt_path = resume_path(cfg)
    resumed_step = None
    if ckpt_path:
        resumed = read_checkpoint(ckpt_path)
        found = ModelConfig.from_dict(resumed["stagelm"]["model_config"])
        if found != model_config:
            diffs = [
                f"{k}: expected {v}, found {found.to_dict()[k]}"
                for k, v in model_config.to_dict().items()
                if found.to_dict()[k] != v
            ]
            raise CheckpointError(f"ckpt_path={ckpt_path} does not fit the model: " + "; ".join(diffs))
        resumed_step = resumed.get("global_step", 0)
        log.info("resuming from %s (step %d)", ckpt_path, resumed_step)

    stage_name = get_class(cfg.stage._target_).stage_name
    tokens_per_step = cfg.data.get("batch_size", 1) * cfg.data.get("block_size", 1)  # fixed-shape data only
    cfg.compile = resolve_compile(
        cfg.compile, stage_name, cfg.trainer.max_steps, tokens_per_step, cfg.trainer.accelerator
    )
    # partial first: passing objects through instantiate would turn them into OmegaConf nodes
    stage_factory = instantiate(cfg.stage, _partial_=True)
    module = stage_factory(model_config=model_config, tokenizer=tokenizer, init_from=cfg.get("init_from"))
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    loggers = instantiate_dict(cfg.get("logger"))
    for logger in loggers:
        if hasattr(logger, "log_hyperparams"):
            logger.log_hyperparams(module.run_config)
    cfg.trainer.precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator, model_config.d_model)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=instantiate_dict(cfg.get("callbacks")),
        plugins=[AtomicCheckpointIO()],
    )
    n_params = sum(p.numel() for p in module.model.parameters())
    log.info(
        "model: %.2fM parameters (%.2fM active per token)",
        n_params / 1e6,
        model_config.num_params(active_only=True) / 1e6,
    )
    out = Path(cfg.paths.output_dir)
    before: dict[str, float] = {}
    before_items: dict[str, list[float]] = {}
    if cfg.get("validate_before"):
        before, before_items = validation_before(
            trainer, module, datamodule, out / BEFORE_FILE, resumed=bool(ckpt_path)
        )
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning's own SIGTERM stop (a signal during validation); LastCheckpoint saved
        last_cb = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        if last_cb is None:
            raise
        raise Preempted(signal.SIGTERM, trainer.global_step, last_cb.path) from None
    metrics = _scalars(trainer.callback_metrics)
    if trainer.global_step == resumed_step and not any(k.startswith("val/") for k in metrics):
        # resumed from a last.ckpt already at max_steps (killed after its final save): fit ran nothing, so the
        # final metrics are measured again on the restored weights rather than reported empty
        metrics |= _scalars(trainer.validate(module, datamodule=datamodule, verbose=False)[0])
    if trainer.is_global_zero:
        best = next((c.best_model_path for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        last = next((str(c.path) for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        log.info("checkpoints: last %s, best %s", last, best)
        log.info("outputs in %s", out)
        summary = {
            "stage": module.stage_name,
            "before": before,
            "after": metrics,
            # per held-out item, the values whose means are the metrics above (same items, same order), for the
            # report's intervals and paired comparisons
            "before_items": before_items,
            "after_items": module.val_items,
            "wall_time_s": time.perf_counter() - started,
            "tokens_seen": module.tokens_seen,
            "global_step": trainer.global_step,
            "best_checkpoint": best or None,
            "last_checkpoint": last,
        }
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "metrics.json", summary, indent=2)
        if last:
            write_manifest(Path(last).parent, module.stage_name, config_hash(module.run_config))
        if cfg.get("print_samples") and hasattr(module, "sample_completions"):
            print("\nsamples (greedy):")
            for prompt, completion in module.sample_completions():
                print(f"  {prompt!r} -> {completion!r}")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except Preempted as e:  # not an error: the job was asked to stop and saved its state
        print(f"stagelm: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except StagelmError as e:  # Hydra would print a stack trace for anything that reaches it
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    monitor = cfg.get("monitor", {}).get("metric")
    return metrics.get(monitor) if monitor else None  # the value an Optuna sweep optimises


def main() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    _hydra_main()


if __name__ == "__main__":
    main()
