"""OmegaConf resolvers the configs use (registered once by every entry point)."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf


def wandb_offline() -> bool:
    """wandb logs offline unless the user asked for online or is logged in: with no route, online mode hangs."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("stagelm_wandb_offline"):
        OmegaConf.register_new_resolver("stagelm_wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("stagelm_monitor"):
        from stagelm.stages.facts import monitor

        OmegaConf.register_new_resolver("stagelm_monitor", monitor)
