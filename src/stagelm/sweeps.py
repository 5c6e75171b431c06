"""A summary table at the end of a Hydra multirun (`-m`): one row per swept run with its overrides and final
metrics, printed and written to `<sweep dir>/summary.md` and `summary.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from stagelm.stages.facts import STAGES

# the columns shown for a run of stagelm-train (those it logged: every stage's headline metrics) and of
# stagelm-pipeline (headline "after")
TRAIN_COLUMNS = [
    *dict.fromkeys(metric for facts in STAGES.values() for metric, _ in facts.headlines),
    "train/tokens_per_sec",
]


def job_row(job_dir: Path) -> dict[str, Any] | None:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.exists():
        return None
    row: dict[str, Any] = {
        "run": job_dir.name,
        "overrides": " ".join(OmegaConf.to_container(OmegaConf.load(overrides_file))),
    }
    if (job_dir / "report.json").exists():  # a pipeline
        report = json.loads((job_dir / "report.json").read_text())
        for stage, info in report["stages"].items():
            for metric, values in info["headline"].items():
                row[f"{stage} {metric}"] = values["after"]
    elif (job_dir / "metrics.json").exists():  # one stage
        after = json.loads((job_dir / "metrics.json").read_text())["after"]
        row.update({k: after[k] for k in TRAIN_COLUMNS if k in after})
    else:
        row["status"] = "no results (failed?)"
    return row


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name))
        rows = [row for row in (job_row(p) for p in jobs) if row is not None]
        if not rows:
            return
        table = summary_markdown(rows)
        (sweep_dir / "summary.md").write_text(f"# Sweep summary\n\n{table}")
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2))
        print(f"\nsweep summary ({sweep_dir / 'summary.md'}):\n{table}", flush=True)
