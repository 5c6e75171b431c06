"""`stagelm-compress` end to end on the tiny tool model (a real trained model, seconds to make): the compressed
checkpoint is smaller on disk, loads through `stagelm.load`, answers as the original does through the generate
CLI, and exports; the distillation stage trains from it with the original as teacher."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

import stagelm
from stagelm.chat import render_for_training
from stagelm.checkpoint import load_checkpoint
from stagelm.compress.activation import ActivationPrune
from stagelm.compress.base import Compression, calibrate
from stagelm.compress.experts import ExpertPrune
from stagelm.compress.measure import calibration_batches, save_compressed
from stagelm.evaluation import generate_replies
from stagelm.tools import CALCULATOR_SCHEMA
from tests.conftest import TOOL_CONVERSATIONS, compose_train, run_main_in_process, tool_conversation

FAST = ["data.eval_examples=4", "data.loss_examples=8", "calibration.conversations=20", "speed.new_tokens=4"]


def run_compress(cwd: Path, *overrides: str):
    from stagelm.cli.compress import main

    return run_main_in_process(main, *overrides, "speed.repeats=1", cwd=cwd)


def first_reply(model, tokenizer) -> str:
    prompt = tool_conversation(*TOOL_CONVERSATIONS[0])[:1]
    return generate_replies(model, tokenizer, [prompt], [[CALCULATOR_SCHEMA]], max_new_tokens=60)[0]


@pytest.fixture(scope="module")
def deployed(tiny_tool_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deploy")
    result = run_compress(out, f"ckpt={tiny_tool_checkpoint}", "recipe=deploy", f"out={out}", *FAST)
    assert result.returncode == 0, result.stderr
    return out


def test_deploy_writes_a_smaller_model_and_the_report(deployed: Path, tiny_tool_checkpoint: Path) -> None:
    report = json.loads((deployed / "compress_report.json").read_text())
    assert [r["step"] for r in report["rows"]] == ["baseline", "int8"]
    base, int8 = report["rows"]
    for column in (
        "params_total",
        "params_active",
        "weight_bytes",
        "ratio_vs_bf16",
        "val/loss",
        "val/exact_match",
        "val/format_ok",
        "val/kl_to_original",
        "tokens_per_s_b1",
        "tokens_per_s_b16",
        "speed_vs_original_b1",
        "speed_vs_original_b16",
        "seconds",
    ):
        assert column in int8, column
    assert base["weight_bytes"] == report["fp32_bytes"]
    # 1 byte per weight + fp32 scales per 64-wide row; embeddings, norms and router stay fp32 (a larger share here)
    assert 0.65 < int8["smaller_than_fp32"] < 0.75
    assert int8["val/kl_to_original"] < 0.05
    # really smaller on disk: the whole file, metadata included, against the fp32 weights alone
    assert (deployed / "model.ckpt").stat().st_size < 0.36 * report["fp32_bytes"]
    assert (deployed / "compress_size_accuracy.png").stat().st_size > 1000
    markdown = (deployed / "compress_report.md").read_text()
    assert "| int8 |" in markdown and "Targets:" in markdown


def test_compressed_model_loads_and_answers_like_the_original(deployed: Path, tiny_tool_checkpoint: Path) -> None:
    model, tokenizer = stagelm.load(str(deployed / "model.ckpt"))
    original, _ = stagelm.load(str(tiny_tool_checkpoint))
    reply = first_reply(model, tokenizer)
    assert "calculator" in reply and "4821 * 37" in reply
    assert reply == first_reply(original, tokenizer)
    loaded = load_checkpoint(deployed / "model.ckpt")
    kinds = {name: d["kind"] for name, d in loaded.extra["storage"].items()}
    assert set(kinds.values()) == {"int8", "half"}  # deploy: int8 matrices, the embedding table in bf16
    assert [name for name, kind in kinds.items() if kind == "half"] == ["model.embed_tokens.weight"]
    assert loaded.stage == "compress" and loaded.extra["source_stage"] == "sft"


def test_generate_cli_runs_the_compressed_model(deployed: Path, tiny_tool_checkpoint: Path, tmp_path: Path) -> None:
    from stagelm.cli.generate import main

    outputs = []
    for ckpt in (deployed / "model.ckpt", tiny_tool_checkpoint):
        result = run_main_in_process(
            main, f"ckpt={ckpt}", "prompt='What is 4821 * 37?'", "greedy=true", "max_new_tokens=30", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert outputs[0].startswith("What is 4821 * 37?") and outputs[0] == outputs[1]


def test_export_dequantizes_with_a_note(deployed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from stagelm.cli.export import run

    assert run(str(deployed / "model.ckpt"), str(tmp_path / "hf")) == 0
    assert "exported dequantized to fp32" in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    model, _ = stagelm.load(str(deployed / "model.ckpt"))
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - model(ids).logits).abs().max() < 1e-4


def test_structured_pruning_keeps_llama4_so_export_is_exact(tiny_tool_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from stagelm.export.hf import export_hf

    loaded = load_checkpoint(tiny_tool_checkpoint)
    c = Compression(loaded.model, loaded.tokenizer)
    calib = calibrate(c.model, calibration_batches(loaded.tokenizer, 20, 128, 0))
    c = ActivationPrune(mlp_keep=0.5, expert_keep=0.5, heads_keep=0.5)(c, calib)
    c = ExpertPrune(keep=3)(c, calibrate(c.model, calibration_batches(loaded.tokenizer, 20, 128, 0)))
    cfg = c.model.config
    assert (cfg.d_ff, cfg.d_ff_dense, cfg.n_heads, cfg.n_experts) == (32, 64, 2, 3)
    path = save_compressed(c, tmp_path / "pruned.ckpt")
    model, tokenizer = stagelm.load(str(path))
    assert model.num_params() < 0.6 * loaded.model.num_params()
    export_hf(model, tokenizer, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - model(ids).logits).abs().max() < 1e-4


def test_bad_recipe_order_is_a_one_line_error(tiny_tool_checkpoint: Path, tmp_path: Path) -> None:
    result = run_compress(
        tmp_path,
        f"ckpt={tiny_tool_checkpoint}",
        "recipe=deploy",
        f"out={tmp_path}",
        "measure=false",
        "+step@recipe.steps.experts=experts",
        *FAST,
    )
    assert result.returncode == 2
    assert "error: step experts: expert pruning changes the model's shapes" in result.stderr


def test_missing_arguments(tmp_path: Path) -> None:
    result = run_compress(tmp_path, "recipe=deploy")
    assert result.returncode == 2 and "usage: stagelm-compress ckpt=PATH recipe=NAME out=DIR" in result.stderr


# a four-step stage=distill run on a few built-in conversations
SHORT_DISTILL = (
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "data.builtin_train=64",
    "data.builtin_val=8",
    "data.eval_examples=4",
    "data.batch_size=4",
    "stage.warmup_steps=1",
)


def self_distillation(ckpt: Path, **settings):
    """stage=distill's module with `ckpt` as both the student's start and the teacher."""
    from stagelm.stages.distill import DistillModule

    loaded = load_checkpoint(ckpt)
    return DistillModule(
        model_config=loaded.model_config,
        tokenizer=loaded.tokenizer,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        init_from=str(ckpt),
        teacher=str(ckpt),
        **settings,
    )


def test_distill_stage_loss_is_zero_when_student_is_teacher(tiny_tool_checkpoint: Path) -> None:
    from stagelm.data.instruct import SFTCollator

    loaded = load_checkpoint(tiny_tool_checkpoint)
    module = self_distillation(tiny_tool_checkpoint, divergence="reverse", on_policy=True)
    examples = [
        render_for_training(loaded.tokenizer, tool_conversation(*c), [CALCULATOR_SCHEMA]) for c in TOOL_CONVERSATIONS
    ]
    batch = SFTCollator(loaded.tokenizer.pad_id)([(e.input_ids, e.loss_mask) for e in examples])
    mask = batch["labels"] != -100
    assert module.kl(module.model(batch["input_ids"]).logits, batch["input_ids"], mask).item() == pytest.approx(
        0, abs=1e-6
    )
    # GKD's on-policy term: KL on the student's own sampled replies, 0 too when the student is the teacher
    torch.manual_seed(0)
    assert module.on_policy_kl(batch).item() == pytest.approx(0.0, abs=1e-6)
    assert not any(p.requires_grad for p in module.teacher.parameters())
    # and it is not 0 for a different student: the loss measures something
    with torch.no_grad():
        module.model.lm_head.weight.mul_(0.5)
    assert module.kl(module.model(batch["input_ids"]).logits, batch["input_ids"], mask).item() > 1e-3


def test_distill_stage_trains_from_a_pruned_student(tiny_tool_checkpoint: Path, tmp_path: Path) -> None:
    from stagelm.cli.train import train

    loaded = load_checkpoint(tiny_tool_checkpoint)
    c = Compression(loaded.model, loaded.tokenizer)
    c = ExpertPrune(keep=2)(c, calibrate(c.model, calibration_batches(loaded.tokenizer, 20, 128, 0)))
    student = save_compressed(c, tmp_path / "student.ckpt")
    cfg = compose_train(
        tmp_path,
        "stage=distill",
        f"init_from={student}",
        f"teacher={tiny_tool_checkpoint}",
        *SHORT_DISTILL,
    )
    metrics = train(cfg)
    assert metrics["train/kl"] > 0 and "val/kl_to_teacher" in metrics
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert trained.stage == "distill" and trained.model_config.n_experts == 2


def test_distill_stage_with_fake_quant_saves_the_latent_weights(tiny_tool_checkpoint: Path, tmp_path: Path) -> None:
    """Quantization-aware distillation: the checkpoint is a plain model's (loads strictly) holding the latent
    weights, and round-to-nearest int4 of them is exactly the model the run computed with."""
    from stagelm.cli.train import train
    from stagelm.compress.quantize import Quantize, fake_quantize

    cfg = compose_train(
        tmp_path,
        "stage=distill",
        f"init_from={tiny_tool_checkpoint}",
        f"teacher={tiny_tool_checkpoint}",
        *SHORT_DISTILL,
        "stage.fake_quant={bits:4,group:32,lm_head:int8,embeddings:fp32}",
    )
    metrics = train(cfg)
    assert metrics["train/kl"] > 0  # the fake-quantized student is not the teacher
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    q = trained.model.layers[0].self_attn.q_proj.weight
    original = load_checkpoint(tiny_tool_checkpoint).model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q, original)  # trained ...
    quantized = Quantize(bits=4, group=32, method="rtn")(Compression(copy.deepcopy(trained.model), trained.tokenizer))
    assert not torch.equal(q, quantized.model.layers[0].self_attn.q_proj.weight)  # ... and latent, not rounded
    fake_quantize(trained.model, bits=4, group=32)  # what the run computed with
    probe = calibration_batches(trained.tokenizer, 4, 64, 0)[0]
    with torch.no_grad():
        assert torch.equal(trained.model(probe).logits, quantized.model(probe).logits)


def test_fake_quant_checkpoint_keys_round_trip_for_resume(tiny_tool_checkpoint: Path) -> None:

    loaded = load_checkpoint(tiny_tool_checkpoint)
    module = self_distillation(tiny_tool_checkpoint, fake_quant={"bits": 4, "group": 32})
    assert "model.lm_head.parametrizations.weight.original" in module.state_dict()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    saved = checkpoint["state_dict"]
    assert not any("parametrizations" in k for k in saved)
    assert {k for k in saved if k.startswith("model.")} == {f"model.{k}" for k in loaded.model.state_dict()}
    assert torch.equal(saved["model.lm_head.weight"], loaded.model.lm_head.weight)  # the latent, not rounded
    module.on_load_checkpoint(checkpoint)  # resuming: back under the parametrized keys
    result = module.load_state_dict(checkpoint["state_dict"], strict=False)  # as Lightning does: no teacher saved
    assert not result.unexpected_keys and all(k.startswith("teacher.") for k in result.missing_keys)


@pytest.mark.parametrize("recipe", ["deploy", "max", "survey"])
def test_every_recipe_composes_and_its_steps_build(recipe: str) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR / "compress"), version_base="1.3"):
        cfg = compose("compress", overrides=[f"recipe={recipe}", "ckpt=x", "out=y"])
    steps = [instantiate(s) for s in cfg.recipe.steps.values()]
    assert steps and all(callable(s) for s in steps)
    if recipe == "max":  # prune, recover by distillation, then quantize: storage is chosen last
        assert list(cfg.recipe.steps) == ["experts", "distill", "int4"]
        distill, int4 = steps[1], steps[2]
        # the distillation trains with exactly the int4 step's rounding, which then stores what was trained
        assert distill.fake_quant == {"bits": 4, "group": 32, "lm_head": int4.lm_head, "embeddings": "bf16"}
        assert int4.method == "rtn" and (int4.bits, int4.group) == (4, 32)
        assert "stage.fake_quant={bits:4,group:32,lm_head:int8,embeddings:bf16}" in distill.command(
            Path("s"), Path("r")
        )


def test_distill_stage_trains_a_fresh_smaller_student(tiny_tool_checkpoint: Path, tmp_path: Path) -> None:
    from stagelm.cli.train import train

    cfg = compose_train(
        tmp_path,
        "stage=distill",
        f"teacher={tiny_tool_checkpoint}",
        "model=tiny",
        "model.d_model=32",
        "model.n_layers=2",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.builtin_train=32",
        "data.builtin_val=4",
        "data.eval_examples=2",
        "data.batch_size=4",
        "stage.warmup_steps=1",
    )
    metrics = train(cfg)
    assert metrics["train/kl"] > 0
    student = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    teacher = load_checkpoint(tiny_tool_checkpoint)
    assert student.tokenizer.to_dict() == teacher.tokenizer.to_dict()
    assert student.model.num_params() < teacher.model.num_params()
