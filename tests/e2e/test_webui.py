"""The built-in web chat UI (`serve --ui`) in a real headless Chromium: Playwright for Python
driving Debian's `chromium` through its executable path (Playwright's own browser download
cannot reach its servers here). The real `mistralrs serve -m demo --ui --api-key` command: the
page asks for the key, lists the model, streams a reply token by token, stops mid-stream, and
keeps the conversation in local storage across a reload.

Slow (a browser and a server process): `pytest -m slow tests/e2e/test_webui.py`."""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest

from tests.e2e.conftest import serve_process
from tests.e2e.test_server import http

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("MISTRALRS_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def ui_server():
    with serve_process("-m", "demo", "--ui", "--api-key", "k3y", "--shutdown-timeout", "5",
                       env={"OMP_NUM_THREADS": "1"}) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def reply_text(page) -> str:
    return page.locator(".msg.assistant .content").last.inner_text()


def test_ui_streams_a_reply_and_stops_mid_stream(ui_server, browser):
    # The page and its files need no key; the API still does.
    assert http(ui_server + "/ui/")[0] == 200 and http(ui_server + "/ui/app.js")[0] == 200
    assert http(ui_server + "/v1/models")[0] == 401
    page = browser.new_page()
    page.goto(ui_server + "/ui")
    page.locator("#key-needed").wait_for(state="visible")  # the server has a key: the page asks for it
    page.fill("#key-prompt", "k3y")
    page.click("#key-save")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    assert page.locator("#key-needed").is_hidden()
    assert page.locator("#image-label").is_hidden()  # the demo model takes no images
    page.click("#settings-toggle")
    page.fill("#max_tokens", "3000")
    page.fill("#extra", '{"ignore_eos": true}')

    page.fill("#input", "Tell me a long story")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('.msg.assistant .content')?.innerText.length > 0",
                           polling=100)
    assert page.locator("#stop").is_enabled() and page.locator("#send").is_disabled()
    first = len(reply_text(page))
    page.wait_for_function(f"document.querySelector('.msg.assistant .content').innerText.length > {first + 20}",
                           polling=100)
    page.click("#stop")
    page.wait_for_function("document.querySelector('#stop').disabled", polling=100)
    stopped = reply_text(page)
    time.sleep(0.5)
    assert reply_text(page) == stopped  # nothing arrives after Stop
    assert page.locator("#error").is_hidden()
    metrics = http(ui_server + "/metrics", headers={"Authorization": "Bearer k3y"})[2].decode()
    cancelled = re.search(r"^mistralrs_requests_cancelled_total (\S+)", metrics, re.M)
    assert cancelled and float(cancelled.group(1)) >= 1  # the server stopped generating
    completed = re.search(r'^mistralrs_generation_tokens_total (\S+)', metrics, re.M)
    assert completed and float(completed.group(1)) < 3000

    # The conversation (and the key and settings) survive a reload: local storage.
    page.reload()
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    assert page.locator(".msg.user .content").first.inner_text() == "Tell me a long story"
    assert reply_text(page) == stopped
    assert page.locator("#conversations li").count() == 1
    # A fenced code block in a message renders as <pre><code>.
    page.evaluate("""() => {
        const s = JSON.parse(localStorage.getItem('mistralrs-ui'));
        s.conversations[0].messages.push({role: 'assistant', content: 'Run:\\n```python\\nprint(1 < 2)\\n```\\ndone'});
        localStorage.setItem('mistralrs-ui', JSON.stringify(s));
    }""")
    page.reload()
    page.locator("pre code.language-python").wait_for()
    assert page.locator("pre code.language-python").inner_text().strip() == "print(1 < 2)"
    page.close()
