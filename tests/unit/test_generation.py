"""Batched KV-cached sampling: exactness against a full forward pass, batching, seeding, filtering, stopping."""

from __future__ import annotations

import pytest
import torch

from stagelm.generation import GenerationOutput, TextStream, complete, filter_logits, generate, left_pad
from stagelm.model import Transformer
from stagelm.tokenizer import CharTokenizer
from tests.conftest import tiny_model_config

PAD = 0
PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 4, 6, 11, 12, 13], [20], [3, 3, 17, 30, 2, 9]]  # lengths 3, 9, 1, 6


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_model_config()).eval()


def full_forward_logits(model: Transformer, out: GenerationOutput) -> torch.Tensor:
    """Logits a training forward pass over prompt + completion gives for each generated token: [B, N, V]."""
    input_ids, attention_mask = out.sequences()
    P, N = out.prompt_ids.shape[1], out.tokens.shape[1]
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
    return logits[:, P - 1 : P + N - 1].float()


@pytest.mark.parametrize("prompts", [[PROMPTS[1]], PROMPTS], ids=["single", "left_padded_batch"])
def test_cached_logits_match_full_forward(model: Transformer, prompts: list[list[int]]) -> None:
    out = generate(model, prompts, 20, pad_id=PAD, seed=1, return_logits=True)
    assert model.config.is_moe_layer(1) and model.config.n_kv_heads < model.config.n_heads
    assert out.mask.all()  # no stop tokens: every step of every row is compared
    full = full_forward_logits(model, out)
    torch.testing.assert_close(out.logits, full, atol=1e-5, rtol=0)


def test_cached_logits_match_full_forward_after_rows_stop(model: Transformer) -> None:
    free = generate(model, PROMPTS, 16, pad_id=PAD, seed=3)
    stop = int(free.tokens[0, 4])  # row 0 is sure to stop at step 4 or earlier
    out = generate(model, PROMPTS, 16, pad_id=PAD, seed=3, stop_tokens=[stop], return_logits=True)
    assert out.finished[0] and not out.mask.all()
    full = full_forward_logits(model, out)
    torch.testing.assert_close(out.logits[out.mask], full[out.mask], atol=1e-5, rtol=0)


def test_greedy_batch_equals_each_prompt_alone(model: Transformer) -> None:
    batch = generate(model, PROMPTS, 12, greedy=True, pad_id=PAD)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], 12, greedy=True, pad_id=PAD)
        assert torch.equal(batch.tokens[i], alone.tokens[0]), i
        torch.testing.assert_close(batch.logprobs[i], alone.logprobs[0], atol=1e-5, rtol=0)


def test_seeding(model: Transformer) -> None:
    a = generate(model, PROMPTS, 16, pad_id=PAD, seed=7)
    b = generate(model, PROMPTS, 16, pad_id=PAD, seed=7)
    c = generate(model, PROMPTS, 16, pad_id=PAD, seed=8)
    d = generate(model, PROMPTS, 16, pad_id=PAD, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert torch.equal(a.tokens, d.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_sampling_is_not_greedy(model: Transformer) -> None:
    sampled = generate(model, PROMPTS, 16, pad_id=PAD, seed=0)
    greedy = generate(model, PROMPTS, 16, greedy=True, pad_id=PAD)
    assert not torch.equal(sampled.tokens, greedy.tokens)


@pytest.mark.parametrize("filters", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 5, "top_p": 1e-6}])
def test_narrow_filters_equal_greedy(model: Transformer, filters: dict) -> None:
    greedy = generate(model, PROMPTS, 16, greedy=True, pad_id=PAD)
    for seed in range(3):
        sampled = generate(model, PROMPTS, 16, temperature=1.5, pad_id=PAD, seed=seed, **filters)
        assert torch.equal(sampled.tokens, greedy.tokens)


def test_temperature_zero_is_greedy(model: Transformer) -> None:
    greedy = generate(model, PROMPTS, 10, greedy=True, pad_id=PAD)
    zero = generate(model, PROMPTS, 10, temperature=0.0, pad_id=PAD, seed=1)
    assert torch.equal(zero.tokens, greedy.tokens)


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1.0},
        {"temperature": 0.7, "top_k": 5},
        {"temperature": 1.3, "top_p": 0.8},
        {"greedy": True, "temperature": 0.5},
        {"temperature": 0.0},
    ],
)
def test_logprobs_are_temperature_scaled_and_unfiltered(model: Transformer, sampling: dict) -> None:
    out = generate(model, PROMPTS, 12, pad_id=PAD, seed=2, **sampling)
    temperature = sampling["temperature"] or 1.0
    full = full_forward_logits(model, out)
    expected = (full / temperature).log_softmax(-1).gather(-1, out.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs[out.mask], expected[out.mask], atol=1e-5, rtol=0)
    assert (out.logprobs[~out.mask] == 0).all()


def test_stop_tokens_stop_a_row_and_pad_after_it(model: Transformer) -> None:
    free = generate(model, PROMPTS, 16, pad_id=PAD, seed=3)
    stop = int(free.tokens[0, 4])
    out = generate(model, PROMPTS, 16, pad_id=PAD, seed=3, stop_tokens=[stop])
    for i in range(len(PROMPTS)):
        row = free.tokens[i].tolist()
        if stop in row:
            n = row.index(stop) + 1
            assert out.finished[i] and out.lengths[i] == n
            assert out.tokens[i, :n].tolist() == row[:n]  # same random draws up to the stop
            assert out.mask[i, :n].all() and not out.mask[i, n:].any()
            assert (out.tokens[i, n:] == PAD).all() and (out.logprobs[i, n:] == 0).all()
        else:
            assert not out.finished[i] and out.lengths[i] == 16
            assert torch.equal(out.tokens[i], free.tokens[i])
    assert out.finished[0]


def test_stops_early_when_every_row_finished(model: Transformer) -> None:
    steps: list[torch.Tensor] = []
    vocab = list(range(model.config.vocab_size))
    out = generate(model, PROMPTS, 30, pad_id=PAD, seed=0, stop_tokens=vocab, on_token=steps.append)
    assert len(steps) == 1  # every token is a stop token: one step, no decode pass
    assert out.finished.all() and (out.lengths == 1).all()
    assert out.tokens.shape == (len(PROMPTS), 30) and (out.tokens[:, 1:] == PAD).all()


def test_max_new_tokens_and_output_shapes(model: Transformer) -> None:
    steps: list[torch.Tensor] = []
    out = generate(model, PROMPTS, 7, pad_id=PAD, seed=0, on_token=steps.append)
    B = len(PROMPTS)
    assert out.tokens.shape == out.logprobs.shape == out.mask.shape == (B, 7)
    assert out.tokens.dtype == torch.long and out.logprobs.dtype == torch.float32 and out.mask.dtype == torch.bool
    assert out.lengths.tolist() == [7] * B and not out.finished.any()
    assert out.prompt_lengths.tolist() == [len(p) for p in PROMPTS]
    assert out.prompt_ids.shape == out.prompt_mask.shape == (B, 9)
    assert len(steps) == 7 and all(s.shape == (B,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), out.tokens)
    assert out.logits is None
    assert [len(c) for c in out.completions()] == [7] * B


def test_left_pad() -> None:
    ids, mask = left_pad([[1, 2], [3]], pad_id=9)
    assert ids.tolist() == [[1, 2], [9, 3]]
    assert mask.tolist() == [[True, True], [False, True]]


def test_filter_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)  # probs ~ .64 .24 .09 .03
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.9)).tolist() == [[False, False, False, True]]
    assert not torch.isinf(filter_logits(logits, top_k=4, top_p=1.0)).any()


def test_sampled_frequencies_follow_filtered_distribution(model: Transformer) -> None:
    n = 4000
    prompt = PROMPTS[0]
    out = generate(model, [prompt] * n, 1, temperature=0.8, top_k=4, pad_id=PAD, seed=0)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    expected = filter_logits((logits / 0.8)[None], top_k=4).softmax(-1)[0]
    observed = torch.bincount(out.tokens[:, 0], minlength=logits.shape[0]).float() / n
    assert (observed[expected == 0] == 0).all()
    torch.testing.assert_close(observed, expected, atol=0.03, rtol=0)


def test_restores_training_mode_and_works_under_inference_mode(model: Transformer) -> None:
    reference = generate(model, PROMPTS, 6, greedy=True, pad_id=PAD)
    model.train()
    with torch.inference_mode():
        out = generate(model, PROMPTS, 6, greedy=True, pad_id=PAD)
    assert model.training
    assert torch.equal(out.tokens, reference.tokens)


def test_runs_in_the_model_dtype(model: Transformer) -> None:
    model = model.to(torch.bfloat16)
    out = generate(model, PROMPTS, 6, pad_id=PAD, seed=0, return_logits=True)
    assert out.logprobs.dtype == torch.float32 and out.logits.dtype == torch.float32
    assert torch.isfinite(out.logprobs).all()


@pytest.mark.parametrize(
    ("prompts", "kwargs", "message"),
    [
        ([], {}, "prompts is empty"),
        ([[1], []], {}, "at least one token"),
        ([[1]], {"max_new_tokens": 0}, "max_new_tokens"),
        ([[1] * 60], {"max_new_tokens": 5}, "max_seq_len"),
        ([[1]], {"top_p": 0.0}, "top_p"),
        ([[1]], {"top_k": 0}, "top_k"),
        ([[1]], {"temperature": -1.0}, "temperature"),
        ([[1]], {"seed": 1, "generator": torch.Generator()}, "not both"),
    ],
)
def test_bad_arguments(model: Transformer, prompts: list, kwargs: dict, message: str) -> None:
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=message):
        generate(model, prompts, pad_id=PAD, **kwargs)


def test_complete_decodes_until_eos() -> None:
    tokenizer = CharTokenizer.train(["hello world"])
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size)).eval()
    texts = ["hello", "wor"]
    completions = complete(model, tokenizer, texts, 8, greedy=True)
    prompts = [[tokenizer.bos_id, *tokenizer.encode(t)] for t in texts]
    out = generate(model, prompts, 8, greedy=True, pad_id=tokenizer.pad_id, stop_tokens=[tokenizer.eos_id])
    for text, ids, finished in zip(completions, out.completions(), out.finished.tolist()):
        assert text == tokenizer.decode(ids[:-1] if finished else ids)
        assert tokenizer.eos_id not in tokenizer.encode(text)


class _ByteTokenizer:
    """Ids are bytes shifted by 2 (0: pad, 1: eos); decodes like byte-level BPE, with U+FFFD for cut characters."""

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 2 for i in ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_incomplete_characters_and_stops() -> None:
    written: list[str] = []
    stream = TextStream(_ByteTokenizer(), written.append, row=1, stop_tokens=[1])
    ids = [b + 2 for b in "aé€".encode()] + [1, 50]  # 1 + 2 + 3 bytes, then eos and a token after it
    for token in ids:
        stream(torch.tensor([0, token]))
    stream.flush()
    assert written == ["a", "é", "€", ""]  # each character once complete; flush has nothing left to add


# ------------------------------------------------------------------------------------------------ static cache


@pytest.fixture
def long_model() -> Transformer:
    """The unit model with room for every cache-length bucket up to 256."""
    torch.manual_seed(0)
    return Transformer(tiny_model_config(max_seq_len=256)).eval()


def test_cache_length_buckets() -> None:
    from stagelm.generation import cache_length_bucket

    assert [cache_length_bucket(n, 512) for n in (1, 64, 65, 129, 300, 512)] == [64, 64, 128, 192, 320, 512]
    assert cache_length_bucket(100, 100) == 100  # never past the model's context, never below what is needed
    assert cache_length_bucket(40, 32) == 40


@pytest.mark.parametrize("new_tokens", [5, 40, 100], ids=["bucket64", "bucket128", "bucket192"])
def test_static_cache_decode_matches_full_forward(long_model: Transformer, new_tokens: int, monkeypatch) -> None:
    # the compiled path's math, run eagerly: writes at a tensor position, attention over the whole bucket
    import stagelm.generation as generation

    monkeypatch.setattr(generation, "_compiled_decode_logits", generation._decode_logits)
    out = generate(long_model, PROMPTS, new_tokens, pad_id=PAD, seed=2, return_logits=True, compile=True)
    assert out.mask.all()
    full = full_forward_logits(long_model, out)
    torch.testing.assert_close(out.logits, full, atol=1e-5, rtol=0)
    eager = generate(long_model, PROMPTS, new_tokens, pad_id=PAD, seed=2)
    assert torch.equal(out.tokens, eager.tokens)


def test_compiled_generation_equals_eager_and_the_full_forward(model: Transformer) -> None:
    # one small shape keeps the cold compile to a few seconds; the slow tier covers more shapes
    out = generate(model, PROMPTS[:2], 6, greedy=True, pad_id=PAD, return_logits=True, compile=True)
    eager = generate(model, PROMPTS[:2], 6, greedy=True, pad_id=PAD)
    assert torch.equal(out.tokens, eager.tokens)
    full = full_forward_logits(model, out)
    torch.testing.assert_close(out.logits, full, atol=1e-5, rtol=0)
    expected = full.log_softmax(-1).gather(-1, out.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("new_tokens", [20, 100])
def test_compiled_sampling_equals_eager_in_every_bucket(long_model: Transformer, batch: int, new_tokens: int) -> None:
    model = long_model
    prompts = (PROMPTS * 2)[:batch]
    for sampling in ({"greedy": True}, {"temperature": 0.8, "top_p": 0.9, "seed": 5}):
        out = generate(model, prompts, new_tokens, pad_id=PAD, return_logits=True, compile=True, **sampling)
        eager = generate(model, prompts, new_tokens, pad_id=PAD, **sampling)
        assert torch.equal(out.tokens, eager.tokens)
        torch.testing.assert_close(out.logprobs, eager.logprobs, atol=1e-5, rtol=0)
        full = full_forward_logits(model, out)
        torch.testing.assert_close(out.logits[out.mask], full[out.mask], atol=1e-5, rtol=0)
