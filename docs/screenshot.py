"""The README's screenshots, taken in headless Chromium (Debian's /usr/bin/chromium).

    python docs/screenshot.py runs/default          # docs/webapp.png: `tinylm web`, two chat turns
    python docs/screenshot.py report runs/default   # docs/report.png: the top of RUN/report.html
"""

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

MESSAGES = ["Hi! How are you today?", "What do you like to do on weekends?"]


def main(run: str, out: str = str(Path(__file__).with_name("webapp.png"))) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tinylm.cli", "web", run, "--port", str(port)])
    try:
        for _ in range(200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(f"http://127.0.0.1:{port}/")
            for n, text in enumerate(MESSAGES):
                box = page.get_by_test_id("stChatInputTextArea")
                box.wait_for(timeout=60_000)
                box.fill(text)
                box.press("Enter")
                page.get_by_test_id("stChatMessageContent").nth(2 * n + 1).wait_for(timeout=60_000)
                time.sleep(4)  # let the stream finish
            page.screenshot(path=out)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"wrote {out}")


LAUNCH = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
          "--disable-sync", "--no-first-run"]


def report(run: str, out: str = str(Path(__file__).with_name("report.png"))) -> None:
    """The report page as it opens: no server, a file URL, nothing fetched."""
    from tinylm.report import write_report

    html_path, _ = write_report(run)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=LAUNCH)
        page = browser.new_page(viewport={"width": 1100, "height": 1450})
        page.goto(html_path.resolve().as_uri(), wait_until="load")
        page.screenshot(path=out)
        browser.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["report"]:
        report(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
