"""Export a stagelm backbone as a Hugging Face `Llama4ForCausalLM` checkpoint (`model_type: llama4_text`).

The stagelm backbone computes exactly what Llama 4's text model computes once the Llama 4 extras that stagelm
does not have are switched off in the config: NoPE layers, chunked attention, QK-norm and attention temperature
tuning. The export therefore builds an empty `Llama4ForCausalLM` in memory from that config, copies every
stagelm tensor into the parameter of the same role, and lets `save_pretrained` write the directory, so the
on-disk layout (safetensors, `config.json`, `generation_config.json`) is whatever the installed transformers
version expects. The result loads with `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` and gives
the same logits as stagelm up to float rounding.

Two cases need care:
- stagelm can run MoE layers without a shared expert; Llama 4 always has one, so it is written with all-zero
  weights, which adds exactly zero to the output.
- the "softmax" router (Mixtral-style, weights scale expert outputs) has no Llama 4 counterpart and is refused.

The tokenizer is written alongside: a byte-level BPE tokenizer as `tokenizer.json` + `tokenizer_config.json`
(loadable with `AutoTokenizer` / `PreTrainedTokenizerFast`); a character tokenizer has no Hugging Face
equivalent and is only written as `stagelm_tokenizer.json` (stagelm's own format, `Tokenizer.from_dict`).
Both kinds also get `stagelm_tokenizer.json`, so the directory round-trips back to stagelm.

Needs the `export` extra (transformers, safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stagelm.model import ModelConfig, Transformer
from stagelm.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, Tokenizer

if TYPE_CHECKING:
    from transformers import Llama4ForCausalLM, Llama4TextConfig

STAGELM_TOKENIZER_FILE = "stagelm_tokenizer.json"


def moe_layer_indices(config: ModelConfig) -> list[int]:
    return [i for i in range(config.n_layers) if config.is_moe_layer(i)]


def check_exportable(config: ModelConfig) -> None:
    """Raise ValueError when the model computes something Llama 4 cannot express."""
    if moe_layer_indices(config) and config.router != "sigmoid":
        raise ValueError(
            f"router={config.router!r} has no Llama 4 equivalent (Llama 4 scales expert inputs by sigmoid scores); "
            "only models trained with router='sigmoid' (or dense models, n_experts=0) can be exported"
        )


def hf_config(config: ModelConfig, tokenizer: Tokenizer) -> Llama4TextConfig:
    """The `Llama4TextConfig` whose model computes what a stagelm `Transformer(config)` computes."""
    from transformers import Llama4TextConfig

    check_exportable(config)
    moe_layers = moe_layer_indices(config)
    return Llama4TextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        intermediate_size_mlp=config.d_ff_dense,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        initializer_range=config.init_std,
        rms_norm_eps=config.norm_eps,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        tie_word_embeddings=config.tie_embeddings,
        attention_dropout=0.0,
        attention_bias=False,
        num_local_experts=config.n_experts if moe_layers else 0,
        num_experts_per_tok=config.top_k,
        moe_layers=moe_layers,
        interleave_moe_layer_step=config.moe_every,
        router_aux_loss_coef=config.lb_loss_coef,
        # Llama 4 extras stagelm does not have: every layer uses RoPE, full causal attention, no QK-norm
        use_qk_norm=False,
        no_rope_layers=[1] * config.n_layers,
        attention_chunk_size=None,
        attn_temperature_tuning=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
    )


def hf_parameter_name(name: str, config: ModelConfig) -> str:
    """Our state-dict key -> the key of the same tensor in `Llama4ForCausalLM`."""
    if name == "lm_head.weight":
        return name
    parts = name.split(".")
    # routed experts: layers.{i}.feed_forward.{gate_up_proj,down_proj} -> ...feed_forward.experts.{...}
    if (
        len(parts) == 4
        and parts[0] == "layers"
        and parts[2] == "feed_forward"
        and parts[3] in ("gate_up_proj", "down_proj")
        and config.is_moe_layer(int(parts[1]))
    ):
        parts.insert(3, "experts")
    return "model." + ".".join(parts)


def _build_hf_model(model: Transformer, hf_cfg: Llama4TextConfig) -> Llama4ForCausalLM:
    from transformers import Llama4ForCausalLM

    config = model.config
    hf_model = Llama4ForCausalLM(hf_cfg).float().eval()
    targets = dict(hf_model.named_parameters(remove_duplicate=False))
    filled: set[str] = set()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            hf_name = hf_parameter_name(name, config)
            target = targets.get(hf_name)
            if target is None or target.shape != tensor.shape:
                found = None if target is None else tuple(target.shape)
                raise RuntimeError(f"export mapping bug: {name} -> {hf_name} (shape {tuple(tensor.shape)} vs {found})")
            target.copy_(tensor.to(target.dtype))
            filled.add(hf_name)
        if not config.shared_expert:
            for layer in moe_layer_indices(config):
                shared = hf_model.model.layers[layer].feed_forward.shared_expert
                for p in shared.parameters():  # down_proj = 0 makes the shared expert add exactly zero
                    p.zero_()
                filled.update(
                    f"model.layers.{layer}.feed_forward.shared_expert.{n}" for n, _ in shared.named_parameters()
                )
    missing = sorted(set(targets) - filled)
    if missing:
        raise RuntimeError(f"export mapping bug: Llama 4 parameters left unset: {missing[:5]}")
    return hf_model


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path, max_len: int) -> list[str]:
    """Write the tokenizer files; return their names."""
    state = tokenizer.to_dict()
    (out_dir / STAGELM_TOKENIZER_FILE).write_text(json.dumps(state, ensure_ascii=False))
    written = [STAGELM_TOKENIZER_FILE]
    if state.get("kind") == "bpe":
        (out_dir / "tokenizer.json").write_text(state["json"])
        tok_config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": UNK,
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD, UNK)],
            "model_max_length": max_len,
            "clean_up_tokenization_spaces": False,
        }
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        written += ["tokenizer.json", "tokenizer_config.json"]
    return written


def _model_card(config: ModelConfig, tokenizer: Tokenizer) -> str:
    moe = moe_layer_indices(config)
    ffn = (
        f"MoE in layers {moe}: {config.n_experts} experts, top-{config.top_k}, sigmoid router, "
        f"shared expert {'yes' if config.shared_expert else 'no (exported as zeros)'}"
        if moe
        else "dense (no MoE layers)"
    )
    if tokenizer.kind == "bpe":
        tok_note = "Byte-level BPE tokenizer: `tokenizer.json`, loads with `AutoTokenizer.from_pretrained`."
    else:
        tok_note = (
            "Character-level tokenizer: Hugging Face has no equivalent, so only `stagelm_tokenizer.json` is "
            "written (load it with `stagelm.tokenizer.Tokenizer.from_dict(json.load(...))`); "
            "`AutoTokenizer` cannot load this directory."
        )
    return (
        "# stagelm export\n\n"
        "A stagelm model exported as `Llama4ForCausalLM` (`model_type: llama4_text`); load it with "
        "`transformers.AutoModelForCausalLM.from_pretrained(path)`.\n\n"
        f"- {config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads / {config.n_kv_heads} KV "
        f"heads of dim {config.head_dim}, vocabulary {config.vocab_size}\n"
        f"- feed-forward: {ffn}\n"
        "- RoPE in every layer, full causal attention, no QK-norm, no attention temperature tuning\n"
        f"- {tok_note}\n"
    )


def build_hf_model(model: Transformer, tokenizer: Tokenizer) -> Llama4ForCausalLM:
    """The in-memory Hugging Face `Llama4ForCausalLM` (fp32, eval mode) that computes what `model` computes."""
    check_exportable(model.config)
    return _build_hf_model(model, hf_config(model.config, tokenizer))


def export_hf(model: Transformer, tokenizer: Tokenizer, out_dir: str | Path) -> Path:
    """Write `model` and `tokenizer` to `out_dir` as a Hugging Face Llama 4 text model; return the directory.

    Raises ValueError for models Llama 4 cannot express (softmax router) or when out_dir is not a directory."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"export destination {out} exists and is not a directory")
    hf_model = build_hf_model(model, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    write_tokenizer(tokenizer, out, model.config.max_seq_len)
    (out / "README.md").write_text(_model_card(model.config, tokenizer))
    return out
