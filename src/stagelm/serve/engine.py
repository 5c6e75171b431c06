"""Continuous batching: every running request shares one batched KV-cache decode loop on a background thread.

A request joins the running batch at the next step (its prompt is prefilled, together with the other newcomers,
then its keys and values are copied into a free slot of the batch cache) and leaves it as soon as it finishes,
so a long reply never holds up a short one and the batch is as full as the traffic allows.

Cache layout. All slots share one write column `width`: slot i holds its tokens in columns [start_i, width), left
padded, and each decode step writes every row's new token at column `width`. That is the layout `generate` uses
for one batch, so the backbone's own masking and position logic (positions count a row's real tokens) apply
unchanged; the engine only has to keep the layout as rows come and go:
- a newcomer longer than `width` shifts the running rows right; a shorter one is placed left padded;
- a finished row's slot is filled by the last running row (one copy), so the running rows stay in slots [0, n);
- when the common left padding grows past half the width (rows that started long ago have left), every row is
  shifted left, which keeps attention over as few columns as possible.

Sampling draws each row's noise from its own torch.Generator seeded by the request: a request's tokens depend on its
seed and prompt, not on what else is in the batch (up to float rounding differences between batch shapes).

Expert routing: a forward hook on each MoE router records its logits at every step, and every row accumulates
how many of its tokens went to each expert and the router's entropy, per MoE layer; requests can ask for it
(the `stagelm` extension field) and the metrics count it for every request.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from stagelm.generation import filter_logits, left_pad
from stagelm.model import KVCache, Transformer
from stagelm.model.moe import MoE

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The engine already holds as many requests as it may (running plus waiting); retry later."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"the server is at capacity; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled. temperature 0 means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    forced_prefix: tuple[int, ...] = ()  # emitted first, whatever the model prefers (a forced tool call)
    banned_token_ids: tuple[int, ...] = ()  # never sampled (the tool-call token when tool_choice is "none")
    logprobs: bool = False
    top_logprobs: int = 0
    min_tokens: int = 0  # stop tokens are banned until this many tokens were generated


@dataclass
class TokenEvent:
    """One generated token; logprob is log_softmax(logits / temperature) at it (temperature 1 when greedy)."""

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None = None
    is_stop: bool = False


@dataclass
class FinishEvent:
    """The sequence ended: reason is "stop" (a stop token), "length", "cancelled" or "error"."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    routing: dict[str, dict[str, object]] | None = None  # MoE layer -> expert_tokens, expert_load, router_entropy


Event = TokenEvent | FinishEvent


@dataclass
class _Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[int, Event], None]
    generator: torch.Generator
    index: int = 0  # which of the submitted choices
    submitted_at: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    generated: int = 0
    last_token: int = 0
    start: int = 0  # first cache column of this row
    forced: list[int] = field(default_factory=list)
    done: bool = False


class SequenceHandle:
    """What `submit` returns: lets the caller stop a sequence early (a client that went away, a stop string)."""

    def __init__(self, seq: _Sequence, engine: Engine) -> None:
        self._seq, self._engine = seq, engine

    def cancel(self) -> None:
        self._seq.cancelled = True
        self._engine._wake()


class _SlotCache:
    """The batch cache seen by one forward pass of the backbone: the interface of `KVCache` (`length`, `write`),
    over the running rows [0, n) of the engine's preallocated slots, writing the new token at column `length`."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], n: int, width: int) -> None:
        self.keys, self.values, self.n, self.length = keys, values, n, width

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.keys[layer][: self.n, :, self.length : end] = k
        self.values[layer][: self.n, :, self.length : end] = v
        return self.keys[layer][: self.n, :, :end], self.values[layer][: self.n, :, :end]


class Engine:
    """A model's decode loop on a background thread; `submit` is thread-safe and never blocks.

    max_running: sequences decoded together (the batch size); max_waiting: sequences accepted beyond those, which
    join as running ones finish. A submit beyond both raises QueueFullError, so memory and latency stay bounded.
    """

    def __init__(
        self,
        model: Transformer,
        max_running: int = 8,
        max_waiting: int = 16,
    ) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError(f"max_running={max_running} must be >= 1 and max_waiting={max_waiting} >= 0")
        self.model = model.eval()
        self.config = model.config
        self.max_running, self.max_waiting = max_running, max_waiting
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # Twice the context: rows may sit right of the common left padding for a while before a compaction.
        self.capacity = 2 * self.config.max_seq_len
        shape = (max_running, self.config.n_kv_heads, self.capacity, self.config.head_dim)
        self.keys = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.config.n_layers)]
        self.values = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.config.n_layers)]
        self.width = 0
        self.running: list[_Sequence] = []
        self.waiting: deque[_Sequence] = deque()
        self._lock = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.decode_seconds = 0.0
        self.mean_request_seconds = 1.0  # running average, for Retry-After

        self.moe_layers = [i for i, block in enumerate(model.layers) if isinstance(block.feed_forward, MoE)]
        self._router_logits: dict[int, torch.Tensor] = {}
        self._hooks = [
            model.layers[i].feed_forward.router.register_forward_hook(self._record_router(i)) for i in self.moe_layers
        ]
        n_experts = max(self.config.n_experts, 1)
        self.expert_counts = torch.zeros(max_running, len(self.moe_layers), n_experts, device=self.device)
        self.entropy_sums = torch.zeros(max_running, len(self.moe_layers), device=self.device)

    # --- public, thread-safe --------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="stagelm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences right now."""
        return len(self.running), len(self.waiting)

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, emit: Callable[[int, Event], None], count: int = 1
    ) -> list[SequenceHandle]:
        """Queue `count` sequences of one prompt (choices of one request: seeds seed, seed + 1, ...); all or none.

        emit(choice_index, event) is called on the engine thread for every token and once with a FinishEvent; it
        must be quick and must not raise. ValueError for a prompt that does not fit; QueueFullError when at capacity."""
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                f"of {self.config.max_seq_len} tokens"
            )
        base_seed = params.seed if params.seed is not None else random.getrandbits(62)
        sequences = []
        for i in range(count):
            generator = torch.Generator(device=self.device).manual_seed((base_seed + i) % (1 << 63))
            sequences.append(_Sequence(prompt_ids, params, emit, generator, i, forced=list(params.forced_prefix)))
        with self._lock:
            if self._stopped:
                raise RuntimeError("the engine is stopped")
            held = len(self.running) + len(self.waiting)
            if held + count > self.max_running + self.max_waiting:
                excess = held + count - (self.max_running + self.max_waiting)
                retry = max(1.0, math.ceil(self.mean_request_seconds * excess / self.max_running))
                raise QueueFullError(retry)
            self.waiting.extend(sequences)
            self._lock.notify_all()
        return [SequenceHandle(s, self) for s in sequences]

    # --- the loop -----------------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _record_router(self, layer: int) -> Callable:
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self._router_logits[layer] = output.detach()

        return hook

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while not self._stopped and not self.running and not self.waiting:
                    self._lock.wait()
                if self._stopped:
                    break
                room = self.max_running - len(self.running)
                joining = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            try:
                with torch.no_grad():
                    self._drop_cancelled()
                    joining = [s for s in joining if not self._finish_if_cancelled(s)]
                    if joining:
                        self._prefill(joining)
                    if self.running:
                        self._decode_step()
            except Exception as e:  # noqa: BLE001 - one bad step must fail its requests, never the server
                log.exception("engine step failed")
                for seq in [*self.running, *joining]:
                    if not seq.done:
                        self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
                self.running, self.width = [], 0
        for seq in [*self.running, *self.waiting]:
            self._finish(seq, "cancelled")
        self.running, self.waiting = [], deque()

    def _finish_if_cancelled(self, seq: _Sequence) -> bool:
        if seq.cancelled:
            self._finish(seq, "cancelled")
        return seq.cancelled

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.running))):
            if self.running[i].cancelled:
                self._finish(self.running[i], "cancelled")
                self._remove_row(i)

    def _routing_of(self, row: int) -> dict[str, dict[str, object]] | None:
        if not self.moe_layers:
            return None
        counts = self.expert_counts[row]  # [L, E]
        shares = (counts / counts.sum(-1, keepdim=True).clamp_min(1)).tolist()
        routed = counts.sum(-1) / max(self.config.top_k, 1)  # tokens through each MoE layer
        entropy = (self.entropy_sums[row] / routed.clamp_min(1)).tolist()
        return {
            str(layer): {
                "expert_tokens": [int(c) for c in counts[j].tolist()],
                "expert_load": [round(s, 4) for s in shares[j]],
                "router_entropy": round(entropy[j], 4),
            }
            for j, layer in enumerate(self.moe_layers)
        }

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None, row: int | None = None) -> None:
        seq.done = True
        routing = None
        if row is not None:
            routing = self._routing_of(row)
        event = FinishEvent(reason, len(seq.prompt_ids), seq.generated, error, routing)
        elapsed = time.perf_counter() - seq.submitted_at
        self.mean_request_seconds = 0.9 * self.mean_request_seconds + 0.1 * elapsed
        seq.emit(seq.index, event)

    def _remove_row(self, i: int) -> None:
        """Drop row i: the last running row moves into its slot, so running rows stay in slots [0, n)."""
        last = len(self.running) - 1
        if i != last:
            for cache in (*self.keys, *self.values):
                cache[i, :, : self.width] = cache[last, :, : self.width]
            self.expert_counts[i] = self.expert_counts[last]
            self.entropy_sums[i] = self.entropy_sums[last]
            self.running[i] = self.running[last]
        self.running.pop()
        if not self.running:
            self.width = 0
            return
        shift = min(s.start for s in self.running)
        if shift > 0 and 2 * shift >= self.width:
            self._shift(-shift)

    def _shift(self, offset: int) -> None:
        """Move every running row's cache columns by offset (negative: left); the write column moves with them."""
        n, w = len(self.running), self.width
        for cache in (*self.keys, *self.values):
            block = cache[:n, :, max(0, -offset) : w].clone()
            cache[:n, :, max(0, offset) : max(0, offset) + block.shape[2]] = block
        for seq in self.running:
            seq.start += offset
        self.width += offset

    def _accumulate_routing(self, rows: slice, token_mask: torch.Tensor) -> None:
        """Add this forward's router decisions to rows' counts; token_mask [B, T] marks real tokens."""
        B, T = token_mask.shape
        weight = token_mask.reshape(B * T, 1).to(self.expert_counts.dtype)
        for j, layer in enumerate(self.moe_layers):
            logits = self._router_logits.pop(layer, None)
            if logits is None:
                continue
            moe: MoE = self.model.layers[layer].feed_forward
            experts, _ = moe.route(logits)  # [B*T, k]
            counts = torch.zeros(B * T, moe.n_experts, device=logits.device)
            counts.scatter_add_(1, experts, torch.ones_like(experts, dtype=counts.dtype))
            probs = torch.softmax(logits.float(), -1)
            entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1, keepdim=True)  # [B*T, 1]
            self.expert_counts[rows, j] += (counts * weight).view(B, T, -1).sum(1)
            self.entropy_sums[rows, j] += (entropy * weight).view(B, T).sum(1)

    def _prefill(self, joining: list[_Sequence]) -> None:
        """Run the newcomers' prompts as one left-padded batch, copy their caches into free slots, and sample
        each one's first token."""
        prompts = [s.prompt_ids for s in joining]
        ids, mask = left_pad(prompts, 0, self.device)
        B, P = ids.shape
        cache = KVCache(self.config, B, P, self.device, self.dtype)
        uniform = len({len(p) for p in prompts}) == 1
        out = self.model(
            ids, attention_mask=None if uniform else mask, cache=cache, return_hidden=True, compute_logits=False
        )
        logits = self.model.lm_head(out.hidden[:, -1]).float()  # [B, V]

        if P > self.width:
            self._shift(P - self.width)
        if self.width + 1 > self.capacity:  # cannot happen with prompts checked against max_seq_len
            raise RuntimeError("batch cache overflow")
        n = len(self.running)
        rows = slice(n, n + B)
        for layer in range(self.config.n_layers):
            # prompts end in column P - 1 of the prefill cache; in the batch cache they end in width - 1
            self.keys[layer][rows, :, self.width - P : self.width] = cache.keys[layer][:, :, :P]
            self.values[layer][rows, :, self.width - P : self.width] = cache.values[layer][:, :, :P]
        self.expert_counts[rows] = 0
        self.entropy_sums[rows] = 0
        self._accumulate_routing(rows, mask)
        for seq, prompt in zip(joining, prompts):
            seq.start = self.width - len(prompt)
            self.running.append(seq)
        self._sample_and_emit(logits, first_row=n)

    def _decode_step(self) -> None:
        started = time.perf_counter()
        n = len(self.running)
        if self.width + 1 > self.capacity:
            self._shift(-min(s.start for s in self.running))
        ids = torch.tensor([[s.last_token] for s in self.running], device=self.device)
        starts = torch.tensor([s.start for s in self.running], device=self.device)
        attention_mask = torch.arange(self.width + 1, device=self.device)[None] >= starts[:, None]  # [n, W + 1]
        cache = _SlotCache(self.keys, self.values, n, self.width)
        out = self.model(ids, attention_mask=attention_mask, cache=cache)
        self.width = cache.length
        self._accumulate_routing(slice(0, n), torch.ones(n, 1, dtype=torch.bool, device=self.device))
        self._sample_and_emit(out.logits[:, -1].float(), first_row=0)
        self.steps += 1
        self.decode_seconds += time.perf_counter() - started

    def _sample_and_emit(self, logits: torch.Tensor, first_row: int) -> None:
        """Sample one token for rows first_row.. (logits [B, V], row order), emit it, and retire finished rows."""
        rows = self.running[first_row:]
        B, V = logits.shape
        # One batched pass for what is per row but cheap to vectorise (temperature, bans, top-k/top-p filtering);
        # the only per-row work left is drawing that row's noise from its own generator.
        temperatures = torch.tensor([s.params.temperature or 1.0 for s in rows], device=self.device)
        scaled = logits / temperatures[:, None]
        bans = [
            [*s.params.banned_token_ids, *(s.params.stop_token_ids if s.generated < s.params.min_tokens else ())]
            for s in rows
        ]
        if any(bans):
            ban_mask = torch.zeros(B, V, dtype=torch.bool, device=self.device)
            for i, banned in enumerate(bans):
                ban_mask[i, banned] = True
            scaled = scaled.masked_fill(ban_mask, float("-inf"))
        tokens = scaled.argmax(-1)  # greedy rows keep this
        sampled = [i for i, s in enumerate(rows) if s.params.temperature > 0 and not s.forced]
        if sampled:
            filtered = scaled[sampled]
            groups: dict[tuple, list[int]] = {}
            for j, i in enumerate(sampled):
                groups.setdefault((rows[i].params.top_k, rows[i].params.top_p), []).append(j)
            for (top_k, top_p), members in groups.items():
                if top_k is not None or top_p is not None:
                    filtered[members] = filter_logits(filtered[members], top_k, top_p)
            # Exponential race (the Gumbel-max trick): argmax_v p_v / E_v with E_v ~ Exp(1) is a draw from p.
            noise = torch.stack(
                [torch.empty(V, device=self.device).exponential_(generator=rows[i].generator) for i in sampled]
            )
            # clamped: a zero draw must not turn a banned token's -inf into nan (which argmax would pick)
            race = filtered.log_softmax(-1) - noise.clamp_min(torch.finfo(noise.dtype).tiny).log()
            tokens[sampled] = race.argmax(-1)
        for i, seq in enumerate(rows):
            if seq.forced:
                tokens[i] = seq.forced.pop(0)
        scaled_rows = scaled
        tokens = tokens.tolist()
        want_logprobs = [s.params.logprobs for s in rows]
        logprobs: list[float] = [0.0] * len(rows)
        tops: list[list[tuple[int, float]] | None] = [None] * len(rows)
        if any(want_logprobs):
            log_probs = scaled_rows.log_softmax(-1)
            picked = log_probs.gather(1, torch.tensor(tokens, device=self.device)[:, None])[:, 0].tolist()
            for i, seq in enumerate(rows):
                if not want_logprobs[i]:
                    continue
                logprobs[i] = picked[i]
                if seq.params.top_logprobs:
                    values, indices = log_probs[i].topk(seq.params.top_logprobs)
                    tops[i] = list(zip(indices.tolist(), values.tolist()))

        finished: list[tuple[int, str]] = []
        for i, (seq, token) in enumerate(zip(rows, tokens)):
            seq.generated += 1
            seq.last_token = token
            is_stop = token in seq.params.stop_token_ids
            seq.emit(seq.index, TokenEvent(token, logprobs[i], tops[i], is_stop))
            if is_stop:
                finished.append((first_row + i, "stop"))
            elif seq.generated >= seq.params.max_tokens:
                finished.append((first_row + i, "length"))
            elif seq.cancelled:
                finished.append((first_row + i, "cancelled"))
        for row, reason in reversed(finished):  # highest row first: _remove_row moves the last row down
            self._finish(self.running[row], reason, row=row)
            self._remove_row(row)
