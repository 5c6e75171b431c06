"""Batched autoregressive sampling with a KV cache, for demos, chat, evaluation and the RL stages (PPO, GRPO).

`generate` left-pads prompts of different lengths into one batch, prefills the cache once, then decodes one token
per step for every row (one Python loop over steps, none over rows or tokens), and stops as soon as every row has
produced a stop token. Left padding plus the backbone's default positions (cumulative count of real tokens) make
each row exactly what it would be alone, and make a single full forward pass over `GenerationOutput.sequences()`
reproduce the sampler's logits at every generated position -- which is what the RL stages rely on when they
recompute log-probs with a training forward pass.

Log-probs: `logprobs[b, t]` is `log_softmax(logits / temperature)` at the sampled token, i.e. under the
temperature-scaled distribution *before* top-k / top-p filtering (with temperature taken as 1 for greedy decoding
at temperature 0). At temperature 1 this is exactly what a training forward pass computes, so PPO/GRPO importance
ratios start at 1; filtering is deliberately left out because the trained policy has no notion of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from stagelm.model import KVCache, Transformer
from stagelm.model.layers import StaticKVCache
from stagelm.tokenizer import Tokenizer


@dataclass
class GenerationOutput:
    """What `generate` returns; every tensor lives on the model's device.

    Width N is always `max_new_tokens`, even when every row stopped earlier (the tail is then padding), so batches
    from different calls stack without reshaping.
    """

    tokens: torch.Tensor  # [B, N] long: generated tokens, pad_id after a row stopped
    logprobs: torch.Tensor  # [B, N] float32: log_softmax(logits / temperature) at each token, 0 where mask is False
    mask: torch.Tensor  # [B, N] bool: True for generated tokens, up to and including the stop token
    lengths: torch.Tensor  # [B] long: generated tokens per row (= mask.sum(1)), stop token included
    prompt_lengths: torch.Tensor  # [B] long: real prompt tokens per row
    finished: torch.Tensor  # [B] bool: True if the row produced a stop token, False if max_new_tokens cut it
    prompt_ids: torch.Tensor  # [B, P] long: prompts left-padded with pad_id to the longest one
    prompt_mask: torch.Tensor  # [B, P] bool: True for real prompt tokens
    logits: torch.Tensor | None = None  # [B, N, V] float32 raw logits at each step, only with return_logits=True

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both [B, P + N]: prompt and completion in the sampler's left-padded layout.

        `model(input_ids, attention_mask).logits[:, P - 1 : P + N - 1]` are the logits the sampler drew
        `tokens` from (where `mask` is True), so sequence log-probs can be recomputed in one training forward pass.
        """
        return torch.cat([self.prompt_ids, self.tokens], 1), torch.cat([self.prompt_mask, self.mask], 1)

    def completions(self) -> list[list[int]]:
        """Each row's generated tokens as a plain list, stop token included."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, P], mask [B, P] bool), right-aligned so every row's next token goes in column P."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = True
    return ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k tokens, then outside the top-p nucleus (smallest set of most
    likely tokens whose probability reaches top_p; the most likely token always stays). logits [B, V]."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens strictly more likely than it already reach top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _decode_logits(
    model: Transformer,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    key_mask: torch.Tensor,
    cache: KVCache,
    write_position: torch.Tensor,
) -> torch.Tensor:
    """One decode step over a static cache: tokens [B], positions [B, 1], key_mask [B, max_len] -> logits [B, V]."""
    out = model(
        tokens[:, None],
        attention_mask=key_mask,
        positions=positions,
        cache=StaticKVCache(cache, write_position),
        with_router_stats=False,
    )
    return out.logits[:, -1].float()


# Compiled once per (model, batch size, cache length bucket); inductor also caches the kernels on disk, so later
# processes skip most of the cold compile.
_compiled_decode_logits = torch.compile(_decode_logits, dynamic=False, fullgraph=True)


def cache_length_bucket(needed: int, max_seq_len: int) -> int:
    """The static cache length for `needed` columns: the next multiple of 64, at most max_seq_len, so a handful of
    compiled graphs serve every prompt length. (Powers of two would mean fewer graphs, but a decode step attends
    over the whole bucket: measured at batch 16 x 128 new tokens, multiples of 64 decode 1.15x faster.)"""
    return max(needed, min(-(-needed // 64) * 64, max_seq_len))


# One graph per (batch size, bucket); Dynamo's default allows 8 per function, fewer than a long run can meet.
_RECOMPILE_LIMIT = 64


def _check_args(
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    generator: torch.Generator | None,
    max_seq_len: int,
) -> None:
    problems = []
    if not prompts:
        problems.append("prompts is empty")
    elif any(len(p) == 0 for p in prompts):
        problems.append("every prompt needs at least one token (start it with BOS)")
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        problems.append(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        problems.append(f"top_k={top_k} must be >= 1 or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        problems.append(f"top_p={top_p} must be in (0, 1] or None")
    if seed is not None and generator is not None:
        problems.append("pass seed or generator, not both")
    if prompts and max_new_tokens >= 1:
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > max_seq_len:
            problems.append(
                f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"max_seq_len={max_seq_len}"
            )
    if problems:
        raise ValueError("generate: " + "; ".join(problems))


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    stop_tokens: Sequence[int] = (),
    pad_id: int,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    return_logits: bool = False,
    compile: bool = False,
) -> GenerationOutput:
    """Sample up to `max_new_tokens` tokens after each prompt, all rows at once with a KV cache.

    prompts: token id lists of any lengths (each at least one token); they are left-padded with pad_id.
    temperature: divides the logits before sampling; 0 means greedy. greedy=True takes the argmax (temperature,
        top_k and top_p then only matter through the returned log-probs, see the module docstring).
    top_k / top_p: keep only the k most likely tokens / the smallest nucleus reaching probability top_p
        (applied in that order, after temperature); they change what is sampled, never the returned log-probs.
    stop_tokens: a row stops after producing one of these (it is kept, with mask True); later columns are pad_id.
    seed / generator: seed makes a private generator on the model's device; generator is used as is (it must live
        on the model's device); with neither, torch's global RNG is used.
    on_token: called after every step with that step's tokens [B] (pad_id for rows already stopped).
    return_logits: also return the raw float32 logits of every step, [B, N, V] (memory grows with the vocabulary).
    compile: run each decode step as one torch.compile'd graph over a static cache (same tokens, log-probs within
        float rounding). Pays off over many calls (the RL stages' rollouts): the first call per batch size and
        cache-length bucket compiles (tens of seconds cold, a few seconds with inductor's on-disk cache).

    The model runs in eval mode (restored afterwards) in its own dtype and device, under torch.no_grad (inference
    mode is deliberately avoided: RL stages feed the returned tokens to a training forward pass).
    """
    config = model.config
    _check_args(prompts, max_new_tokens, temperature, top_k, top_p, seed, generator, config.max_seq_len)
    device, dtype = _model_device_dtype(model)
    greedy = greedy or temperature == 0
    scale = temperature if temperature > 0 else 1.0
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    B = len(prompts)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    P = prompt_ids.shape[1]
    # The last sampled token is never fed back, hence the -1.
    cache_len = P + max_new_tokens - 1
    if compile:
        cache_len = cache_length_bucket(cache_len, config.max_seq_len)
        write_position = torch.zeros(1, dtype=torch.long, device=device)
    cache = KVCache(config, B, cache_len, device, dtype)
    # One attention mask for the whole run: prompt columns, then a column per generated token, switched on
    # as that token is fed; a stopped row's padding stays masked, like right padding in a full forward pass.
    # (A static cache's unwritten columns stay masked too.)
    width = max(P + max_new_tokens, cache_len)
    attention_mask = torch.cat([prompt_mask, torch.zeros(B, width - P, dtype=torch.bool, device=device)], 1)

    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    mask = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    all_logits = [] if return_logits else None
    stop = torch.as_tensor(list(stop_tokens), dtype=torch.long, device=device)
    pad = torch.tensor(pad_id, dtype=torch.long, device=device)

    was_training = model.training
    model.eval()  # dropout off, whatever mode the caller (e.g. a Lightning training step) left the model in
    try:
        # Prefill: one pass over all prompts; only the last position's logits are needed, so skip the LM head on
        # the rest (for long prompts and large vocabularies the full [B, P, V] logits would dominate memory).
        # With equal-length prompts there is no padding: no mask lets attention take its plain causal fast path.
        uniform = len({len(p) for p in prompts}) == 1
        prefill_mask = None if uniform else prompt_mask
        out = model(
            prompt_ids,
            attention_mask=prefill_mask,
            cache=cache,
            return_hidden=True,
            compute_logits=False,
            with_router_stats=False,
        )
        logits = model.lm_head(out.hidden[:, -1]).float()  # [B, V]
        # the position of each row's next token is its count of real tokens so far
        positions = prompt_mask.sum(1, keepdim=True)  # [B, 1]
        for t in range(max_new_tokens):
            if all_logits is not None:
                all_logits.append(logits)
            scaled = logits / scale if scale != 1.0 else logits
            if greedy:
                # log_softmax at the argmax is the max logit minus the log normaliser: no [B, V] gather needed
                top, next_tokens = scaled.max(-1)
                token_logprobs = top - scaled.logsumexp(-1)
            else:
                probs = filter_logits(scaled, top_k, top_p).softmax(-1)
                next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                token_logprobs = scaled.log_softmax(-1).gather(-1, next_tokens[:, None]).squeeze(1)

            active = ~finished  # rows still generating at this step
            next_tokens = torch.where(active, next_tokens, pad)
            tokens[:, t] = next_tokens
            logprobs[:, t] = torch.where(active, token_logprobs, 0.0)
            mask[:, t] = active
            if stop.numel():
                finished = finished | (active & torch.isin(next_tokens, stop))
            if on_token is not None:
                on_token(next_tokens)
            if t == max_new_tokens - 1 or bool(finished.all()):
                break
            # Decode: feed this step's tokens; the attention mask covers cached + new columns.
            attention_mask[:, P + t] = active
            if compile:
                write_position.fill_(P + t)
                key_mask = attention_mask[:, :cache_len]
                # after the first step compiled this shape, only the guards that tell graphs apart need checking
                # (a full guard check over every parameter costs more than a small model's decode step)
                stance = torch.compiler.set_stance(skip_guard_eval_unsafe=t > 0)
                with stance, torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                    logits = _compiled_decode_logits(model, next_tokens, positions + t, key_mask, cache, write_position)
                continue
            out = model(
                next_tokens[:, None],
                attention_mask=attention_mask[:, : P + t + 1],
                positions=positions + t,
                cache=cache,
                with_router_stats=False,
            )
            logits = out.logits[:, -1].float()
    finally:
        model.train(was_training)

    logits_out = None
    if all_logits is not None:
        logits_out = torch.zeros((B, max_new_tokens, config.vocab_size), dtype=torch.float32, device=device)
        logits_out[:, : len(all_logits)] = torch.stack(all_logits, 1)
    return GenerationOutput(
        tokens=tokens,
        logprobs=logprobs,
        mask=mask,
        lengths=mask.sum(1),
        prompt_lengths=prompt_mask.sum(1),
        finished=finished,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        logits=logits_out,
    )


def complete(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: list[str],
    max_new_tokens: int,
    **sampling,
) -> list[str]:
    """Encode each text after BOS, generate, and decode each completion up to (not including) EOS.

    `sampling` takes generate's keyword arguments (temperature, top_k, top_p, greedy, seed, generator, on_token);
    extra stop_tokens are added to EOS, and a stop token other than EOS is kept in the text. pad_id defaults to
    the tokenizer's.
    """
    stop_tokens = (tokenizer.eos_id, *sampling.pop("stop_tokens", ()))
    sampling.setdefault("pad_id", tokenizer.pad_id)
    prompts = [[tokenizer.bos_id, *tokenizer.encode(text)] for text in texts]
    out = generate(model, prompts, max_new_tokens, stop_tokens=stop_tokens, **sampling)
    texts_out = []
    for ids in out.completions():
        if ids and ids[-1] == tokenizer.eos_id:
            ids = ids[:-1]
        texts_out.append(tokenizer.decode(ids))
    return texts_out


class TextStream:
    """An `on_token` hook that writes one row's text as it is generated (the CLI's and chat's live output).

    It decodes the whole completion so far and writes only what is new, so tokens that decode differently in
    context (byte-level BPE pieces of one UTF-8 character) come out right; text ending in an incomplete character
    is held back until the character is complete. Stop tokens and anything after them are not written.
    """

    def __init__(
        self, tokenizer: Tokenizer, write: Callable[[str], object], row: int = 0, stop_tokens: Sequence[int] = ()
    ) -> None:
        self.tokenizer, self.write, self.row = tokenizer, write, row
        self.stop_tokens = set(stop_tokens)
        self.ids: list[int] = []
        self.written = ""
        self.done = False

    def __call__(self, tokens: torch.Tensor) -> None:
        if self.done:
            return
        token = int(tokens[self.row])
        if token in self.stop_tokens:
            self.done = True
            return
        self.ids.append(token)
        self._emit(final=False)

    def flush(self) -> None:
        """Write whatever was held back (an incomplete character at the very end): call once generation ends."""
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.written):
            self.write(text[len(self.written) :])
        self.written = text
