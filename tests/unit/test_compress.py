"""Compression steps on small hand-made models, with numbers worked out by hand: what each pruning step removes,
SVD rank selection, quantization error bounds and packing, every expert quantized, fake quantization for
quantization-aware training, and the distillation loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn.utils import parametrize

from stagelm.compress import storage
from stagelm.compress.activation import ActivationPrune
from stagelm.compress.base import Calibration, Compression, calibrate, stored_numel
from stagelm.compress.experts import ExpertPrune
from stagelm.compress.lowrank import LowRank, lowrank_factors, select_rank
from stagelm.compress.magnitude import MagnitudePrune
from stagelm.compress.quantize import Quantize, fake_quantize, gptq_int4, latent_key
from stagelm.compress.redundancy import RedundancyPrune
from stagelm.losses import distill_kl
from stagelm.model import Transformer
from stagelm.tokenizer import CharTokenizer
from tests.conftest import tiny_model_config


def hand_model(**overrides) -> Transformer:
    """Layer 0 dense (4 MLP channels), layer 1 MoE (3 experts of 8 channels, top-1, shared expert); 4 heads of
    dim 8 on 2 KV heads. Random weights, so every channel and head is alive unless a test kills it."""
    shape = dict(vocab_size=16, d_model=8, head_dim=8, d_ff=8, d_ff_dense=4, n_experts=3, top_k=1, max_seq_len=32)
    torch.manual_seed(0)
    return Transformer(tiny_model_config(**{**shape, "init_std": 0.3, **overrides})).eval()


def tokens(n: int = 4, length: int = 16, vocab: int = 16) -> list[torch.Tensor]:
    return [torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))]


def compression(model: Transformer) -> Compression:
    return Compression(model, CharTokenizer("abc"))


def logits(model: Transformer, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(batches[0]).logits


# --- storage: quantization and packing -------------------------------------------------------------------------


def test_int8_codes_and_scale_by_hand() -> None:
    w = torch.tensor([[2.54, -1.0, 0.3], [0.0, 0.5, -0.127]])
    e = storage.encode_int8(w)
    # row 0: scale 2.54 / 127 = 0.02, codes 127, -50, 15; row 1: scale 0.5 / 127, codes 0, 127, round(-32.258) = -32
    assert torch.allclose(e.tensors["scale"].squeeze(-1), torch.tensor([0.02, 0.5 / 127]))
    assert e.tensors["codes"].tolist() == [[127, -50, 15], [0, 127, -32]]
    assert e.tensors["codes"].dtype == torch.int8
    assert torch.allclose(storage.decode(e), torch.tensor([[2.54, -1.0, 0.3], [0.0, 0.5, -32 * 0.5 / 127]]))


def test_int4_codes_packing_by_hand() -> None:
    w = torch.tensor([[0.7, -0.35, 0.1, 0.0]])
    e = storage.encode_int4(w, group=4)
    scale = e.tensors["scale"].float().item()
    # 0.7 / 7 = 0.1 is not an fp16 number; the scale rounds *up* to the next one, so 0.7 / scale stays <= 7
    assert scale == pytest.approx(0.10003662109375) and scale >= 0.1
    # codes 7, -3, 1, 0 stored +8 as 15, 5, 9, 8, two per byte, the even index in the low nibble
    assert e.tensors["packed"].tolist() == [[15 | 5 << 4, 9 | 8 << 4]]
    assert torch.allclose(storage.decode(e), torch.tensor([[7, -3, 1, 0]]) * scale)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantization_error_is_at_most_half_a_step(kind: str) -> None:
    w = torch.randn(3, 64, 40, generator=torch.Generator().manual_seed(0))  # an expert stack [E, in, out]
    e = storage.encode_int8(w, in_dim=1) if kind == "int8" else storage.encode_int4(w, group=16, in_dim=1)
    err = (storage.decode(e) - w).abs()
    step = e.tensors["scale"].float()
    if kind == "int8":  # one scale per (expert, output channel): [E, out, 1] -> error bound [E, in, out]
        bound = step.squeeze(-1)[:, None, :].expand_as(w)
    else:  # one scale per (expert, output, group of 16 inputs): [E, out, G, 1]
        bound = step.squeeze(-1).repeat_interleave(16, dim=-1).transpose(1, 2)
    assert (err <= bound / 2 + 1e-6).all()
    # and the error is not trivially zero: quantization really happened
    assert err.max() > 0
    # packed for real: 1 byte per weight + an fp32 scale per output channel, or half a byte + an fp16 per 16
    expected = w.numel() + 3 * 40 * 4 if kind == "int8" else w.numel() // 2 + w.numel() // 16 * 2
    assert e.nbytes() == expected


def test_gptq_on_uncorrelated_inputs_is_round_to_nearest() -> None:
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    gram = torch.diag(torch.rand(32, generator=torch.Generator().manual_seed(1)) + 0.5)
    values, scale = gptq_int4(w, gram, group=16)
    rtn = storage.encode_int4(w, group=16)
    assert torch.equal(scale, rtn.tensors["scale"])
    assert torch.allclose(values, storage.decode(rtn), atol=1e-6)


def test_gptq_compensates_rounding_on_correlated_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    # inputs with strongly correlated features, as a layer's activations are
    x = torch.randn(2048, 8, generator=g) @ torch.randn(8, 32, generator=g) + 0.1 * torch.randn(2048, 32, generator=g)
    w = torch.randn(16, 32, generator=g)
    values, scale = gptq_int4(w, x.t() @ x / len(x), group=16)
    encoded = storage.encode_int4(values, group=16, scale=scale)
    assert torch.allclose(storage.decode(encoded), values, atol=1e-6)  # stored exactly, on the int4 grid
    rtn = storage.decode(storage.encode_int4(w, group=16))
    out_error = lambda q: ((x @ (w - q).t()) ** 2).mean().item()  # noqa: E731
    assert out_error(values) < 0.5 * out_error(rtn)  # the outputs, not the weights, are what GPTQ keeps


def test_gptq_quantizes_every_expert_on_its_own_tokens_and_tracks_the_model_better() -> None:
    batches = tokens(n=8, length=32)
    errors = {}
    for method in ("rtn", "gptq"):
        model = hand_model(d_model=32, d_ff=32)
        reference = logits(model, batches)
        c = Quantize(bits=4, group=16, method=method)(compression(model), calibrate(model, batches))
        for name in ("layers.1.feed_forward.gate_up_proj", "layers.1.feed_forward.down_proj"):
            assert c.encodings[name].kind == "int4"
            assert torch.equal(storage.decode(c.encodings[name]), model.state_dict()[name])
        errors[method] = ((logits(model, batches) - reference) ** 2).mean().item()
    assert errors["gptq"] < errors["rtn"]
    with pytest.raises(ValueError, match="calibration"):
        Quantize(bits=4, method="gptq")(compression(hand_model()), None)


def test_sparse_storage_is_mask_plus_values() -> None:
    w = torch.zeros(8, 8)
    w[torch.arange(8), torch.arange(8)] = torch.arange(1.0, 9.0)
    w[0, 7] = -3.0
    e = storage.encode_sparse(w)
    assert e.nbytes() == 64 // 8 + 9 * 4  # 1 bit per entry, 4 bytes per nonzero
    assert torch.equal(storage.decode(e), w)


def test_encoded_state_round_trips() -> None:
    a, b = torch.randn(6, 2), torch.randn(2, 5)
    lowrank = storage.encode_lowrank(a, b)
    lowrank.parts["a"] = storage.encode_int8(a)
    encodings = {"x.weight": storage.encode_int4(torch.randn(4, 32)), "y.weight": lowrank}
    plain = {"x.weight": torch.zeros(4, 32), "y.weight": torch.zeros(6, 5), "z": torch.ones(3)}
    saved, described = storage.encode_state(plain, encodings)
    assert "x.weight" not in saved and "x.weight#packed" in saved and "y.weight#a#codes" in saved
    back = storage.decode_state(saved, described)
    assert set(back) == set(plain)
    assert torch.equal(back["x.weight"], storage.decode(encodings["x.weight"]))
    assert torch.allclose(back["y.weight"], storage.decode(lowrank))


def test_every_expert_is_quantized_router_norms_embeddings_are_not() -> None:
    model = hand_model(d_model=32, d_ff=32)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    c = Quantize(bits=4, group=16)(compression(model))
    moe = "layers.1.feed_forward"
    for name in (f"{moe}.gate_up_proj", f"{moe}.down_proj"):
        e = c.encodings[name]
        assert e.kind == "int4" and e.tensors["packed"].dtype == torch.uint8
        assert e.tensors["scale"].shape[0] == 3  # scales of their own for each of the 3 experts
        for expert in range(3):
            w, q = original[name][expert], model.state_dict()[name][expert]
            assert not torch.equal(w, q), f"expert {expert} of {name} was left unquantized"
            assert (w - q).abs().max() <= w.abs().max() / 7 / 2 + 1e-3
    for name in ("embed_tokens.weight", f"{moe}.router.weight", "norm.weight", "layers.0.input_layernorm.weight"):
        assert name not in c.encodings and torch.equal(model.state_dict()[name], original[name])
    assert c.encodings["lm_head.weight"].kind == "int8"


# --- fake quantization (quantization-aware distillation) ---------------------------------------------------------


def test_fake_quant_weight_by_hand_and_gradient_straight_through() -> None:
    model = hand_model(d_model=32, d_ff=32)
    q_proj = model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.weight.zero_()
        q_proj.weight[0, :4] = torch.tensor([0.7, -0.35, 0.1, 0.0])
    fake_quantize(model, bits=4, group=16)
    # the group's amax 0.7 / 7 rounds up to the fp16 scale 0.10003662109375: codes 7, -3, 1, 0
    scale = 0.10003662109375
    assert q_proj.weight[0, :4].tolist() == [7 * scale, -3 * scale, 1 * scale, 0.0]
    latent = q_proj.parametrizations.weight.original
    assert latent[0, :4].tolist() == pytest.approx([0.7, -0.35, 0.1, 0.0])  # the parameter keeps its own value
    # straight through: d(sum(c * Q(w))) / dw = c, the rounding's zero derivative ignored
    c = torch.randn(q_proj.weight.shape)
    (q_proj.weight * c).sum().backward()
    assert torch.equal(latent.grad, c)
    experts = model.layers[1].feed_forward
    (experts.down_proj * 2.0).sum().backward()  # a routed expert's 3-D weight [E, in, out] too
    assert torch.equal(experts.parametrizations.down_proj.original.grad, torch.full((3, 32, 32), 2.0))


def test_fake_quant_forward_is_exactly_the_stored_model() -> None:
    """On every tensor round-to-nearest `Quantize` quantizes, and only those: int4 weights and experts, the LM
    head int8, embeddings bf16; the router and norms untouched. The fake-quantized model's logits are the
    quantized model's, bit for bit."""
    model = hand_model(d_model=32, d_ff=32)
    quantized = Quantize(bits=4, group=16, embeddings="bf16")(compression(copy.deepcopy(model)))
    names = fake_quantize(model, bits=4, group=16, embeddings="bf16")
    assert sorted(names) == sorted(quantized.encodings)
    moe = "layers.1.feed_forward"
    assert f"{moe}.gate_up_proj" in names and f"{moe}.router.weight" not in names and "norm.weight" not in names
    for name in names:
        module, _, attr = name.rpartition(".")
        value = getattr(model.get_submodule(module), attr)
        assert torch.equal(value, storage.decode(quantized.encodings[name])), name
    batches = tokens()
    assert torch.equal(logits(model, batches), logits(quantized.model, batches))
    # the latent weights under their plain keys are a plain model's state dict
    latent = {latent_key(k): v for k, v in model.state_dict().items()}
    assert set(latent) == set(hand_model(d_model=32, d_ff=32).state_dict())
    assert latent_key("lm_head.parametrizations.weight.original") == "lm_head.weight"
    assert latent_key(f"model.{moe}.parametrizations.down_proj.original") == f"model.{moe}.down_proj"


def test_quantization_aware_training_beats_rounding_the_original() -> None:
    """A few steps of distillation through fake int4 weights: the latent weights, quantized by round to nearest,
    track the teacher better than the original weights quantized the same way."""
    teacher = hand_model(d_model=32, d_ff=32)
    batches = tokens(n=8, length=16)
    target = torch.log_softmax(logits(teacher, batches), -1)

    def kl_to_teacher(m: Transformer) -> float:
        student = torch.log_softmax(logits(m, batches), -1)
        return torch.nn.functional.kl_div(student, target, log_target=True, reduction="batchmean").item()

    rounded = kl_to_teacher(Quantize(bits=4, group=16)(compression(copy.deepcopy(teacher))).model)
    student = copy.deepcopy(teacher).train()
    fake_quantize(student, bits=4, group=16)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(30):
        out = torch.log_softmax(student(batches[0]).logits, -1)
        loss = torch.nn.functional.kl_div(out, target, log_target=True, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for module in [m for m in student.modules() if parametrize.is_parametrized(m)]:
        for attr in list(module.parametrizations):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)  # back to the latent
    trained = kl_to_teacher(Quantize(bits=4, group=16)(compression(student.eval())).model)
    assert trained < 0.5 * rounded, (trained, rounded)


# --- pruning: what each step removes -----------------------------------------------------------------------------


def test_activation_pruning_removes_dead_channels_and_heads_exactly() -> None:
    model = hand_model()
    with torch.no_grad():
        model.layers[0].feed_forward.down_proj.weight[:, 1] = 0  # dense channels 1 and 3 add nothing
        model.layers[0].feed_forward.down_proj.weight[:, 3] = 0
        for layer in model.layers:  # heads 1 (KV group 0) and 2 (KV group 1) write nothing
            layer.self_attn.o_proj.weight[:, 8:24] = 0
    keep_gate = model.layers[0].feed_forward.gate_proj.weight[[0, 2]].clone()
    keep_q = model.layers[0].self_attn.q_proj.weight[torch.cat([torch.arange(0, 8), torch.arange(24, 32)])].clone()
    batches = tokens()
    before = logits(model, batches)
    c = ActivationPrune(mlp_keep=0.5, expert_keep=1.0, heads_keep=0.5)(compression(model), calibrate(model, batches))
    cfg = c.model.config
    assert (cfg.d_ff_dense, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads) == (2, 8, 2, 2)
    assert torch.equal(c.model.layers[0].feed_forward.gate_proj.weight, keep_gate)
    assert torch.equal(c.model.layers[0].self_attn.q_proj.weight, keep_q)  # heads 0 and 3: one per KV group
    assert torch.allclose(logits(c.model, batches), before, atol=1e-5)
    assert c.model.num_params() == model.num_params() - 3 * 8 * 2 - 2 * 2 * 8 * 8 * 2


def test_activation_pruning_scores_expert_channels_on_their_tokens() -> None:
    model = hand_model()
    with torch.no_grad():
        # channels 0-3 of every routed expert and of the shared expert add nothing
        model.layers[1].feed_forward.down_proj[:, :4] = 0
        model.layers[1].feed_forward.shared_expert.down_proj.weight[:, :4] = 0
    batches = tokens()
    before = logits(model, batches)
    c = ActivationPrune(expert_keep=0.5)(compression(model), calibrate(model, batches))
    assert c.model.config.d_ff == 4
    kept = c.model.layers[1].feed_forward.gate_up_proj  # [E, D, 2F]: gate channels, then up channels
    old = model.layers[1].feed_forward.gate_up_proj
    assert torch.equal(kept[:, :, :4], old[:, :, 4:8]) and torch.equal(kept[:, :, 4:], old[:, :, 12:16])
    assert torch.allclose(logits(c.model, batches), before, atol=1e-5)


def test_expert_pruning_drops_the_expert_no_token_needs() -> None:
    model = hand_model()
    with torch.no_grad():
        router = model.layers[1].feed_forward.router.weight
        router[1] = -router[0]  # max(logit 0, logit 1) >= 0 = logit 2: expert 2 is never chosen
        router[2] = 0
    batches = tokens()
    before = logits(model, batches)
    c = ExpertPrune(keep=2)(compression(model), calibrate(model, batches))
    assert c.model.config.n_experts == 2
    moe = c.model.layers[1].feed_forward
    assert torch.equal(moe.gate_up_proj, model.layers[1].feed_forward.gate_up_proj[:2])
    assert torch.equal(moe.router.weight, model.layers[1].feed_forward.router.weight[:2])  # the router adjusts
    assert moe.shared_expert is not None
    assert torch.allclose(logits(c.model, batches), before, atol=1e-5)


def test_expert_pruning_scores_with_every_token_through_every_expert() -> None:
    """Five tokens choose experts 0, 0, 2, 2, 1. Expert 1 is chosen least, but on token 4 it outputs 5 where the
    others output 1; expert 2 outputs what expert 0 would on its own tokens 2 and 3 (their next choice). Counting
    routing alone would drop expert 1; scoring every expert on every token drops expert 2, at no cost."""
    logits = torch.tensor([[3.0, 1, 2], [3, 1, 2], [1, 0, 3], [1, 0, 3], [0, 3, 1]])
    outputs = torch.ones(3, 5, 2)
    outputs[1] = 5.0
    outputs[2, :2] = 1.5  # where expert 0 is chosen, 2 would differ: dropping 0 costs something
    assert ExpertPrune.choose_from("sigmoid", 1, logits, outputs, 2) == [0, 1]
    # and on a real MoE layer: an expert never chosen is the one to go, whatever its weights
    model = hand_model()
    with torch.no_grad():
        router = model.layers[1].feed_forward.router.weight
        router[1] = -router[0]
        router[2] = 0
    x = calibrate(model, tokens()).ffn_inputs[1]
    assert ExpertPrune.choose(model.layers[1].feed_forward, x, 2) == [0, 1]


def test_redundancy_pruning_merges_a_duplicate_channel() -> None:
    model = hand_model()
    with torch.no_grad():
        mlp = model.layers[0].feed_forward
        mlp.gate_proj.weight[1] = mlp.gate_proj.weight[0]
        mlp.up_proj.weight[1] = 2 * mlp.up_proj.weight[0]  # channel 1 = 2 x channel 0, exactly
    batches = tokens()
    before = logits(model, batches)
    c = RedundancyPrune(fraction=0.25, min_similarity=0.999)(compression(model), calibrate(model, batches))
    assert c.model.config.d_ff_dense == 3 and c.model.config.d_ff == 8  # no expert channel is a duplicate
    # channel 0 (the weaker) was merged into channel 1 with alpha 1/2
    new_down = c.model.layers[0].feed_forward.down_proj.weight
    old_down = model.layers[0].feed_forward.down_proj.weight
    assert torch.allclose(new_down[:, 0], old_down[:, 1] + 0.5 * old_down[:, 0])
    assert torch.allclose(logits(c.model, batches), before, atol=1e-5)


def test_redundancy_plan_by_hand() -> None:
    a, b = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 0.0])
    h = torch.stack([a, -3 * a, b], dim=1)  # [N=3, F=3]: channel 1 = -3 x channel 0
    assert RedundancyPrune.plan(h, 2, 0.9) == [(0, 1, pytest.approx(-1 / 3))]


def test_magnitude_pruning_by_hand_and_stored_sparse() -> None:
    w = torch.tensor([[0.1, -0.5], [0.3, 0.05]])
    assert torch.equal(MagnitudePrune.prune(w, 0.5), torch.tensor([[0.0, -0.5], [0.3, 0.0]]))
    stack = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[-4.0, 3.0], [-2.0, 1.0]]])  # per expert: 2 smallest each
    assert MagnitudePrune.prune(stack, 0.5).tolist() == [[[0, 0], [3, 4]], [[-4, 3], [0, 0]]]
    model = hand_model()
    c = MagnitudePrune(sparsity=0.5)(compression(model))
    e = c.encodings["layers.1.feed_forward.gate_up_proj"]
    assert e.kind == "sparse" and e.tensors["values"].numel() == 3 * 8 * 16 // 2
    total, _ = stored_numel(c.model, c.encodings)
    assert total < model.num_params() * 0.6


# --- low rank ----------------------------------------------------------------------------------------------------


def test_rank_selection_by_hand() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squared: 9, 4, 1 of 14 -> 0.643, 0.929, 1.0
    assert select_rank(s, 0.6) == 1
    assert select_rank(s, 0.9) == 2
    assert select_rank(s, 0.95) == 3
    assert select_rank(s, 1.0) == 3


def test_lowrank_is_kept_only_where_it_saves_parameters() -> None:
    torch.manual_seed(0)
    low = torch.randn(8, 2) @ torch.randn(2, 8)  # rank 2: 2 * (8 + 8) = 32 < 64 parameters
    a, b, r = lowrank_factors(low, None, 0.999)
    assert r == 2 and torch.allclose(a @ b, low, atol=1e-4)
    model = hand_model(n_heads=1, n_kv_heads=1)
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.weight.copy_(low)
        model.layers[0].self_attn.k_proj.weight.copy_(torch.eye(8))  # full rank: no saving possible
    batches = tokens()
    c = LowRank(energy=0.999, whiten=True, max_param_ratio=0.8)(compression(model), calibrate(model, batches))
    assert c.encodings["layers.0.self_attn.q_proj.weight"].meta["rank"] == 2
    assert "layers.0.self_attn.k_proj.weight" not in c.encodings
    assert torch.allclose(c.model.layers[0].self_attn.q_proj.weight, low, atol=1e-3)


def test_whitening_weighs_the_inputs_that_occur() -> None:
    """Inputs only ever use the first coordinate: whitened SVD keeps the direction that acts on it, plain SVD
    keeps the bigger singular direction that never sees an input."""
    w = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    gram = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    a, b, r = lowrank_factors(w, gram, 0.99)
    x = torch.tensor([1.0, 0.0])
    assert r == 1 and torch.allclose((a @ b) @ x, w @ x, atol=1e-3)
    a0, b0, _ = lowrank_factors(w, None, 0.9)
    assert ((a0 @ b0) @ x).norm() < 1e-6


# --- distillation --------------------------------------------------------------------------------------------------


def test_distill_kl_by_hand_and_zero_for_equal_models() -> None:
    teacher = torch.tensor([[[0.0, 0.0]]])  # p = (1/2, 1/2)
    student = torch.tensor([[[math.log(3.0), 0.0]]])  # q = (3/4, 1/4)
    mask = torch.ones(1, 1, dtype=torch.bool)
    forward = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p || q) = 0.143841
    reverse = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(q || p) = 0.130812
    assert distill_kl(student, teacher, mask, "forward").item() == pytest.approx(forward, abs=1e-6)
    assert distill_kl(student, teacher, mask, "reverse").item() == pytest.approx(reverse, abs=1e-6)
    model = hand_model()
    ids = tokens()[0]
    out = model(ids).logits
    full = torch.ones(ids.shape, dtype=torch.bool)
    assert distill_kl(out, out.clone(), full, "forward").item() == pytest.approx(0.0, abs=1e-7)
    assert distill_kl(out, out.clone(), full, "reverse", temperature=2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_structured_steps_refuse_to_run_after_storage_was_chosen() -> None:
    model = hand_model()
    c = Quantize(bits=8)(compression(model))
    calib = Calibration({}, {}, {}, 0)
    with pytest.raises(ValueError, match="before the steps that choose storage"):
        ExpertPrune(keep=2)(c, calib)
