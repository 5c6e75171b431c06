"""Throughput of KV-cached generation (`stagelm.generation.generate`) against naive generation that re-runs a full
forward pass over prompt + completion at every step, in the same process on the same model and prompts.

    .venv/bin/python scripts/bench/generation_throughput.py               # CPU-sized defaults
    .venv/bin/python scripts/bench/generation_throughput.py --device cuda --d-model 512 --n-layers 8 --new-tokens 256

Both decode greedily with no stop tokens, so every row produces exactly --new-tokens tokens and both do the same
work apart from the cache; the naive loop applies the LM head to the last position only, so the ratio measures the
cache and nothing else. Prints the median over --repeats timed runs (after one warm-up run) and the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stagelm.generation import generate, left_pad
from stagelm.model import ModelConfig, Transformer


def naive_generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, pad_id: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole left-padded sequence goes through the model at every step."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    new = []
    for _ in range(max_new_tokens):
        hidden = model(ids, attention_mask=mask, return_hidden=True, compute_logits=False).hidden
        next_tokens = model.lm_head(hidden[:, -1]).argmax(-1)  # [B]
        new.append(next_tokens)
        ids = torch.cat([ids, next_tokens[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(new, 1)


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--n-kv-heads", type=int, default=2)
    parser.add_argument("--n-experts", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    config = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        d_ff=args.d_model,
        d_ff_dense=4 * args.d_model,
        n_experts=args.n_experts,
        top_k=min(2, args.n_experts) if args.n_experts else 1,
        moe_every=2,
        max_seq_len=args.max_prompt + args.new_tokens,
    )
    model = Transformer(config).to(device=device, dtype=dtype).eval()
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.batch,)).tolist()
    prompts = [torch.randint(11, args.vocab, (n,)).tolist() for n in lengths]  # ids above the special tokens
    pad_id = 2

    def cached() -> torch.Tensor:
        return generate(model, prompts, args.new_tokens, greedy=True, pad_id=pad_id).tokens

    def naive() -> torch.Tensor:
        with torch.no_grad():
            return naive_generate(model, prompts, args.new_tokens, pad_id)

    n_tokens = args.batch * args.new_tokens
    results = {}
    for name, fn in (("cached", cached), ("naive", naive)):
        fn()  # warm-up: allocator, kernels, lazy initialisation
        times, tokens = [], None
        for _ in range(args.repeats):
            seconds, tokens = timed(fn, device)
            times.append(seconds)
        results[name] = (statistics.median(times), tokens)

    params = sum(p.numel() for p in model.parameters())
    print(
        f"device={device} dtype={args.dtype} params={params / 1e6:.2f}M batch={args.batch} "
        f"prompts={min(lengths)}-{max(lengths)} new_tokens={args.new_tokens} repeats={args.repeats}"
    )
    for name, (seconds, _) in results.items():
        print(f"{name:>6}: {n_tokens / seconds:10.1f} tokens/s  (median {seconds:.3f} s)")
    speedup = results["naive"][0] / results["cached"][0]
    print(f"speed-up (cached / naive tokens/s): {speedup:.2f}x")
    agree = (results["cached"][1] == results["naive"][1]).float().mean().item()
    # greedy paths agree unless two logits are within rounding of each other; a low value would mean a bug
    print(f"greedy tokens identical: {agree:.1%}")


if __name__ == "__main__":
    main()
