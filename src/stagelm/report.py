"""The pipeline's report: `report.md`, `report.json` and PNG plots, all measured by the run, never typed in.

Per stage: the headline metrics before and after (from each stage's `metrics.json`, where "before" is a
validation of the starting checkpoint), each with its 95% bootstrap interval over the held-out items it is a mean
of, and the interval of the change (paired over the same items); "improved" is yes only where that interval
excludes 0 in the metric's good direction (`stagelm.intervals`). Wall time, tokens seen and, for PPO and GRPO,
the sampler's median `rollout/tokens_per_sec`. Curves come from each stage's `history.jsonl`; the same prompts
are answered by the model after every stage, side by side. A scorecard evaluates every chat stage's final
checkpoint on SFT's held-out conversations, per task family, and flags families where a later stage is lower
than SFT beyond the uncertainty (preference or RL tuning breaking what SFT taught).

`report.json` keys (stable; documented in the README):
    stages.<stage>.headline.<metric>.{before,after},
    stages.<stage>.{improved,wall_time_s,tokens_seen,global_step,rollout_tokens_per_sec},
    samples.<prompt>.<stage>, plots, total_wall_time_s, total_tokens_seen
and, where the stage recorded per-item values (runs before they did have none of these):
    stages.<stage>.headline.<metric>.{before_interval,after_interval}: [low, high] of the mean,
    stages.<stage>.headline.<metric>.change.{estimate,interval,paired,n}: after - before, its [low, high],
    stages.<stage>.headline.<metric>.verdict: "yes" | "within noise" | "worse",
    stages.<stage>.verdict: the first headline's verdict (`improved` is then true only for "yes"),
    scorecard.{families,stages,lower_than_sft}: held-out exact match per family and chat stage (see `scorecard`)
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from stagelm.checkpoint import atomic_write_json
from stagelm.intervals import Interval, difference_interval, mean_interval, verdict
from stagelm.stages.facts import STAGES

log = logging.getLogger("stagelm.report")

CURVES = {  # plot file -> metrics drawn (whichever stages logged them)
    "loss.png": ["train/loss"],
    "reward.png": ["ppo/reward_mean", "grpo/reward_mean", "train/rewards_chosen"],
    "kl.png": ["ppo/kl", "grpo/kl", "val/kl"],
    "accuracy.png": ["val/exact_match", "val/accuracy", "val/win_rate_vs_sft"],
}
CHAT_STAGES = ("pretrain", "sft", "ppo", "dpo", "grpo")  # the reward model is not a chat model
SCORECARD_STAGES = ("sft", "ppo", "dpo", "grpo")  # the chat stages that learnt to answer: SFT and those after it


def _headlines(stage: str) -> tuple[tuple[str, str], ...]:
    return STAGES[stage].headlines if stage in STAGES else ()


def read_history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def interval_fields(before: list[float] | None, after: list[float] | None, direction: str) -> dict[str, Any]:
    """The intervals of a headline metric from its per-item values (empty when there are none: older runs)."""
    fields: dict[str, Any] = {}
    if before:
        fields["before_interval"] = mean_interval(before).as_list()
    if after:
        fields["after_interval"] = mean_interval(after).as_list()
    if before and after:
        change = difference_interval(after, before)
        fields["change"] = _change(change)
        if direction != "budget":
            fields["verdict"] = verdict(change, direction)
    return fields


def _change(change: Interval) -> dict[str, Any]:
    return {"estimate": change.estimate, "interval": change.as_list(), "paired": change.paired, "n": change.n}


def stage_summary(stage_dir: Path, stage: str) -> dict[str, Any]:
    metrics_file = stage_dir / "metrics.json"
    summary = json.loads(metrics_file.read_text()) if metrics_file.exists() else {"before": {}, "after": {}}
    before_items, after_items = summary.get("before_items", {}), summary.get("after_items", {})
    headline = {}
    reported = _headlines(stage) + (STAGES[stage].also_reported if stage in STAGES else ())
    for metric, direction in reported:
        before, after = summary["before"].get(metric), summary["after"].get(metric)
        if before is not None or after is not None:
            headline[metric] = {"before": before, "after": after}
            headline[metric] |= interval_fields(before_items.get(metric), after_items.get(metric), direction)
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


def _first_measured(stage: str, headline: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], str] | None:
    for metric, direction in _headlines(stage):
        values = headline.get(metric)
        if values and values["before"] is not None and values["after"] is not None:
            return values, direction
    return None


def improved(stage: str, headline: dict[str, dict[str, Any]]) -> bool | None:
    """Did the stage move its first headline metric the right way, beyond the uncertainty of the change where
    per-item values were recorded (merely the right way where they were not)? None when it was not measured."""
    found = _first_measured(stage, headline)
    if found is None:
        return None
    values, direction = found
    if "verdict" in values:
        return values["verdict"] == "yes"
    return values["after"] < values["before"] if direction == "min" else values["after"] > values["before"]


def stage_verdict(stage: str, headline: dict[str, dict[str, Any]]) -> str | None:
    """The first measured headline's verdict ("yes", "within noise", "worse"); None without per-item values."""
    found = _first_measured(stage, headline)
    return found[0].get("verdict") if found else None


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


def sft_eval_settings(out_dir: Path) -> tuple[Any, dict[str, Any]] | None:
    """SFT's held-out conversations and its generation settings, rebuilt from the SFT checkpoint's own resolved
    config (data, seed, eval size): exactly the set its validation scored. None without an SFT checkpoint."""
    from hydra.utils import instantiate

    from stagelm.checkpoint import read_checkpoint

    ckpt = out_dir / "sft" / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        return None
    run_config = read_checkpoint(ckpt)["stagelm"].get("run_config") or {}
    if "data" not in run_config:
        return None
    try:
        conversations = instantiate(run_config["data"]).eval_set()
    except Exception as e:  # noqa: BLE001 - e.g. SFT's data file moved since: the rest of the report still stands
        log.warning("no scorecard: SFT's held-out conversations cannot be rebuilt (%s)", e)
        return None
    stage = run_config.get("stage", {})
    settings = {k: stage[k] for k in ("eval_max_new_tokens", "eval_batch_size") if k in stage}
    return conversations, settings


def final_validation_items(stage_dir: Path) -> dict[str, list[float]] | None:
    """SFT's exact match per held-out conversation ("all", and per family) from its own last validation, when that
    validation scored the final weights (it ran at the last step): the scorecard's SFT column without generating
    the same replies again. None otherwise."""
    metrics_file = stage_dir / "metrics.json"
    summary = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    items = summary.get("after_items", {})
    if "val/exact_match" not in items:
        return None
    steps = [row["step"] for row in read_history(stage_dir / "history.jsonl") if "val/exact_match" in row]
    if not steps or steps[-1] != summary.get("global_step"):
        return None
    prefix = "val/exact_match_"
    return {"all": items["val/exact_match"]} | {
        k.removeprefix(prefix): v for k, v in items.items() if k.startswith(prefix)
    }


def scorecard_items(out_dir: Path, stages: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per chat stage from SFT on, its final checkpoint's exact match on each of SFT's held-out conversations,
    overall ("all") and per task family, in the eval set's order (so stages compare item by item). SFT's own last
    validation gives its column when it scored the final weights."""
    from stagelm.checkpoint import load_checkpoint
    from stagelm.evaluation import answer_conversations, by_family

    found = sft_eval_settings(out_dir)
    if found is None:
        return {}
    conversations, settings = found
    if not conversations:
        return {}
    items: dict[str, dict[str, list[float]]] = {}
    for stage in stages:
        ckpt = out_dir / stage / "checkpoints" / "last.ckpt"
        if stage not in SCORECARD_STAGES or not ckpt.exists():
            continue
        if stage == "sft" and (validated := final_validation_items(out_dir / stage)) is not None:
            items[stage] = validated
            continue
        log.info("scorecard: %s answers SFT's %d held-out conversations", stage, len(conversations))
        loaded = load_checkpoint(ckpt)
        _, correct = answer_conversations(
            loaded.model,
            loaded.tokenizer,
            conversations,
            settings.get("eval_max_new_tokens", 64),
            settings.get("eval_batch_size", 64),
        )
        values = [float(ok) for ok in correct]
        items[stage] = {"all": values} | by_family([c.family for c in conversations], values)
    return items


def scorecard(items: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """From `scorecard_items`: per stage and family the exact match, its 95% interval and n; for the stages after
    SFT, the paired change from SFT on the same conversations, and `lower` where its interval lies below 0.
    `lower_than_sft` lists those (stage, family) cases: what preference or RL tuning broke."""
    from stagelm.data.world import INSTRUCTION_FAMILIES

    present = {family for by_family in items.values() for family in by_family}
    order = ["all", *INSTRUCTION_FAMILIES]
    families = [f for f in order if f in present] + sorted(present - set(order))
    card: dict[str, Any] = {"families": families, "stages": {}, "lower_than_sft": []}
    sft = items.get("sft", {})
    for stage, by_family in items.items():
        row: dict[str, Any] = {}
        for family, values in by_family.items():
            interval = mean_interval(values)
            cell: dict[str, Any] = {"exact_match": interval.estimate, "interval": interval.as_list(), "n": len(values)}
            if stage != "sft" and sft.get(family):
                change = difference_interval(values, sft[family])
                cell["vs_sft"] = _change(change)
                cell["lower"] = change.high < 0
                if cell["lower"]:
                    card["lower_than_sft"].append({"stage": stage, "family": family, **cell["vs_sft"]})
            row[family] = cell
        card["stages"][stage] = row
    return card


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


def _with_interval(value: float | None, interval: list[float] | None) -> str:
    if value is None or not interval:
        return _fmt(value)
    return f"{value:.4g} [{interval[0]:.3g}, {interval[1]:.3g}]"


def _fmt_change(values: dict[str, Any]) -> str:
    if "change" in values:
        change = values["change"]
        low, high = change["interval"]
        return f"{change['estimate']:+.3g} [{low:+.3g}, {high:+.3g}]"
    if values["before"] is not None and values["after"] is not None:
        return f"{values['after'] - values['before']:+.3g}"
    return "-"


def scorecard_markdown(card: dict[str, Any]) -> list[str]:
    stages = list(card["stages"])
    lines = [
        "## Held-out exact match per task family",
        "",
        "SFT's validation conversations answered greedily by each chat stage's final checkpoint, with 95% "
        "intervals; **lower**: below SFT beyond the uncertainty (the interval of the paired change from SFT, "
        "on the same conversations, lies below 0).",
        "",
        "| family | n | " + " | ".join(stages) + " |",
        "| --- | --- |" + " --- |" * len(stages),
    ]
    for family in card["families"]:
        cells, n = [], ""
        for stage in stages:
            cell = card["stages"][stage].get(family)
            if cell is None:
                cells.append("-")
                continue
            n = n or str(cell["n"])
            text = _with_interval(cell["exact_match"], cell["interval"])
            cells.append(f"{text} **lower**" if cell.get("lower") else text)
        lines.append(f"| {family} | {n} | " + " | ".join(cells) + " |")
    lines.append("")
    if card["lower_than_sft"]:
        cases = [
            f"{c['stage']} on {c['family']} ({c['estimate']:+.3g} [{c['interval'][0]:+.3g}, {c['interval'][1]:+.3g}])"
            for c in card["lower_than_sft"]
        ]
        lines.append("Lower than SFT beyond the uncertainty: " + "; ".join(cases) + ".")
    else:
        lines.append("No family is lower than SFT beyond the uncertainty.")
    return [*lines, ""]


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# stagelm pipeline report",
        "",
        f"Total wall time {report['total_wall_time_s'] / 60:.1f} min, "
        f"{report['total_tokens_seen'] / 1e6:.2f}M training tokens. Brackets: 95% bootstrap intervals over the "
        "held-out items; improved: yes only where the change's interval excludes 0 in the good direction.",
        "",
        "| stage | metric | before | after | change | improved | wall time | tokens | rollout tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    marks = {True: "yes", False: "NO", None: "-"}  # without per-item values: merely moved the right way
    for stage, info in report["stages"].items():
        first = True
        for metric, values in info["headline"].items() or [("-", {"before": None, "after": None})]:
            wall = f"{info['wall_time_s'] / 60:.1f} min" if first and info["wall_time_s"] else ""
            tokens = f"{info['tokens_seen'] / 1e6:.2f}M" if first and info["tokens_seen"] else ""
            mark = values.get("verdict") or (marks[info["improved"]] if first else "")
            rate = info.get("rollout_tokens_per_sec")
            rate = f"{rate:,.0f}" if first and rate else ""
            before = _with_interval(values["before"], values.get("before_interval"))
            after = _with_interval(values["after"], values.get("after_interval"))
            lines.append(
                f"| {stage if first else ''} | {metric} | {before} | {after} | {_fmt_change(values)} | {mark} | "
                f"{wall} | {tokens} | {rate} |"
            )
            first = False
    lines.append("")
    if report.get("scorecard"):
        lines += scorecard_markdown(report["scorecard"])
    lines += ["## The same prompts after each stage", ""]
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
        info["verdict"] = stage_verdict(stage, info["headline"])
        report["stages"][stage] = info
    report["total_wall_time_s"] = sum(i["wall_time_s"] or 0 for i in report["stages"].values())
    report["total_tokens_seen"] = sum(i["tokens_seen"] or 0 for i in report["stages"].values())
    card_items = scorecard_items(out_dir, stages)
    report["scorecard"] = scorecard(card_items) if card_items else None
    report["samples"] = answer_prompts(out_dir, stages, prompts)
    report["plots"] = plot_curves(out_dir, stages)
    atomic_write_json(out_dir / "report.json", report, indent=2)
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
    if report.get("scorecard"):
        cells = [
            [stage, family, cell["exact_match"], *cell["interval"], bool(cell.get("lower"))]
            for stage, row in report["scorecard"]["stages"].items()
            for family, cell in row.items()
        ]
        columns = ["stage", "family", "exact_match", "low", "high", "lower_than_sft"]
        run.log({"report/scorecard": wandb.Table(columns=columns, data=cells)})
    samples = [[p, s, r] for p, by in report["samples"].items() for s, r in by.items()]
    run.log({"report/samples": wandb.Table(columns=["prompt", "stage", "reply"], data=samples)})
    run.log({f"report/{p.removesuffix('.png')}": wandb.Image(str(out_dir / p)) for p in report["plots"]})
    run.finish()
