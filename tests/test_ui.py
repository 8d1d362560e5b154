"""The labeling tab in a real Chromium (Debian's package, driven by playwright)."""

from __future__ import annotations

import time

import pytest

from studio import campaigns, labeling, users
from studio.importer import read_prompts
from tests.conftest import LiveStudio
from tests.helpers import PASSWORD, login, seed_campaign

pytestmark = pytest.mark.slow

XSS = '<img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script> **bold answer**'


def choose_campaign(page: object, name: str) -> None:
    box = page.locator("#label-campaign input")
    box.click()
    page.get_by_role("option", name=name).click()


def test_annotator_ranks_and_submits_in_chromium(live_studio: LiveStudio, browser: object) -> None:
    store = live_studio.studio.store
    users.add_user(store, "ui-alice", "annotator", PASSWORD)
    store.import_prompts("ui-set", read_prompts("data/prompts/starter.jsonl")[:3], source="test")
    campaigns.create_campaign(store, "ui-demo", prompt_set="ui-set", n=2, overlap=1, max_tokens=24)
    live_studio.studio.task_sampler.poke()
    deadline = time.monotonic() + 300
    while labeling.ready_tasks(store, "ui-demo") == 0 and time.monotonic() < deadline:
        time.sleep(1)  # the background sampler is asking the real vLLM
    assert labeling.ready_tasks(store, "ui-demo") > 0

    page = login(browser, live_studio.url, "ui-alice")
    page.wait_for_selector("#whoami:has-text('ui-alice')", timeout=30_000)

    choose_campaign(page, "ui-demo")
    page.wait_for_selector("#label-completion-1", state="visible", timeout=60_000)
    assert page.locator("#label-completion-0").inner_text().strip()
    page.locator("#label-best").get_by_text("Answer 2").click()
    page.locator("#label-worst").get_by_text("Answer 1").click()
    page.locator("#label-strength").get_by_text("clear").click()
    page.locator("#label-rationale textarea").fill("second is more helpful")
    first_prompt = page.locator("#label-prompt").inner_text()
    page.locator("#label-submit").click()

    deadline = time.monotonic() + 60
    rows: list = []
    while not rows and time.monotonic() < deadline:
        rows = store.query("SELECT * FROM judgments WHERE annotator = 'ui-alice'")
        time.sleep(0.5)
    assert len(rows) == 1
    judgment = rows[0]
    assert judgment["campaign"] == "ui-demo"
    assert list(judgment["ranks"]) == [2, 1] and judgment["strength"] == 2
    assert judgment["rationale"] == "second is more helpful" and not judgment["all_bad"]
    assert judgment["duration_ms"] > 0
    # the next task is on screen at once (or the page says it is being prepared)
    page.wait_for_function(
        "document.querySelector('#label-status').innerText.includes('1 done')", timeout=60_000
    )
    assert page.locator("#label-prompt").inner_text() != first_prompt
    page.close()


def test_completions_render_markdown_with_html_and_scripts_inert(
    live_studio: LiveStudio, browser: object
) -> None:
    store = live_studio.studio.store
    users.add_user(store, "ui-bob", "annotator", PASSWORD)
    seed_campaign(store, name="ui-xss", prompts=1, n=2, overlap=1, texts=[XSS, "plain answer"])
    page = login(browser, live_studio.url, "ui-bob")
    choose_campaign(page, "ui-xss")
    page.wait_for_selector("#label-completion-1", state="visible", timeout=60_000)
    page.wait_for_timeout(1000)
    html = page.locator("#label-completion-0, #label-completion-1").all_inner_texts()
    assert any("bold answer" in text for text in html)
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#label-completion-0 strong, #label-completion-1 strong").count() >= 1
    assert page.locator("#label-completion-0 script, #label-completion-1 script").count() == 0
    page.close()
