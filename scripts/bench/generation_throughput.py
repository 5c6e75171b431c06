"""Greedy KV-cache generation of `stagelm.generation.generate` against Hugging Face `generate` on the exported
weights of the same model, in the same process: tokens/s, the ratio to Hugging Face, and whether the greedy tokens
are identical.

    .venv/bin/python scripts/bench/generation_throughput.py --ckpt outputs/.../checkpoints/last.ckpt
    .venv/bin/python scripts/bench/generation_throughput.py            # random `small` model (see --init-std)
    .venv/bin/python scripts/bench/generation_throughput.py --device cuda --batches 1 64

Contestants: stagelm eager, stagelm with `compile=True` (one compiled decode step over a static cache; its first
call, which compiles, is timed apart and reported), and `transformers`' `Llama4ForCausalLM.generate` (its default
dynamic cache). Every contestant decodes greedily with no stop token, so every row produces exactly --new-tokens
tokens. The machine is shared and noisy: each round runs every contestant once in a rotated order, ratios are
taken within a round, and the medians over rounds are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

import stagelm
from stagelm.export.hf import build_hf_model
from stagelm.generation import generate, left_pad
from stagelm.model import ModelConfig, Transformer
from stagelm.tokenizer import CharTokenizer, Tokenizer

SMALL = Path(__file__).resolve().parents[2] / "src/stagelm/conf/model/small.yaml"
PROMPTS = ["12 + 7 =", "Tom has 12 apples.", "twenty-three plus", "What is 45 - 18?", "The cat", "Compute 9 times 10."]


def load_model(args: argparse.Namespace) -> tuple[Transformer, Tokenizer]:
    if args.ckpt:
        return stagelm.load(args.ckpt)
    tokenizer = CharTokenizer.train(PROMPTS)
    values = OmegaConf.to_container(OmegaConf.load(SMALL))
    values.update(vocab_size=tokenizer.vocab_size, init_std=args.init_std)
    torch.manual_seed(args.seed)
    return Transformer(ModelConfig.from_dict(values)), tokenizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    start = time.perf_counter()
    tokens = fn()
    sync(device)
    return time.perf_counter() - start, tokens


def bench_batch(
    model: Transformer,
    hf: torch.nn.Module,
    tokenizer: Tokenizer,
    batch: int,
    args: argparse.Namespace,
    device: torch.device,
) -> None:
    """Time every contestant at one batch size and print tokens/s, ratios and greedy agreement."""
    N = args.new_tokens
    texts = [PROMPTS[i % len(PROMPTS)] * (1 + i % 3) for i in range(batch)]  # lengths differ: left padding
    prompts = [[tokenizer.bos_id, *tokenizer.encode(t)] for t in texts]
    ids, mask = left_pad(prompts, tokenizer.pad_id, device)

    def ours(compile: bool) -> torch.Tensor:
        return generate(model, prompts, N, greedy=True, pad_id=tokenizer.pad_id, compile=compile).tokens

    def theirs() -> torch.Tensor:
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids,
                attention_mask=mask.long(),
                max_new_tokens=N,
                min_new_tokens=N,
                do_sample=False,
                pad_token_id=tokenizer.pad_id,
                eos_token_id=None,
            )
        return out[:, ids.shape[1] :]

    contestants = {"eager": lambda: ours(False), "compiled": lambda: ours(True), "hf": theirs}
    first_call = {}
    for name, fn in contestants.items():  # warm-up; the compiled one compiles here
        first_call[name], _ = timed(fn, device)
    times: dict[str, list[float]] = {name: [] for name in contestants}
    tokens: dict[str, torch.Tensor] = {}
    names = list(contestants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds, tokens[name] = timed(contestants[name], device)
            times[name].append(seconds)
    print(f"batch {batch} (prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens):")
    for name in names:
        median = statistics.median(times[name])
        line = f"  {name:>8}: {batch * N / median:9.1f} tokens/s (median {median:.3f} s)"
        if name != "hf":
            ratio = statistics.median(h / o for h, o in zip(times["hf"], times[name]))
            same = (tokens[name].cpu() == tokens["hf"].cpu()).float().mean().item()
            line += f"  {ratio:.2f}x HF  greedy tokens identical to HF: {same:.1%}"
        if name == "compiled":
            line += f"  (first call, compiling: {first_call[name]:.1f} s)"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a stagelm checkpoint; default: a randomly initialised `small` model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init-std", type=float, default=0.1, help="random model only: larger keeps logits apart")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tokenizer = load_model(args)
    model = model.to(device).eval()
    hf = build_hf_model(model.cpu(), tokenizer).to(device).eval()
    model = model.to(device)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{time.strftime('%Y-%m-%d')} device={device} threads={args.threads} torch={torch.__version__} "
        f"params={params / 1e6:.2f}M new_tokens={args.new_tokens} rounds={args.rounds} "
        f"model={'checkpoint ' + args.ckpt if args.ckpt else 'random small'}"
    )
    for batch in args.batches:
        bench_batch(model, hf, tokenizer, batch, args, device)


if __name__ == "__main__":
    main()
