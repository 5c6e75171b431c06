"""`stagelm-export ckpt=PATH out=DIR`: convert a stagelm checkpoint into a Hugging Face `Llama4ForCausalLM`
directory (see `stagelm.export.hf`). Bad input (missing or unfit checkpoint, unsupported model) prints one
`error: ...` line to stderr and exits with status 2."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf


def run(ckpt: str, out: str) -> int:
    """Export and report; return the process exit status."""
    from stagelm.checkpoint import CheckpointError, load_checkpoint

    try:
        from stagelm.export.hf import export_hf
    except ImportError as e:
        print(f"error: export needs the export extra (pip install 'stagelm[export]'): {e}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        loaded = load_checkpoint(ckpt)
        path = export_hf(loaded.model, loaded.tokenizer, out)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = loaded.model_config
    print(
        f"exported {ckpt} (stage {loaded.stage}, {cfg.num_params():,} parameters) "
        f"to {path.resolve()} as Llama4ForCausalLM"
    )
    storage = loaded.extra.get("storage")
    if storage:
        kinds = sorted({d["kind"] for d in storage.values()})
        print(
            f"note: {ckpt} stores {len(storage)} tensor(s) compressed ({', '.join(kinds)}); Llama 4 has no such "
            "weights, so they were exported dequantized to fp32 (the same values the stagelm model computes with; "
            "the export is as large as an uncompressed model)"
        )
    if loaded.tokenizer.kind != "bpe":
        print(
            f"note: the {loaded.tokenizer.kind} tokenizer has no Hugging Face equivalent; wrote stagelm_tokenizer.json"
        )
    return 0


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def _main(cfg: DictConfig) -> None:
    missing = [key for key in ("ckpt", "out") if OmegaConf.is_missing(cfg, key)]
    if missing:
        print(f"error: missing {' and '.join(missing)}; usage: stagelm-export ckpt=PATH out=DIR", file=sys.stderr)
        sys.exit(2)
    status = run(str(cfg.ckpt), str(cfg.out))
    if status:
        sys.exit(status)


def main() -> None:
    _main()
