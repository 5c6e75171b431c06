"""`stagelm-serve` as a user runs it: a subprocess on a free port serving two checkpoints by name, and the
one-line errors for a missing checkpoint or nothing to serve."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from stagelm.cli.serve import main
from tests.conftest import run_main_in_process
from tests.unit.serve.conftest import random_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serves_a_checkpoint_named_after_its_stage_and_more_by_name(tmp_path: Path) -> None:
    sft = random_checkpoint(tmp_path / "sft.ckpt")
    dpo = random_checkpoint(tmp_path / "dpo.ckpt", stage="dpo")
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "STAGELM_API_KEY": "k"}
    args = [f"ckpt={sft}", f"models={{tuned: {dpo}}}", f"port={port}", "max_running=2", "log_level=warning"]
    process = subprocess.Popen(
        [sys.executable, "-m", "stagelm.cli.serve", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert health == {"status": "ok", "models": ["stagelm-sft", "tuned"]}
        headers = {"Authorization": "Bearer k"}  # the key came from STAGELM_API_KEY
        cards = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers).json()["data"]
        assert [(c["id"], c["stage"]) for c in cards] == [("stagelm-sft", "sft"), ("tuned", "dpo")]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert f"on http://127.0.0.1:{port}" in process.stdout.read()


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    missing = run_main_in_process(main, f"ckpt={tmp_path}/nope.ckpt", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: checkpoint not found")
    nothing = run_main_in_process(main, cwd=tmp_path)
    assert nothing.returncode == 2 and "nothing to serve" in nothing.stderr and "Traceback" not in nothing.stderr
