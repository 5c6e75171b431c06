"""Throughput and latency of `stagelm-serve` over loopback: continuous batching against the same requests sent one
after another, time to first token under load, and a burst against a bounded queue, all in one run.

    .venv/bin/python scripts/bench/serve_throughput.py                      # small model, random weights
    .venv/bin/python scripts/bench/serve_throughput.py --ckpt outputs/pipeline/sft/checkpoints/last.ckpt

The server runs in its own process (`python -m stagelm.cli.serve`, as a user starts it), the clients are asyncio
httpx streams in this one. Every request is a streamed chat completion with its own seed and `min_tokens =
max_tokens` (a stagelm extension, as in vLLM), so sequential and concurrent runs generate exactly the same tokens
and the ratio measures the batching alone. Without --ckpt the `small` model config (conf/model/small.yaml) with
random weights and the default character tokenizer is served: same shapes, same work per token as the trained one.

Targets (issue 15): 8 concurrent streaming clients get >= 4x the aggregate completion tokens/s of the same requests
sent one after another; p50 time to first token < 150 ms at that load; a burst of 64 clients against a queue of 16
gets its 429s at once and loses no accepted request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]


def random_small_checkpoint(path: Path) -> Path:
    from stagelm.checkpoint import atomic_torch_save, stagelm_metadata
    from stagelm.model import ModelConfig, Transformer
    from stagelm.tokenizer import CharTokenizer

    values = OmegaConf.to_container(OmegaConf.load(ROOT / "src/stagelm/conf/model/small.yaml"))
    tokenizer = CharTokenizer.train([])
    config = ModelConfig(**{**values, "vocab_size": tokenizer.vocab_size})
    torch.manual_seed(0)
    model = Transformer(config)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, "stagelm": stagelm_metadata(config, tokenizer, "sft")}, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m stagelm.cli.serve` in a subprocess, up until the context exits."""

    def __init__(self, ckpt: Path, max_running: int, max_waiting: int, threads: int | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [f"ckpt={ckpt}", f"port={self.port}", f"max_running={max_running}", f"max_waiting={max_waiting}"]
        args += ["log_level=warning", "temperature=1.0", "top_p=null"]
        if threads:
            args.append(f"threads={threads}")
        env = {k: v for k, v in os.environ.items() if k != "STAGELM_API_KEY"}  # no key: nothing to send
        env["PYTHONPATH"] = str(ROOT / "src")
        self.process = subprocess.Popen([sys.executable, "-m", "stagelm.cli.serve", *args], env=env)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{self.url}/health", timeout=1).raise_for_status()
                return self
            except httpx.HTTPError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def request_body(model: str, seed: int, max_tokens: int) -> dict:
    question = f"Request {seed}: tell me about the number {seed * 37}."
    return {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed chat completion: status, time to first token, completion tokens, finish reason, wall time."""
    started = time.perf_counter()
    first_token, tokens, finish = None, 0, None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"status": response.status_code, "seconds": time.perf_counter() - started}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if first_token is None and (choice["delta"].get("content") or choice["delta"].get("tool_calls")):
                    first_token = time.perf_counter() - started
                finish = choice.get("finish_reason") or finish
    return {"status": 200, "ttft": first_token, "tokens": tokens, "finish": finish,
            "seconds": time.perf_counter() - started}  # fmt: skip


async def sequential(url: str, bodies: list[dict]) -> tuple[float, list[dict]]:
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        results = [await stream_one(client, url, body) for body in bodies]
        return time.perf_counter() - started, results


async def concurrent(url: str, bodies: list[dict]) -> tuple[float, list[dict]]:
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, url, body) for body in bodies))
        return time.perf_counter() - started, list(results)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="checkpoint to serve (default: small config, random weights)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="concurrent rounds; the median is reported")
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--queue", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (1 is fastest for small)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or random_small_checkpoint(Path(tmp) / "small_random.ckpt")
        from stagelm.checkpoint import load_checkpoint

        stage = load_checkpoint(ckpt).stage
        model = f"stagelm-{stage}"
        bodies = [request_body(model, seed, args.max_tokens) for seed in range(args.clients)]
        print(f"checkpoint: {ckpt if args.ckpt else 'small config, random weights'}; torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs; {args.clients} requests x {args.max_tokens} tokens, streamed")  # fmt: skip

        with Server(ckpt, max_running=args.clients, max_waiting=args.queue, threads=args.threads) as server:
            asyncio.run(concurrent(server.url, bodies[:2]))  # warm-up
            seq_seconds, seq_results = asyncio.run(sequential(server.url, bodies))
            rounds = [asyncio.run(concurrent(server.url, bodies)) for _ in range(args.rounds)]
            conc_seconds, conc_results = sorted(rounds, key=lambda r: r[0])[len(rounds) // 2]

            seq_tokens = sum(r["tokens"] for r in seq_results)
            conc_tokens = sum(r["tokens"] for r in conc_results)
            assert seq_tokens == conc_tokens == args.clients * args.max_tokens, (seq_tokens, conc_tokens)
            seq_rate, conc_rate = seq_tokens / seq_seconds, conc_tokens / conc_seconds
            ttfts = [r["ttft"] * 1000 for r in conc_results]
            seq_ttfts = [r["ttft"] * 1000 for r in seq_results]
            print(f"sequential: {seq_rate:8.1f} completion tokens/s ({seq_seconds:.2f} s), "
                  f"p50 TTFT {statistics.median(seq_ttfts):.0f} ms")  # fmt: skip
            print(f"{args.clients} concurrent: {conc_rate:8.1f} completion tokens/s ({conc_seconds:.2f} s), "
                  f"p50 TTFT {statistics.median(ttfts):.0f} ms, p90 {percentile(ttfts, 0.9):.0f} ms")  # fmt: skip
            print(f"batching speed-up: {conc_rate / seq_rate:.2f}x (target >= 4x); "
                  f"p50 TTFT {statistics.median(ttfts):.0f} ms (target < 150 ms)")  # fmt: skip

        with Server(ckpt, max_running=args.clients, max_waiting=args.queue, threads=args.threads) as server:
            burst = [request_body(model, 1000 + i, args.max_tokens // 2) for i in range(args.burst)]
            asyncio.run(concurrent(server.url, burst[:2]))  # warm-up
            seconds, results = asyncio.run(concurrent(server.url, burst))
            rejected = [r for r in results if r["status"] == 429]
            accepted = [r for r in results if r["status"] == 200]
            complete = [r for r in accepted if r["tokens"] == args.max_tokens // 2 and r["finish"] == "length"]
            other = len(results) - len(rejected) - len(accepted)
            slowest_429 = max((r["seconds"] for r in rejected), default=0.0) * 1000
            print(f"burst of {args.burst} (batch {args.clients} + queue {args.queue}): {len(accepted)} accepted, "
                  f"{len(complete)} of them complete; {len(rejected)} got 429, the slowest after {slowest_429:.0f} ms; "
                  f"{other} other; all done in {seconds:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
