"""Reading and writing stagelm checkpoints.

A checkpoint is a Lightning `.ckpt` file (so `ckpt_path=` resumes a run exactly) with one extra entry,
`checkpoint["stagelm"]`, holding what any command needs without the training config: the model config, the
tokenizer and the stage that wrote it. Backbone weights live in `state_dict` under the prefix `model.`;
stage-specific heads (reward or value heads) under their own prefixes. Files are written atomically. A compressed
checkpoint (`stagelm-compress`) stores some tensors packed (int8, int4, sparse, low-rank; `stagelm.compress.storage`)
and describes them in `checkpoint["stagelm"]["storage"]`; loading decodes them, so it loads like any other.

A finished run's `checkpoints/manifest.json` records the sha256 of each checkpoint and the hash of the run's
config: a later stage (`init_from`, `reward_model`) and the pipeline refuse a checkpoint whose bytes changed since
(`verify_against_manifest`), and every checkpoint records the digests of the inputs it was built from, so a resume
refuses an `init_from` that changed under it (its frozen reference would no longer be the same model).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stagelm.errors import CheckpointError
from stagelm.model import ModelConfig, Transformer
from stagelm.tokenizer import Tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class LoadedCheckpoint:
    model: Transformer
    tokenizer: Tokenizer
    model_config: ModelConfig
    stage: str
    state_dict: dict[str, torch.Tensor]  # the whole state dict, heads included
    extra: dict[str, Any] = field(default_factory=dict)  # whatever the stage put in checkpoint["stagelm"]


def stagelm_metadata(model_config: ModelConfig, tokenizer: Tokenizer, stage: str, **extra: Any) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "model_config": model_config.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "stage": stage,
        **extra,
    }


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or "stagelm" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a stagelm checkpoint (no 'stagelm' metadata)")
    return ckpt


def submodule_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_weights_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with an error that lists expected vs found shapes and names, not a wall of text."""
    expected = module.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
    for name in sorted(set(expected) & set(state)):
        if expected[name].shape != state[name].shape:
            problems.append(f"{name}: expected {tuple(expected[name].shape)}, found {tuple(state[name].shape)}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit the model: " + "; ".join(problems[:6]))
    module.load_state_dict(state)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> LoadedCheckpoint:
    """Rebuild the backbone and tokenizer from a checkpoint alone, weights loaded, in eval mode."""
    ckpt = read_checkpoint(path, map_location)
    meta = dict(ckpt["stagelm"])
    config = ModelConfig.from_dict(meta.pop("model_config"))
    tokenizer = Tokenizer.from_dict(meta.pop("tokenizer"))
    stage = meta.pop("stage", "unknown")
    state = ckpt["state_dict"]
    if meta.get("storage"):  # a compressed checkpoint (stagelm-compress): decode its packed tensors to fp32
        from stagelm.compress.storage import decode_state

        state = decode_state(state, meta["storage"])
    model = Transformer(config)
    load_weights_strict(model, submodule_state(state, "model."), str(path))
    model.eval()
    return LoadedCheckpoint(model, tokenizer, config, stage, state, meta)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_hash(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_manifest(checkpoint_dir: str | os.PathLike, stage: str, config_digest: str) -> Path:
    """`manifest.json` beside a finished run's checkpoints: the sha256 of each, the stage, the config hash."""
    directory = Path(checkpoint_dir)
    files = {p.name: file_sha256(p) for p in sorted(directory.glob("*.ckpt"))}
    manifest = {"stage": stage, "config_hash": config_digest, "sha256": files}
    path = directory / MANIFEST
    atomic_write_json(path, manifest, indent=2)
    return path


def atomic_write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    """Write JSON beside `path`, then rename: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)


def verify_against_manifest(path: str | os.PathLike, role: str) -> str:
    """The sha256 of the checkpoint `path`; CheckpointError when the manifest beside it records other bytes.
    A checkpoint without a manifest (one not written by a finished run) is taken as it is."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{role}={path}: checkpoint not found")
    digest = file_sha256(path)
    manifest_file = path.parent / MANIFEST
    if manifest_file.is_file():
        recorded = json.loads(manifest_file.read_text()).get("sha256", {}).get(path.name)
        if recorded is not None and recorded != digest:
            raise CheckpointError(
                f"{role}={path} changed since its run finished: sha256 {digest[:16]}..., its manifest "
                f"{manifest_file} records {recorded[:16]}...; re-run the stage that wrote it"
            )
    return digest
