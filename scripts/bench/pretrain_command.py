"""Training speed where users feel it: `stagelm-train stage=pretrain` itself, run end to end, against the fp32
eager run of the same command (the setting before bf16-mixed and compile were measured) in the same session.

Each contestant is the real command in a subprocess of its own, with its own output folder; rounds alternate the
order, and each round's ratio is taken between neighbours in time (two busy cores slow any run several-fold).
Reported per contestant: the median `train/tokens_per_sec` from step 50 (the compiled run's first step, which
compiles, is left out) and the whole command's wall time (which keeps it in).

    .venv/bin/python scripts/bench/pretrain_command.py                 # 2 rounds of 300 steps, ~8 min on 2 cores
    .venv/bin/python scripts/bench/pretrain_command.py --steps 1500    # the default run's length (auto compiles)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> overrides; the first is the peer every ratio is against
CONTESTANTS = {
    "fp32 eager": ["trainer.precision=32-true", "compile=false"],
    "defaults": [],
    "compile=true": ["compile=true"],
}


def run(overrides: list[str], steps: int, out: Path, threads: int) -> tuple[float, float, float | None]:
    """One real run -> (median tokens/s from step 50, wall seconds, last val/loss)."""
    command = [
        str(Path(sys.executable).with_name("stagelm-train")),
        "stage=pretrain",
        f"trainer.max_steps={steps}",
        "logger=csv",
        f"hydra.run.dir={out}",
        *overrides,
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    rates, val_loss = [], None
    for line in (out / "history.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/tokens_per_sec" in record and record["step"] >= 50:
            rates.append(record["train/tokens_per_sec"])
        val_loss = record.get("val/loss", val_loss)
    return statistics.median(rates), wall, val_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=",".join(CONTESTANTS), help="comma-separated contestants")
    args = parser.parse_args()
    names = [n for n in CONTESTANTS if n in args.only.split(",")]
    peer = names[0]
    print(
        f"{time.strftime('%Y-%m-%d')} stagelm-train stage=pretrain trainer.max_steps={args.steps},"
        f" {args.threads} threads"
    )
    results: dict[str, list[tuple[float, float, float | None]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                results[name].append(
                    run(CONTESTANTS[name], args.steps, Path(tmp) / f"{r}-{names.index(name)}", args.threads)
                )
                rate, wall, loss = results[name][-1]
                print(f"  round {r} {name:>13}: {rate:8.0f} tokens/s, {wall:6.1f} s whole command, val/loss {loss}")
    print("medians over rounds (ratios per round, then their median):")
    for name in names:
        rates = [x[0] for x in results[name]]
        walls = [x[1] for x in results[name]]
        line = f"  {name:>13}: {statistics.median(rates):8.0f} tokens/s, {statistics.median(walls):6.1f} s"
        if name != peer:
            ratio = statistics.median(o[0] / p[0] for o, p in zip(results[name], results[peer]))
            line += f"  {ratio:.2f}x {peer}'s tokens/s"
        print(line)


if __name__ == "__main__":
    main()
