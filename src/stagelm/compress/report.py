"""`compress_report.md`, `compress_report.json` and `compress_size_accuracy.png`: one row per step (the baseline
first), every figure measured by the run that wrote them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = [
    ("step", "step"),
    ("params_total", "params"),
    ("params_active", "active/token"),
    ("weight_bytes", "weight bytes"),
    ("smaller_than_fp32", "smaller vs fp32"),
    ("ratio_vs_bf16", "size vs bf16"),
    ("val/loss", "held-out loss"),
    ("val/exact_match", "exact match"),
    ("val/format_ok", "format ok"),
    ("val/kl_to_original", "KL to original"),
    ("tokens_per_s_b1", "tok/s b1"),
    ("tokens_per_s_b16", "tok/s b16"),
    ("speed_vs_original_b1", "speed x b1"),
    ("speed_vs_original_b16", "speed x b16"),
    ("seconds", "time s"),
]


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if key in ("params_total", "params_active", "weight_bytes"):
        return f"{int(value):,}"
    if key in ("smaller_than_fp32",):
        return f"{value:.1%}"
    if key.startswith("speed_vs"):
        return f"{value:.2f}"
    if key.startswith("tokens_per_s") or key == "seconds":
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    return f"{value:.3f}"


def render_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [
        f"# Compression report: recipe `{report['recipe']}`",
        "",
        f"Source: `{report['source']}` (stage {report['source_stage']}); output: `{report['output']}`.",
        f"fp32 original: {report['fp32_bytes']:,} weight bytes; bf16 original: {report['bf16_bytes']:,}. "
        "Steps apply "
        + ("in sequence (each row includes the rows above)." if report["chain"] else "each to the original alone."),
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(k, row.get(k)) for k, _ in COLUMNS) + " |")
    families = sorted({k for row in rows for k in row if k.startswith("val/exact_match_")})
    if families:
        lines += ["", "Exact match per task family:", "", "| step | " + " | ".join(f[16:] for f in families) + " |"]
        lines.append("|" + "---|" * (len(families) + 1))
        for row in rows:
            lines.append(f"| {row['step']} | " + " | ".join(_fmt(f, row.get(f)) for f in families) + " |")
    targets = report.get("targets")
    if targets:
        lines += ["", "Targets:", ""]
        lines += [f"- {t['what']}: {'met' if t['met'] else 'NOT met'} ({t['measured']})" for t in targets]
    lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    lines += [
        "",
        "Weight bytes are the tensors as stored (weights only, no optimizer state). Weights are decoded to dense "
        "fp32 when loaded, so sparse and low-rank storage shrink the file, not the compute: dense kernels get no "
        "speed-up from zeros. Structured pruning shrinks the shapes and does speed decoding up. `speed x` is the "
        "step's decode speed over the original's, both timed alternately in the same rounds (robust to a shared "
        "machine's load; the absolute tok/s are not).",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report is complete without its picture
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in report["rows"]:
        x, y = row["weight_bytes"] / 1e6, row.get("val/exact_match")
        if y is None:
            continue
        ax.scatter([x], [y])
        ax.annotate(row["step"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("weight bytes on disk (MB)")
    ax.set_ylabel("held-out exact match")
    ax.set_title(f"size vs accuracy: recipe {report['recipe']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "compress_report.json", out_dir / "compress_report.md"]
    written[0].write_text(json.dumps(report, indent=2))
    written[1].write_text(render_markdown(report))
    picture = plot(report, out_dir / "compress_size_accuracy.png")
    return written + ([picture] if picture else [])
