"""One request's generation, seen from the asyncio side: its choices submitted to the engine, the engine's
events carried over to the event loop, and each choice's tokens assembled into text and tool calls.

Submitting happens before any response byte is sent, so a full queue (429) or a prompt that does not fit (400)
is an HTTP status even for streamed requests. A client that goes away, or a stop string, cancels the sequences,
freeing their batch slots at the next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from stagelm.serve.conversation import Delta, ReplyAssembler
from stagelm.serve.engine import Event, FinishEvent, SamplingParams, SequenceHandle, TokenEvent
from stagelm.serve.metrics import ServerMetrics
from stagelm.serve.registry import ServedModel


class _Relay:
    """Carries engine events into one event loop with one wake-up per burst of events rather than one per token:
    a decode step emits a token for every running row, and waking the loop for each would cost a system call
    and a loop iteration apiece, on the same cores the decode loop needs."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: deque[tuple[asyncio.Queue, object]] = deque()
        self.scheduled = False
        self.lock = threading.Lock()

    def push(self, queue: asyncio.Queue, item: object) -> None:
        with self.lock:
            self.pending.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed (the server is shutting down): nobody is listening
            pass

    def _drain(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, deque(), False
        for queue, item in items:
            queue.put_nowait(item)


_relays: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Relay] = weakref.WeakKeyDictionary()


def _relay_for(loop: asyncio.AbstractEventLoop) -> _Relay:
    relay = _relays.get(loop)
    if relay is None:
        relay = _relays[loop] = _Relay(loop)
    return relay


class GenerationError(RuntimeError):
    """The engine failed while generating (a server error, reported as such)."""


@dataclass
class ChoiceUpdate:
    index: int
    delta: Delta
    finish_reason: str | None = None  # set on the last update of a choice


class GenerationRun:
    """Submit `n` choices of one prompt; iterate `updates()` (once) to drive them to the end."""

    def __init__(
        self,
        served: ServedModel,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        n: int,
        stop: Sequence[str],
        metrics: ServerMetrics,
        tool_calls: bool = True,
    ) -> None:
        self.served, self.metrics, self.n = served, metrics, n
        self.prompt_tokens = len(prompt_ids)
        self.relay = _relay_for(asyncio.get_running_loop())
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.assemblers = [
            ReplyAssembler(served.tokenizer, stop, logprobs=params.logprobs, tool_calls=tool_calls) for _ in range(n)
        ]
        self.completion_tokens = [0] * n
        self.routing: list[dict | None] = [None] * n
        self.accepted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.handles: list[SequenceHandle] = served.engine.submit(prompt_ids, params, self._emit_from_engine, count=n)

    def _emit_from_engine(self, index: int, event: Event) -> None:
        # called on the engine thread: hand the event over to the event loop
        self.relay.push(self.events, (index, event))

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    @property
    def usage(self) -> dict[str, int]:
        completion = sum(self.completion_tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip

    async def updates(self) -> AsyncIterator[ChoiceUpdate]:
        open_choices = set(range(self.n))
        try:
            while open_choices:
                index, event = await self.events.get()
                assembler = self.assemblers[index]
                if isinstance(event, TokenEvent):
                    self.completion_tokens[index] += 1
                    if self.first_token_at is None:
                        self.first_token_at = time.perf_counter()
                        self.metrics.time_to_first_token.labels(self.served.name).observe(
                            self.first_token_at - self.accepted_at
                        )
                    if event.is_stop:
                        continue
                    was_stopped = assembler.stopped_by_string
                    delta = assembler.feed(event.token_id, event.logprob, event.top_logprobs)
                    if assembler.stopped_by_string and not was_stopped:
                        self.handles[index].cancel()
                    if delta:
                        yield ChoiceUpdate(index, delta)
                    continue
                assert isinstance(event, FinishEvent)
                open_choices.discard(index)
                if event.reason == "error":
                    raise GenerationError(event.error or "generation failed")
                self.routing[index] = event.routing
                self.metrics.record_routing(self.served.name, event.routing)
                delta = assembler.finish(event.reason)
                yield ChoiceUpdate(index, delta, assembler.finish_reason)
        finally:
            if open_choices:  # the consumer stopped early (client disconnected): free the batch slots
                self.cancel()
            self.finished_at = time.perf_counter()
            self.metrics.prompt_tokens.labels(self.served.name).inc(self.prompt_tokens * self.n)
            self.metrics.completion_tokens.labels(self.served.name).inc(sum(self.completion_tokens))
            self.metrics.generation_latency.labels(self.served.name).observe(self.finished_at - self.accepted_at)

    async def collect(self) -> list[ReplyAssembler]:
        """Run to the end (non-streamed replies); the assemblers hold each choice's content and tool calls."""
        async for _ in self.updates():
            pass
        return self.assemblers
