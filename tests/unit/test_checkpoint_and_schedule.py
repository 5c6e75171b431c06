"""Checkpoint writing/loading (atomic, clear mismatch errors) and the learning-rate schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import stagelm
from stagelm.checkpoint import atomic_torch_save, load_checkpoint, stagelm_metadata
from stagelm.errors import CheckpointError
from stagelm.model import ModelConfig, Transformer
from stagelm.stages.base import parameter_groups, warmup_cosine
from stagelm.tokenizer import CharTokenizer

CFG = ModelConfig(
    vocab_size=30, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, d_ff_dense=64, n_experts=4, moe_every=2
)


def _write(path: Path, model: Transformer, config: ModelConfig) -> None:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    tok = CharTokenizer.train(["abcdefghijklmnopqrs"], include_ascii=False)
    atomic_torch_save({"state_dict": state, "stagelm": stagelm_metadata(config, tok, "pretrain")}, path)


def test_round_trip_through_stagelm_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Transformer(CFG)
    _write(tmp_path / "m.ckpt", model, CFG)
    assert [p.name for p in tmp_path.iterdir()] == ["m.ckpt"]  # no temporary file left behind
    loaded, tok = stagelm.load(str(tmp_path / "m.ckpt"))
    x = torch.randint(0, 30, (2, 7))
    assert torch.equal(loaded(x).logits, model.eval()(x).logits)
    assert tok.encode("abc") == [11, 12, 13]


def test_mismatched_weights_report_expected_vs_found(tmp_path: Path) -> None:
    model = Transformer(CFG)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["model.embed_tokens.weight"] = torch.zeros(31, 32)
    tok = CharTokenizer.train(["ab"])
    atomic_torch_save({"state_dict": state, "stagelm": stagelm_metadata(CFG, tok, "pretrain")}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight: expected \(30, 32\), found \(31, 32\)"):
        load_checkpoint(tmp_path / "x.ckpt")


def test_missing_or_foreign_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.ckpt")
    torch.save({"weights": 1}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not a stagelm checkpoint"):
        load_checkpoint(tmp_path / "foreign.ckpt")


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"v": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"v": Unpicklable()}, target)
    assert torch.load(target)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_warmup_then_cosine_to_the_floor() -> None:
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_and_embeddings() -> None:
    model = Transformer(CFG)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] or "embed" in names[id(p)] for p in no_decay["params"])
    assert any("embed_tokens" in names[id(p)] for p in no_decay["params"])
    assert any("gate_up_proj" in names[id(p)] for p in decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
