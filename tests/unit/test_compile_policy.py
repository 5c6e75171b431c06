"""`compile=auto`: compiled only for a long CPU run of a stage whose batches keep one shape, with the reason logged;
explicit values pass through and anything else names the key."""

from __future__ import annotations

import logging

import pytest
import torch

from stagelm.compile_policy import COMPILE_MIN_TOKENS, resolve_compile
from stagelm.errors import ConfigError

BATCH = 32 * 128  # the default pre-training batch: 32 blocks of 128 tokens


@pytest.fixture
def caplog(caplog, monkeypatch):
    # an in-process Hydra run earlier in the suite configures logging with disable_existing_loggers
    monkeypatch.setattr(logging.getLogger("stagelm"), "disabled", False)
    return caplog


@pytest.mark.parametrize(
    "stage, max_steps, expected, reason",
    [
        ("pretrain", 1500, True, "one batch shape over a long run"),  # the default run: 6.1M tokens
        ("pretrain", -1, True, "one batch shape over a long run"),  # no step limit
        ("pretrain", 300, False, "1,228,800 training tokens < 5,000,000"),
        ("sft", 5000, False, "batches change shape"),
        ("grpo", 5000, False, "batches change shape"),
    ],
)
def test_auto_compiles_long_static_shape_cpu_runs_only(stage, max_steps, expected, reason, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="stagelm"):
        assert resolve_compile("auto", stage, max_steps, BATCH, "cpu") is expected
    assert f"compile=auto -> {str(expected).lower()}" in caplog.text and reason in caplog.text


def test_the_threshold_is_in_tokens_not_steps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    steps = COMPILE_MIN_TOKENS // BATCH + 1
    assert resolve_compile("auto", "pretrain", steps, BATCH, "cpu")
    # tiny Shakespeare's recipe: 2,000 steps of 12 x 64 tokens are 1.5M tokens, too few to repay a cold compile
    assert not resolve_compile("auto", "pretrain", 2000, 12 * 64, "cpu")


def test_auto_stays_eager_on_a_gpu(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="stagelm"):
        assert not resolve_compile("auto", "pretrain", 100_000, BATCH, "gpu")
    assert "set compile=true" in caplog.text


@pytest.mark.parametrize("value", [True, False])
def test_explicit_values_pass_through(value):
    assert resolve_compile(value, "sft", 10, BATCH, "cpu") is value


def test_a_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="compile='yes'"):
        resolve_compile("yes", "pretrain", 1500, BATCH, "cpu")
