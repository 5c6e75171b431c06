"""The pipeline's report: `report.md`, `report.json` and PNG plots, all measured by the run, never typed in.

Per stage: the headline metrics before and after (from each stage's `metrics.json`, where "before" is a
validation of the starting checkpoint), wall time, tokens seen and, for PPO and GRPO, the sampler's median
`rollout/tokens_per_sec`. Curves come from each stage's
`history.jsonl`; the same prompts are answered by the model after every stage, side by side.

`report.json` keys (stable; documented in the README):
    stages.<stage>.headline.<metric>.{before,after},
    stages.<stage>.{wall_time_s,tokens_seen,global_step,rollout_tokens_per_sec},
    samples.<prompt>.<stage>, plots, total_wall_time_s, total_tokens_seen
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from stagelm.stages.facts import STAGES

CURVES = {  # plot file -> metrics drawn (whichever stages logged them)
    "loss.png": ["train/loss"],
    "reward.png": ["ppo/reward_mean", "grpo/reward_mean", "train/rewards_chosen"],
    "kl.png": ["ppo/kl", "grpo/kl", "val/kl"],
    "accuracy.png": ["val/exact_match", "val/accuracy", "val/win_rate_vs_sft"],
}
CHAT_STAGES = ("pretrain", "sft", "ppo", "dpo", "grpo")  # the reward model is not a chat model


def _headlines(stage: str) -> tuple[tuple[str, str], ...]:
    return STAGES[stage].headlines if stage in STAGES else ()


def read_history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_summary(stage_dir: Path, stage: str) -> dict[str, Any]:
    metrics_file = stage_dir / "metrics.json"
    summary = json.loads(metrics_file.read_text()) if metrics_file.exists() else {"before": {}, "after": {}}
    headline = {}
    reported = _headlines(stage) + (STAGES[stage].also_reported if stage in STAGES else ())
    for metric, _ in reported:
        before, after = summary["before"].get(metric), summary["after"].get(metric)
        if before is not None or after is not None:
            headline[metric] = {"before": before, "after": after}
    rate_key = "rollout/tokens_per_sec"
    rates = [row[rate_key] for row in read_history(stage_dir / "history.jsonl") if row.get(rate_key) is not None]
    return {
        "headline": headline,
        # RL stages: how fast their sampler ran (median over the logged steps)
        "rollout_tokens_per_sec": statistics.median(rates) if rates else None,
        "wall_time_s": summary.get("wall_time_s"),
        "tokens_seen": summary.get("tokens_seen"),
        "global_step": summary.get("global_step"),
    }


def improved(stage: str, headline: dict[str, dict[str, float | None]]) -> bool | None:
    """Did the stage move its first headline metric the right way? None when it was not measured."""
    for metric, direction in _headlines(stage):
        values = headline.get(metric)
        if values and values["before"] is not None and values["after"] is not None:
            return values["after"] < values["before"] if direction == "min" else values["after"] > values["before"]
    return None


def answer_prompts(out_dir: Path, stages: list[str], prompts: list[str], max_new_tokens: int = 64) -> dict:
    from stagelm.checkpoint import load_checkpoint
    from stagelm.evaluation import generate_replies

    samples: dict[str, dict[str, str]] = {p: {} for p in prompts}
    for stage in stages:
        ckpt = out_dir / stage / "checkpoints" / "last.ckpt"
        if stage not in CHAT_STAGES or not ckpt.exists():
            continue
        loaded = load_checkpoint(ckpt)
        replies = generate_replies(
            loaded.model,
            loaded.tokenizer,
            [[{"role": "user", "content": p}] for p in prompts],
            max_new_tokens=max_new_tokens,
        )
        for prompt, reply in zip(prompts, replies):
            samples[prompt][stage] = reply.split("<|end|>")[0]
    return samples


def plot_curves(out_dir: Path, stages: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {s: read_history(out_dir / s / "history.jsonl") for s in stages}
    written = []
    for filename, metrics in CURVES.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = 0
        for stage, rows in histories.items():
            for metric in metrics:
                points = [(r["step"], r[metric]) for r in rows if metric in r]
                if len(points) >= 2:
                    ax.plot(*zip(*points), label=f"{stage}: {metric}", marker="." if len(points) < 30 else None)
                    drawn += 1
        if drawn:
            ax.set_xlabel("step")
            ax.set_title(filename.removesuffix(".png"))
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out_dir / filename, dpi=110)
            written.append(filename)
        plt.close(fig)
    # expert load per MoE layer over pre-training: is the router balanced?
    rows = histories.get("pretrain", [])
    load_keys = sorted({k for r in rows for k in r if k.startswith("router/load_layer")})
    layers = sorted({k.split("_")[1] for k in load_keys})
    if layers:
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.5), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            for key in [k for k in load_keys if k.split("_")[1] == layer]:
                points = [(r["step"], r[key]) for r in rows if key in r]
                ax.plot(*zip(*points), label=key.split("_")[-1])
            ax.set_title(f"expert load, {layer}")
            ax.set_xlabel("step")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "expert_load.png", dpi=110)
        plt.close(fig)
        written.append("expert_load.png")
    return written


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# stagelm pipeline report",
        "",
        f"Total wall time {report['total_wall_time_s'] / 60:.1f} min, "
        f"{report['total_tokens_seen'] / 1e6:.2f}M training tokens.",
        "",
        "| stage | metric | before | after | improved | wall time | tokens | rollout tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage, info in report["stages"].items():
        first = True
        for metric, values in info["headline"].items() or [("-", {"before": None, "after": None})]:
            wall = f"{info['wall_time_s'] / 60:.1f} min" if first and info["wall_time_s"] else ""
            tokens = f"{info['tokens_seen'] / 1e6:.2f}M" if first and info["tokens_seen"] else ""
            mark = {True: "yes", False: "NO", None: "-"}[info["improved"]] if first else ""
            rate = info.get("rollout_tokens_per_sec")
            rate = f"{rate:,.0f}" if first and rate else ""
            lines.append(
                f"| {stage if first else ''} | {metric} | {_fmt(values['before'])} | "
                f"{_fmt(values['after'])} | {mark} | {wall} | {tokens} | {rate} |"
            )
            first = False
    lines += ["", "## The same prompts after each stage", ""]
    for prompt, by_stage in report["samples"].items():
        lines += [f"**{prompt}**", "", "| stage | reply |", "| --- | --- |"]
        lines += [f"| {stage} | {reply!r} |" for stage, reply in by_stage.items()]
        lines.append("")
    lines += ["## Curves", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: Path, stages: list[str], prompts: list[str], logger: str = "csv", group: str | None = None
) -> Path:
    out_dir = Path(out_dir)
    report: dict[str, Any] = {"stages": {}}
    for stage in stages:
        info = stage_summary(out_dir / stage, stage)
        info["improved"] = improved(stage, info["headline"])
        report["stages"][stage] = info
    report["total_wall_time_s"] = sum(i["wall_time_s"] or 0 for i in report["stages"].values())
    report["total_tokens_seen"] = sum(i["tokens_seen"] or 0 for i in report["stages"].values())
    report["samples"] = answer_prompts(out_dir, stages, prompts)
    report["plots"] = plot_curves(out_dir, stages)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    path = out_dir / "report.md"
    path.write_text(render_markdown(report))
    if logger == "wandb":
        log_to_wandb(out_dir, report, group)
    return path


def log_to_wandb(out_dir: Path, report: dict[str, Any], group: str | None) -> None:
    import wandb

    from stagelm.config import wandb_offline

    run = wandb.init(
        project="stagelm",
        group=group,
        name="report",
        dir=str(out_dir),
        mode="offline" if wandb_offline() else "online",
        job_type="report",
    )
    rows = [[s, m, v["before"], v["after"]] for s, i in report["stages"].items() for m, v in i["headline"].items()]
    run.log({"report/headline": wandb.Table(columns=["stage", "metric", "before", "after"], data=rows)})
    samples = [[p, s, r] for p, by in report["samples"].items() for s, r in by.items()]
    run.log({"report/samples": wandb.Table(columns=["prompt", "stage", "reply"], data=samples)})
    run.log({f"report/{p.removesuffix('.png')}": wandb.Image(str(out_dir / p)) for p in report["plots"]})
    run.finish()
