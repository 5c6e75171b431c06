"""A summary at the end of a Hydra multirun (`-m`): one row per swept run with its overrides and final metrics
(for a pipeline, also how many stages improved beyond their uncertainty, the verdicts of the others, and the task
families where a later stage fell below SFT), and, over the runs that differ only in their seed
(`stagelm-pipeline -m seed=0,1,2`: all of them), each metric's mean and spread (standard deviation, min, max), so
a figure is read next to its run-to-run variation. Printed and written to `<sweep dir>/summary.md`,
`summary.json` (the rows) and `summary_across_runs.json` (the spreads)."""

from __future__ import annotations

import json
import statistics
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
        # how many stages improved their first headline beyond its uncertainty, and how the others fared
        judged = {stage: info["verdict"] for stage, info in report["stages"].items() if info.get("verdict")}
        if judged:
            missed = ", ".join(f"{stage}: {v}" for stage, v in judged.items() if v != "yes")
            count = f"{sum(v == 'yes' for v in judged.values())}/{len(judged)}"
            row["improved"] = f"{count} ({missed})" if missed else count
        if report.get("scorecard"):  # the (stage, family) cases below SFT beyond the uncertainty
            lower = report["scorecard"]["lower_than_sft"]
            row["lower than sft"] = ", ".join(f"{c['stage']} {c['family']}" for c in lower) or "none"
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _setting(row: dict[str, Any]) -> str:
    """The run's overrides without its seed: runs with the same setting are repeats of one experiment."""
    return " ".join(o for o in row["overrides"].split() if not o.lstrip("+").startswith("seed=")) or "(defaults)"


def across_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting repeated over two or more runs (seeds), each numeric column's mean, sample standard deviation,
    min and max over the runs that have it."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_setting(row), []).append(row)
    spreads = []
    for setting, members in groups.items():
        if len(members) < 2:
            continue
        metrics = dict.fromkeys(k for row in members for k, v in row.items() if _is_number(v))
        for metric in metrics:
            values = [float(row[metric]) for row in members if _is_number(row.get(metric))]
            spreads.append(
                {
                    "setting": setting,
                    "metric": metric,
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else None,
                    "min": min(values),
                    "max": max(values),
                    "runs": len(values),
                }
            )
    return spreads


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name))
        rows = [row for row in (job_row(p) for p in jobs) if row is not None]
        if not rows:
            return
        table = summary_markdown(rows)
        spreads = across_runs(rows)
        if spreads:
            table += "\nAcross runs (the same setting, different seeds):\n\n" + summary_markdown(spreads)
        (sweep_dir / "summary.md").write_text(f"# Sweep summary\n\n{table}")
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2))
        (sweep_dir / "summary_across_runs.json").write_text(json.dumps(spreads, indent=2))
        print(f"\nsweep summary ({sweep_dir / 'summary.md'}):\n{table}", flush=True)
