"""What each stage is, declared once: the stage it starts from, its headline metrics (what says it did its job,
the first one judging "improved"), and the metric its best checkpoint and sweeps follow. The pipeline plans with
it, the report and the sweep summary read it, and the stage configs take their `monitor` from it (the
`stagelm_monitor` resolver), so a metric is renamed in one place. No torch import: the CLIs read it at start-up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageFacts:
    upstream: tuple[str, ...]  # the stages whose checkpoint it may start from, the first present in a pipeline
    # (metric, "min" | "max" | "budget"), every one logged at validation; "budget": a cost the stage spends within a
    # limit (PPO's KL to its reference rises from 0 by design), reported with its interval but judged neither way
    headlines: tuple[tuple[str, str], ...]
    monitor: tuple[str, str]  # (metric, mode) that best.ckpt and Optuna sweeps follow
    needs_reward_model: bool = False
    # also shown in the report when logged (a small validation set may hold none of the cases they count)
    also_reported: tuple[tuple[str, str], ...] = ()
    # every training batch has one shape, so a compiled backbone compiles once (stagelm.compile_policy)
    static_shapes: bool = False


STAGES: dict[str, StageFacts] = {
    "pretrain": StageFacts((), (("val/loss", "min"), ("val/bpc", "min")), ("val/loss", "min"), static_shapes=True),
    "sft": StageFacts(
        ("pretrain",),
        (("val/exact_match", "max"), ("val/format_ok", "max")),
        ("val/exact_match", "max"),
        also_reported=(
            ("val/tool_decision", "max"),
            ("val/tool_args_exact", "max"),
            ("val/tool_result_used", "max"),
            ("val/exact_match_turn2plus", "max"),
            ("val/exact_match_turn2plus_alone", "max"),
        ),
    ),
    "reward": StageFacts(("sft",), (("val/accuracy", "max"), ("val/margin", "max")), ("val/accuracy", "max")),
    "ppo": StageFacts(
        ("sft",),
        (("val/rm_score", "max"), ("val/win_rate_vs_sft", "max"), ("val/kl", "budget")),
        ("val/win_rate_vs_sft", "max"),
        needs_reward_model=True,
    ),
    "dpo": StageFacts(
        ("sft",),
        (("val/accuracy", "max"), ("val/win_rate_vs_sft", "max"), ("val/judge_score", "max")),
        ("val/accuracy", "max"),
    ),
    # knowledge distillation (also compression's recovery step): from a pruned SFT model, or a fresh smaller one
    "distill": StageFacts(
        ("sft",),
        (("val/exact_match", "max"), ("val/kl_to_teacher", "min"), ("val/format_ok", "max")),
        ("val/exact_match", "max"),
    ),
    "grpo": StageFacts(("ppo", "sft"), (("val/accuracy", "max"), ("val/pass@k", "max")), ("val/accuracy", "max")),
}


def monitor(stage: str, part: str) -> str:
    """`${stagelm_monitor:ppo,metric}` / `${stagelm_monitor:ppo,mode}` in the stage configs."""
    metric, mode = STAGES[stage].monitor
    return {"metric": metric, "mode": mode}[part]
