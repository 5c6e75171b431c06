"""The continuous-batching engine on its own: requests that join and leave a running batch get exactly the
tokens `generate` gives them alone, seeds hold whatever else runs, capacity is bounded, cancelling frees a slot."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from stagelm.generation import generate
from stagelm.model import Transformer
from stagelm.serve.engine import Engine, FinishEvent, QueueFullError, SamplingParams, TokenEvent
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_model_config(max_seq_len=128)).eval()


class Collector:
    """Gathers one submission's events per choice; `wait` blocks until every choice finished."""

    def __init__(self, count: int = 1) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(count)]
        self.finish: list[FinishEvent | None] = [None] * count
        self._done = threading.Semaphore(0)
        self.count = count

    def __call__(self, index: int, event) -> None:
        if isinstance(event, TokenEvent):
            self.tokens[index].append(event.token_id)
        else:
            self.finish[index] = event
            self._done.release()

    def wait(self) -> Collector:
        for _ in range(self.count):
            assert self._done.acquire(timeout=60)
        return self


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.randint(11, 32, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def test_staggered_requests_match_generate_alone(model: Transformer) -> None:
    batch = prompts(10)
    expected = generate(model, batch, 40, greedy=True, pad_id=0).completions()
    engine = Engine(model, max_running=4, max_waiting=10).start()
    try:
        collectors = []
        for i, prompt in enumerate(batch):  # lengths differ, so rows join and leave at different steps
            collectors.append(Collector())
            engine.submit(prompt, SamplingParams(max_tokens=40 - 3 * i, temperature=0), collectors[-1])
            time.sleep(0.002 * i)
        for i, c in enumerate(collectors):
            c.wait()
            assert c.tokens[0] == expected[i][: 40 - 3 * i], i
            assert c.finish[0].reason == "length" and c.finish[0].completion_tokens == 40 - 3 * i
            assert c.finish[0].prompt_tokens == len(batch[i])
        assert engine.steps < sum(40 - 3 * i for i in range(10))  # rows shared decode steps
        assert engine.load == (0, 0)
    finally:
        engine.stop()


def test_seeded_sampling_is_independent_of_the_batch(model: Transformer) -> None:
    engine = Engine(model, max_running=8, max_waiting=8).start()
    try:
        params = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=42)
        alone = Collector()
        engine.submit(prompts(1)[0], params, alone)
        alone.wait()
        others = [Collector() for _ in range(4)]
        for o, prompt in zip(others, prompts(4)):
            engine.submit(prompt, SamplingParams(max_tokens=50, temperature=1.0), o)
        crowded = Collector()
        engine.submit(prompts(1)[0], params, crowded)
        two = Collector(2)  # two choices: seeds 42 and 43
        engine.submit(prompts(1)[0], params, two, count=2)
        crowded.wait(), two.wait()
        for o in others:
            o.wait()
        assert crowded.tokens == alone.tokens and two.tokens[0] == alone.tokens[0] != two.tokens[1]
    finally:
        engine.stop()


def test_capacity_is_bounded_and_cancel_frees_a_slot(model: Transformer) -> None:
    engine = Engine(model, max_running=1, max_waiting=1).start()
    try:
        long = SamplingParams(max_tokens=120, temperature=1.0, stop_token_ids=())
        first, second = Collector(), Collector()
        handle = engine.submit([1, 2, 3], long, first)[0]
        engine.submit([1, 2, 3], long, second)
        with pytest.raises(QueueFullError) as info:
            engine.submit([1, 2, 3], long, Collector())
        assert info.value.retry_after_s >= 1
        with pytest.raises(ValueError, match="exceeds the model's context"):
            engine.submit([1] * 100, SamplingParams(max_tokens=29), Collector())
        handle.cancel()
        assert first.wait().finish[0].reason == "cancelled" and len(first.tokens[0]) < 120
        third = Collector()
        engine.submit([1, 2, 3], SamplingParams(max_tokens=3), third)  # room again
        assert second.wait().finish[0].reason == "length" and third.wait().finish[0].completion_tokens == 3
    finally:
        engine.stop()


def test_forced_and_banned_tokens(model: Transformer) -> None:
    engine = Engine(model).start()
    try:
        greedy = Collector()
        engine.submit([5, 6, 7], SamplingParams(max_tokens=6, temperature=0), greedy)
        favourite = greedy.wait().tokens[0][0]
        constrained = Collector()
        params = SamplingParams(max_tokens=6, temperature=0, forced_prefix=(3, 4), banned_token_ids=(favourite,))
        engine.submit([5, 6, 7], params, constrained)
        tokens = constrained.wait().tokens[0]
        assert tokens[:2] == [3, 4] and favourite not in tokens[2:]
    finally:
        engine.stop()
