"""The Streamlit chat page in a real browser: headless Chromium types a message and sees the reply."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytest.importorskip("streamlit", reason="streamlit is not installed")

SCREENSHOT_DIR = Path(os.environ.get("TINYLM_SCREENSHOTS", ""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def web_checkpoint(prepared, tmp_path_factory):
    from tinylm.pipeline import pretrain

    from conftest import tiny_config

    cfg = tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 20})
    return pretrain(cfg, prepared["shards"], tmp_path_factory.mktemp("web"))["checkpoint"]


def test_web_chat_streams_a_reply(web_checkpoint, tmp_path):
    import httpx

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tinylm.cli", "web", web_checkpoint, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stdout.read()
            assert time.time() < deadline, "streamlit did not start"
            time.sleep(0.3)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.get_by_text("tinylm chat").first.wait_for(timeout=60_000)
            page.get_by_text("Temperature").first.wait_for(timeout=30_000)  # the sidebar sliders
            box = page.get_by_test_id("stChatInputTextArea")
            box.fill("Hello! Tell me a story.")
            box.press("Enter")
            messages = page.get_by_test_id("stChatMessage")
            contents = page.get_by_test_id("stChatMessageContent")  # the text, without the avatar icon
            contents.nth(1).wait_for(timeout=60_000)
            reply, stable_since = "", time.time()
            deadline = time.time() + 60
            while time.time() - stable_since < 2.0:  # streamed: wait until the text stops growing
                assert time.time() < deadline, "the reply never settled"
                now = contents.nth(1).inner_text().strip()
                if now != reply:
                    reply, stable_since = now, time.time()
                time.sleep(0.2)
            assert messages.count() == 2
            assert contents.nth(0).inner_text().strip() == "Hello! Tell me a story."
            assert reply, "no reply appeared"
            shot = (SCREENSHOT_DIR if SCREENSHOT_DIR.name else tmp_path) / "webapp.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            page.get_by_role("button", name="Clear history").click()
            page.wait_for_function("() => document.querySelectorAll('[data-testid=stChatMessage]').length === 0", timeout=30_000)
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
