"""SFT training speed with length-grouped batches (the default) against random ones, on the built-in conversations.

A step is forward, assistant-token loss, backward and AdamW on the `tiny` or `small` model, 32 conversations a
batch. Rounds alternate the two loaders (the machine is shared and noisy); each round times a few steps of each,
and the figure that matters, conversations trained on per second, is compared per round before the median.

    .venv/bin/python scripts/bench/sft_grouping.py                 # about a minute on 2 cores
    .venv/bin/python scripts/bench/sft_grouping.py --model small
    .venv/bin/python scripts/bench/sft_grouping.py --rounds 2      # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from stagelm.data.instruct import IGNORE_INDEX, InstructDataModule
from stagelm.model import ModelConfig, Transformer
from stagelm.tokenizer import CharTokenizer

CONF_DIR = Path(__file__).resolve().parents[2] / "src" / "stagelm" / "conf"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=4, help="timed steps per loader per round")
    p.add_argument("--batch", type=int, default=32, help="conversations per step (the default)")
    p.add_argument("--model", choices=["tiny", "small"], default="tiny")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def loader(tokenizer: CharTokenizer, grouped: bool, batch_size: int, steps: int):
    data = InstructDataModule(
        group_by_length=grouped, batch_size=batch_size, max_steps=steps, max_length=320, builtin_train=4000
    )
    data.set_tokenizer(tokenizer)
    data.setup()
    return iter(data.train_dataloader())


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from stagelm.data import world

    tokenizer = CharTokenizer.train([world.pretrain_corpus(n_chars=200_000)])
    shape = OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml")
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, **shape))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    total = args.rounds * args.steps + 2
    loaders = {
        "random": loader(tokenizer, False, args.batch, total),
        "grouped": loader(tokenizer, True, args.batch, total),
    }

    def step(batch: dict[str, torch.Tensor]) -> int:
        out = model(batch["input_ids"])
        loss = F.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        (loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch["input_ids"].size(0)

    for it in loaders.values():  # warm-up
        step(next(it))
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    ratios = []
    for r in range(args.rounds):
        order = list(loaders) if r % 2 == 0 else list(reversed(loaders))
        this_round = {}
        for name in order:
            start, conversations = time.perf_counter(), 0
            for _ in range(args.steps):
                conversations += step(next(loaders[name]))
            this_round[name] = conversations / (time.perf_counter() - start)
            rates[name].append(this_round[name])
        ratios.append(this_round["grouped"] / this_round["random"])
    for name, values in rates.items():
        print(f"{name:>7}: {statistics.median(values):7.1f} conversations/s (median of {args.rounds} rounds)")
    print(f"grouped / random: {statistics.median(ratios):.2f}x conversations per second (per-round ratios, median)")


if __name__ == "__main__":
    main()
