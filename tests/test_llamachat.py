"""The LlamaChat page in a real headless Chromium (the system's, driven by Playwright): a message
typed and sent, the answer streaming in, stopped, the chat cleared; text that looks like HTML or
Markdown code shown as text. Skips where Playwright or a Chromium is missing.

XLLAMA_SCREENSHOT=PATH saves the page mid-conversation there (default: the test's tmp folder)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import fixture
from serving import http_module, needs_serve_extra, server_thread, until

needs_serve_extra()
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed: pip install -e '.[test]'")

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
STEP_S = 0.03  # a slow model: every engine step takes this much longer, so answers take seconds


def chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no Chromium found (looked for {', '.join(BROWSERS)}); install Debian's "
                "chromium package, as .ci/run does")


@pytest.fixture(scope="module")
def page():
    browser_path = chromium()
    with server_thread(fixture("stories260K-hf"), max_batch=2, slow_s=STEP_S) as srv, \
            sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=browser_path, headless=True,
                                        args=["--no-sandbox"])
        except Exception as e:  # a Chromium that cannot start here (no sandbox support ...)
            pytest.skip(f"{browser_path} does not start headless: {str(e).splitlines()[0]}")
        page = browser.new_page(viewport={"width": 1100, "height": 720})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(srv.url + "/")
        page.srv, page.errors = srv, errors
        yield page
        browser.close()


def assistant_text(page) -> str:
    return page.locator(".msg.assistant .bubble").last.inner_text()


# The page's policy forbids eval, which wait_for_function needs; locators run in Playwright's own
# isolated world, so the test polls them instead.
def wait_text(page, what: str, condition) -> str:
    return until(lambda: condition(page.locator(what).last.inner_text()) and
                 page.locator(what).last.inner_text(), f"{what} never matched")


def test_a_message_streams_an_answer_that_stop_cuts_and_clear_removes(page, tmp_path):
    wait_text(page, "#model", lambda t: t == "stories260K-hf")
    page.fill("#temperature", "0")  # greedy: the story the model knows
    page.fill("#max-tokens", "400")
    page.fill("#prompt", "Once upon a time")
    page.press("#prompt", "Enter")
    assert page.locator(".msg.user .bubble").inner_text() == "Once upon a time"
    page.wait_for_selector("#stop:not([hidden])")
    # streaming: the answer is seen part-way, then longer, before it is done
    early = wait_text(page, ".msg.assistant .bubble", lambda t: len(t) > 10)
    later = wait_text(page, ".msg.assistant .bubble", lambda t: len(t) > len(early) + 60)
    assert later.startswith(early)
    assert ", there was a little girl named Lily".startswith(assistant_text(page)[:35])
    page.click("#stop")
    page.wait_for_selector("#send:not([hidden])")
    page.wait_for_selector(".note")
    stopped = assistant_text(page)
    assert page.locator(".note").inner_text() == "stopped"
    page.wait_for_timeout(300)  # nothing arrives after the stop
    assert assistant_text(page) == stopped
    shot = Path(os.environ.get("XLLAMA_SCREENSHOT") or tmp_path / "llamachat.png")
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    page.click("#clear")
    assert page.locator(".msg").count() == 0 and page.locator("#empty").is_visible()
    assert not page.errors, page.errors
    # the stopped request was cancelled on the server: its slot is free again
    health = page.srv.url + "/health"
    until(lambda: http_module().get(health).json()["slots_in_use"] == 0, "the slot stayed taken")
    assert "cancelled" in page.srv.log[-1]


def test_html_in_a_message_is_shown_as_text_and_code_fences_as_code(page):
    page.fill("#max-tokens", "16")
    text = ("<img src=x onerror=\"document.title='owned'\"> look:\n"
            "```python\nprint('<b>hi</b>')\n```")
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_selector("#send:not([hidden])")
    bubble = page.locator(".msg.user .bubble").last
    assert bubble.locator("img").count() == 0 and bubble.locator("b").count() == 0
    assert page.title() != "owned"
    code = bubble.locator("pre code")
    assert code.inner_text() == "print('<b>hi</b>')"
    assert bubble.locator("pre .lang").inner_text() == "python"
    assert "<img src=x" in bubble.inner_text()
    assert page.locator(".msg.assistant .bubble").last.inner_text()  # an answer came
    assert not page.errors, page.errors
