"""End to end in a real browser: Debian's headless chromium (driven by playwright, never a browser of its own)
opens the app, sends a prompt, waits for both models' replies, and saves a screenshot."""

from __future__ import annotations

import shutil

import pytest
from gradio_helpers import close

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert shutil.which("chromium") or CHROMIUM, "Debian's chromium: scripts/test.sh installs it (apt-get)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def test_a_prompt_in_the_browser_gets_both_replies(browser, tiny_pool, tiny_runs_dir, tmp_path):
    from llmcompress.serving.server import free_port
    from llmcompress.ui.app import build_app, launch
    from llmcompress.ui.config import AppConfig

    config = AppConfig(runs_dir=tiny_runs_dir, port=free_port())
    demo, url = launch(build_app(tiny_pool, config), config, block=False)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url, timeout=60_000)
        page.wait_for_selector("#llmc-prompt textarea", timeout=60_000)
        page.click("#llmc-settings button")
        page.uncheck("#llmc-greedy input[type=checkbox]")  # sampled: the random tiny model writes visible text
        page.fill("#llmc-prompt textarea", "What is a list?")
        page.click("#llmc-send")
        done = ("() => { const s = [...document.querySelectorAll('div.llmc-stats')];"
                " return s.length > 0 && s.every(e => e.innerText.includes('done')); }")
        page.wait_for_function(done, timeout=120_000)
        bots = page.locator(".llmc-chat [data-testid='bot']")
        assert bots.count() == len(tiny_pool.keys())
        assert all(bots.nth(i).inner_text().strip() for i in range(bots.count()))
        users = page.locator(".llmc-chat [data-testid='user']")
        assert [users.nth(i).inner_text().strip() for i in range(users.count())] == ["What is a list?"] * 2
        stats = page.locator("div.llmc-stats").all_inner_texts()
        assert all("tok/s" in s and "TTFT" in s for s in stats)
        shot = tmp_path / "app-chat.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 20_000
        print(f"screenshot: {shot}")
    finally:
        close(demo)
