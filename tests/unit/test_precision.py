"""Training precision `auto`: bf16 mixed precision only where bf16 matmuls are native, fp32 otherwise."""

from __future__ import annotations

import logging

import pytest
import torch

import stagelm.precision as precision
from stagelm.precision import bf16_is_fast, resolve_precision


@pytest.mark.parametrize("fast, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_follows_the_hardware_and_says_why(fast, expected, monkeypatch, caplog):
    monkeypatch.setattr(precision, "bf16_is_fast", lambda accelerator: (fast, "because"))
    with caplog.at_level(logging.INFO, logger="stagelm"):
        assert resolve_precision("auto", "cpu") == expected
    assert f"-> {expected}: because" in caplog.text


@pytest.mark.parametrize("value", ["32-true", "bf16-mixed", 16, "16-mixed"])
def test_explicit_precision_passes_through(value):
    assert resolve_precision(value, "cpu") == value


def test_cpu_detection_agrees_with_onednn():
    fast, why = bf16_is_fast("cpu")
    assert fast == (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert why


@pytest.mark.parametrize(
    "d_model, expected", [(64, "32-true"), (127, "32-true"), (128, "bf16-mixed"), (None, "bf16-mixed")]
)
def test_auto_keeps_narrow_models_in_fp32_on_a_cpu(d_model, expected, monkeypatch, caplog):
    monkeypatch.setattr(precision, "bf16_is_fast", lambda accelerator: (True, "native bf16"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="stagelm"):
        assert resolve_precision("auto", "cpu", d_model) == expected
    if expected == "32-true":
        assert f"d_model {d_model} < 128" in caplog.text
