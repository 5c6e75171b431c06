"""What `stagelm-compress` measures for every step: size (parameters, weight bytes as stored), held-out quality
(assistant-token loss, exact match per task family, format ok), KL to the original model, and CPU decode speed.

The held-out data is the SFT stage's: the built-in validation conversations (or a JSONL file), the same prompts
`val/exact_match` is computed on during training."""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stagelm.chat import render_for_training
from stagelm.checkpoint import atomic_torch_save, stagelm_metadata
from stagelm.compress import storage
from stagelm.compress.base import Compression, stored_numel
from stagelm.data.instruct import IGNORE_INDEX, Conversation, SFTCollator, builtin_conversations, read_conversations
from stagelm.evaluation import answer_correct, format_ok, generate_replies
from stagelm.generation import generate
from stagelm.losses import token_kl
from stagelm.model import Transformer
from stagelm.tokenizer import Tokenizer


@dataclass
class HeldOut:
    """Held-out conversations: `batches` for loss and KL (SFT collation), `prompts` answered for exact match."""

    batches: list[dict[str, torch.Tensor]]
    conversations: list[Conversation]


def held_out(
    tokenizer: Tokenizer, path: str | None, n_loss: int, n_eval: int, seed: int, max_length: int = 320
) -> HeldOut:
    conversations = read_conversations(path) if path else builtin_conversations("val", max(n_loss, n_eval), seed, 1.0)
    encoded = []
    for conv in conversations[:n_loss]:
        ex = render_for_training(tokenizer, conv.messages, conv.tools)
        encoded.append((ex.input_ids[: max_length + 1], ex.loss_mask[: max_length + 1]))
    collate = SFTCollator(tokenizer.pad_id)
    batches = [collate(encoded[i : i + 32]) for i in range(0, len(encoded), 32)]
    return HeldOut(batches, conversations[:n_eval])


def calibration_batches(tokenizer: Tokenizer, n_conversations: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """Training conversations (never the held-out ones) rendered, concatenated and cut into [8, seq_len] batches
    without padding, so every position is a real token."""
    convs = builtin_conversations("train", n_conversations, seed + 1)
    ids: list[int] = []
    for conv in convs:
        ids += render_for_training(tokenizer, conv.messages, conv.tools).input_ids
    n = len(ids) // seq_len
    chunks = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    return list(chunks.split(8))


@torch.no_grad()
def quality(model: Transformer, tokenizer: Tokenizer, data: HeldOut, reference: Transformer | None) -> dict[str, float]:
    """Held-out loss on assistant tokens, exact match (overall and per family), format ok, and the mean
    per-token KL(reference || model) on the assistant tokens (0 for the reference itself)."""
    model.eval()
    loss_sum = kl_sum = 0.0
    count = 0
    for batch in data.batches:
        logits = model(batch["input_ids"], with_router_stats=False).logits.float()
        mask = batch["labels"] != IGNORE_INDEX
        loss_sum += F.cross_entropy(logits[mask], batch["labels"][mask], reduction="sum").item()
        if reference is not None:
            ref_logits = reference(batch["input_ids"], with_router_stats=False).logits.float()
            kl_sum += token_kl(ref_logits, logits, mask).sum().item()
        count += int(mask.sum())
    out = {"val/loss": loss_sum / max(count, 1), "val/kl_to_original": kl_sum / max(count, 1)}
    convs = data.conversations
    replies = generate_replies(model, tokenizer, [c.prompt for c in convs], [c.tools for c in convs], 64, 100)
    correct = [answer_correct(r, c.answer, c.reference) for r, c in zip(replies, convs)]
    out["val/exact_match"] = sum(correct) / len(correct)
    out["val/format_ok"] = sum(format_ok(r) for r in replies) / len(replies)
    by_family: dict[str, list[bool]] = defaultdict(list)
    for conv, ok in zip(convs, correct):
        if conv.family:
            by_family[conv.family].append(ok)
    for family, oks in sorted(by_family.items()):
        out[f"val/exact_match_{family}"] = sum(oks) / len(oks)
    return out


def _decode_seconds(model: Transformer, tokenizer: Tokenizer, batch_size: int, new_tokens: int) -> float:
    prompt = [tokenizer.bos_id, *tokenizer.encode("What is 12 + 7?")]
    started = time.perf_counter()
    generate(model, [prompt] * batch_size, new_tokens, greedy=True, pad_id=tokenizer.pad_id)
    return time.perf_counter() - started


@torch.no_grad()
def decode_speed(
    model: Transformer,
    tokenizer: Tokenizer,
    batch_size: int,
    new_tokens: int,
    repeats: int = 3,
    reference: Transformer | None = None,
) -> tuple[float, float | None]:
    """Greedy decode tokens/s (all rows, no stop token) of the eager model on CPU, the best of `repeats` runs;
    with a reference model, also the ratio of the two speeds: the median over rounds, each timing the two in the
    order model, reference, reference, model, so that a neighbour's load on a shared machine, or its drift within
    a round, slows both alike (the absolute figure then says little)."""
    times, ratios = [], []
    for _ in range(repeats):
        first = _decode_seconds(model, tokenizer, batch_size, new_tokens)
        if reference is None:
            times.append(first)
            continue
        ref = _decode_seconds(reference, tokenizer, batch_size, new_tokens)
        ref += _decode_seconds(reference, tokenizer, batch_size, new_tokens)
        last = _decode_seconds(model, tokenizer, batch_size, new_tokens)
        times += [first, last]
        ratios.append(ref / (first + last))
    ratio = statistics.median(ratios) if ratios else None
    return batch_size * new_tokens / min(times), ratio


def sizes(c: Compression, fp32_params: int) -> dict[str, float]:
    """Parameters (total, active per token, as stored) and weight bytes as stored against the fp32 and bf16
    sizes of the original model (`fp32_params` of it)."""
    state, _ = storage.encode_state(c.model.state_dict(), c.encodings)
    weight_bytes = storage.tensor_bytes(state)
    total, active = stored_numel(c.model, c.encodings)
    return {
        "params_total": total,
        "params_active": active,
        "weight_bytes": weight_bytes,
        "ratio_vs_fp32": weight_bytes / (4 * fp32_params),
        "ratio_vs_bf16": weight_bytes / (2 * fp32_params),
        "smaller_than_fp32": 1 - weight_bytes / (4 * fp32_params),
    }


def save_compressed(c: Compression, path: str | os.PathLike, **extra: Any) -> Path:
    """Write the model as a stagelm checkpoint holding weights only, encoded tensors packed."""
    state, described = storage.encode_state(c.model.state_dict(), c.encodings)
    meta = stagelm_metadata(
        c.config, c.tokenizer, "compress", storage={f"model.{k}": v for k, v in described.items()}, **extra
    )
    path = Path(path)
    atomic_torch_save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "stagelm": meta}, path)
    return path


def file_bytes(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths)
