"""Hugging Face export: the exported Llama4ForCausalLM must give stagelm's logits (fp32, 1e-4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from stagelm.checkpoint import atomic_torch_save, stagelm_metadata  # noqa: E402
from stagelm.export.hf import export_hf  # noqa: E402
from stagelm.model import Transformer  # noqa: E402
from stagelm.tokenizer import BPETokenizer, CharTokenizer, Tokenizer  # noqa: E402
from tests.conftest import tiny_model_config  # noqa: E402

pytestmark = pytest.mark.export

TOL = 1e-4


def char_tokenizer() -> CharTokenizer:
    return CharTokenizer("abcdefghijklmnopqrstuvwxyz0123456789")  # 11 specials + 36 = 47 ids


def random_model(tok: Tokenizer, **overrides) -> Transformer:
    """A small model with every weight randomised, norms and router included, so routing is not trivial."""
    # four layers (two MoE), narrower experts than the dense MLP, a non-default RoPE base
    values = dict(n_layers=4, d_ff=24, d_ff_dense=40, top_k=1, rope_theta=500.0)
    values.update(overrides)
    model = Transformer(tiny_model_config(vocab_size=tok.vocab_size, **values))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "router" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def max_logit_diff(model: Transformer, out_dir: Path, seq_len: int = 19) -> float:
    hf = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Llama4ForCausalLM"
    ids = torch.randint(0, model.config.vocab_size, (3, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids).logits
    for layer, stats in ours.router_stats.items():  # the comparison is only meaningful if routing varies
        assert (stats.expert_load > 0).sum() >= 2, f"layer {layer} routes every token to one expert"
    assert theirs.shape == ours.logits.shape
    return (theirs - ours.logits).abs().max().item()


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_model_matches(tmp_path, top_k):
    tok = char_tokenizer()
    model = random_model(tok, top_k=top_k)
    out = export_hf(model, tok, tmp_path / "hf")
    assert (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama4_text"
    assert config["moe_layers"] == [1, 3]
    assert config["no_rope_layers"] == [1, 1, 1, 1]
    assert config["attention_chunk_size"] is None
    assert config["use_qk_norm"] is False and config["attn_temperature_tuning"] is False
    assert config["rope_parameters"]["rope_theta"] == 500.0
    assert config["num_experts_per_tok"] == top_k and config["num_local_experts"] == 4
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    assert json.loads((out / "stagelm_tokenizer.json").read_text()) == tok.to_dict()
    assert not (out / "tokenizer.json").exists()  # char tokenizers have no HF equivalent
    assert max_logit_diff(model, out) <= TOL


def test_dense_model_matches(tmp_path):
    tok = char_tokenizer()
    model = random_model(tok, n_experts=0, router="softmax")  # the router kind is irrelevant without MoE layers
    out = export_hf(model, tok, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["moe_layers"] == []
    assert max_logit_diff(model, out) <= TOL


def test_no_shared_expert_tied_embeddings_matches(tmp_path):
    tok = char_tokenizer()
    model = random_model(tok, top_k=2, shared_expert=False, tie_embeddings=True, moe_every=1)
    out = export_hf(model, tok, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert max_logit_diff(model, out) <= TOL


def test_softmax_router_is_refused(tmp_path):
    tok = char_tokenizer()
    model = random_model(tok, router="softmax")
    with pytest.raises(ValueError, match="softmax"):
        export_hf(model, tok, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "from stagelm.cli.export import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(tmp_path):
    tok = BPETokenizer.train(["the cat sat on the mat; the dog ate the log."] * 30, vocab_size=300)
    model = random_model(tok)
    cfg = model.config
    ckpt = tmp_path / "run" / "last.ckpt"
    state = {"model." + k: v for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, "stagelm": stagelm_metadata(cfg, tok, "pretrain")}, ckpt)

    result = run_cli(f"ckpt={ckpt}", f"out={tmp_path / 'hf'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "hf") in result.stdout
    assert not (tmp_path / "outputs").exists()
    assert max_logit_diff(model, tmp_path / "hf") <= TOL

    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "<|user|>the cat ate<|end|> a log"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf_tok.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_cli_missing_checkpoint(tmp_path):
    from stagelm.cli.export import main
    from tests.conftest import run_main_in_process

    result = run_main_in_process(main, f"ckpt={tmp_path / 'nope.ckpt'}", f"out={tmp_path / 'hf'}", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope.ckpt" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "hf").exists()
