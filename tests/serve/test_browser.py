"""The web chat at / driven in headless Chromium (Debian's `chromium`, through Playwright): a question gets a
streamed answer, a generation can be stopped, the conversation survives a reload, settings reach the request,
and model output is never parsed as HTML. Skipped where Chromium or Playwright is missing (.ci/run installs
both)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import Server, request

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, smollm2_server: Server) -> Iterator[object]:  # noqa: ANN001 - a playwright Browser
    # bypass_csp: the page's Content-Security-Policy forbids Playwright's evaluated predicates; with it off, the
    # HTML-injection test checks the renderer alone, not the policy behind it
    context = browser.new_context(viewport={"width": 1100, "height": 720}, bypass_csp=True)
    pg = context.new_page()
    pg.set_default_timeout(180_000)  # a busy CI machine: waits bounded, but not by Playwright's 30 s default
    pg.goto(smollm2_server.url + "/")
    pg.wait_for_function("document.getElementById('model').textContent === 'smollm2-135m-instruct'")
    yield pg
    context.close()


def assistant_text(pg) -> str:  # noqa: ANN001
    return pg.locator(".msg.assistant .content").last.inner_text()


def test_ask_see_the_streamed_answer_and_reload(page, smollm2_server: Server) -> None:  # noqa: ANN001
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else 0)
    page.fill("#system", "You are a concise geography teacher.")
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "input")
    page.fill("#prompt", "What is the capital of France?")
    # the reply's length at every change of the page, recorded in the page (polling from here can miss a short one)
    page.evaluate("""() => { window.lengths = []; new MutationObserver(() => {
        const c = document.querySelectorAll('.msg.assistant .content');
        if (c.length) window.lengths.push(c[c.length - 1].textContent.length);
    }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelector('.msg.assistant') && !document.getElementById('send').disabled")
    answer = assistant_text(page)
    assert "Paris" in answer
    lengths = set(page.evaluate("window.lengths"))
    assert len(lengths - {0, len(answer)}) >= 1, lengths  # seen part-way: streamed, not all at once
    body = sent[0]
    assert body["stream"] is True and body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": "You are a concise geography teacher."}
    assert body["messages"][-1] == {"role": "user", "content": "What is the capital of France?"}
    if os.environ.get("CAMELID_SCREENSHOT"):  # docs/serving-chat.png is made this way
        page.screenshot(path=os.environ["CAMELID_SCREENSHOT"])
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.locator(".msg.user .content").first.inner_text() == "What is the capital of France?"
    assert assistant_text(page) == answer
    assert page.input_value("#system") == "You are a concise geography teacher."


def test_stop_a_generation(page, smollm2_server: Server) -> None:  # noqa: ANN001
    page.fill("#max-tokens", "600")
    page.dispatch_event("#max-tokens", "input")
    page.fill("#prompt", "Write a long story about a dragon who learns to cook.")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .content')[0]?.textContent.length > 20")
    page.click("#stop")
    page.wait_for_selector("#send:enabled")
    text = assistant_text(page)
    assert text.endswith("[stopped]")
    cancelled = 'camelid_sequences_finished_total{reason="cancelled"}'
    deadline = time.monotonic() + 60  # the engine sees the closed stream at its next iteration
    while cancelled not in (metrics := request(smollm2_server.url, path="/metrics")[2].decode()) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert cancelled in metrics  # the server stopped generating when the page did
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert assistant_text(page).endswith("[stopped]")


def test_model_output_is_rendered_as_markdown_never_as_html(page) -> None:  # noqa: ANN001
    hostile = ("Here is **bold**, `code` and <img src=x onerror=\"window.pwned=1\"> "
               "[a link](javascript:window.pwned=2) [ok](https://example.org)\n\n"
               "```python\nprint('<b>hi</b>')\n```\n\n- one\n- two")
    page.evaluate("""(text) => {
        localStorage.setItem('camelid-chat', JSON.stringify({messages: [
            {role: 'user', content: '<script>window.pwned=3</script>'}, {role: 'assistant', content: text}]}));
    }""", hostile)
    page.reload()
    page.wait_for_selector(".msg.assistant")
    msg = page.locator(".msg.assistant .content")
    assert msg.locator("img").count() == 0 and page.locator("script").count() == 1  # only the page's own
    assert msg.locator("strong").inner_text() == "bold"
    assert msg.locator("pre code").inner_text() == "print('<b>hi</b>')"
    assert msg.locator("li").all_inner_texts() == ["one", "two"]
    assert msg.locator("a").count() == 1 and msg.locator("a").get_attribute("href") == "https://example.org"
    assert "<img src=x" in msg.inner_text()
    assert page.evaluate("window.pwned") is None
    assert page.locator(".msg.user .content").inner_text() == "<script>window.pwned=3</script>"


def test_the_page_is_served_with_a_strict_content_security_policy(smollm2_server: Server) -> None:
    status, headers, body = request(smollm2_server.url, path="/")
    assert status == 200 and b"camelid chat" in body
    assert "default-src 'none'" in headers["content-security-policy"]
    assert "connect-src 'self'" in headers["content-security-policy"]
