"""The chat page in a real headless browser (Debian's chromium driven by Playwright): a question streams a tool
call card with its arguments and the calculator's result, then the streamed answer; the page loads nothing from
outside the server; the screenshot shows it. Skipped where chromium or Playwright is missing."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")

import shutil
import struct
from pathlib import Path

import httpx

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", header[16:24])


def test_page_has_no_external_assets(tool_server: str) -> None:
    html = httpx.get(tool_server).text
    assert "<script>" in html and "http://" not in html and "https://" not in html and "src=" not in html


def test_tool_round_trip_in_the_browser(tool_server: str, tmp_path: Path) -> None:
    requested: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.on("request", lambda request: requested.append(request.url))
            page.goto(tool_server)
            page.wait_for_selector("#model option[value='stagelm-sft']", state="attached")
            page.fill("#temperature", "0")
            page.fill("#prompt", "What is 4821 * 37?")
            page.click("#send")
            result = page.wait_for_selector(".tool-card .result:text('178377')", timeout=30_000)
            assert page.text_content(".tool-card .args") == '{"expression": "4821 * 37"}'
            assert result.text_content() == "178377"
            answer = page.wait_for_selector(".msg.assistant:text('= 178377.')", timeout=30_000)
            assert answer.text_content() == "4821 * 37 = 178377."
            assert page.evaluate("window.stagelmStreamedDeltas") > 3  # streamed piece by piece
            assert page.locator(".msg.error").count() == 0
            shot = tmp_path / "chat.png"
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert png_size(shot) == (1000, 700) and shot.stat().st_size > 10_000
    assert requested and all(url.startswith(tool_server) for url in requested), requested
