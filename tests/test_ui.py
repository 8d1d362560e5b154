"""The studio's tabs in a real Chromium (Debian's package, driven by playwright)."""

from __future__ import annotations

import time

import pytest

from studio import campaigns, labeling, users
from studio.importer import messages_hash, read_prompts
from studio.store import ImportedPrompt
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


ALL_TABS = ["Label", "Side by side", "Leaderboard", "Playground", "Models", "Train", "Admin"]


def visible_tabs(page: object) -> list[str]:
    page.wait_for_selector("#whoami:has-text('Logged in')", timeout=30_000)
    page.wait_for_timeout(500)  # the page load's tab updates arrive with the same event
    return [t.strip() for t in page.get_by_role("tab").all_inner_texts()]


def test_each_role_sees_only_its_tabs_in_chromium(live_studio: LiveStudio, browser: object) -> None:
    store = live_studio.studio.store
    users.add_user(store, "tabs-annotator", "annotator", PASSWORD)
    users.add_user(store, "tabs-admin", "admin", PASSWORD)
    page = login(browser, live_studio.url, "tabs-annotator")
    assert visible_tabs(page) == ["Label"]
    page.close()

    page = login(browser, live_studio.url, "tabs-admin")
    assert visible_tabs(page) == ALL_TABS
    # tables show their real column names, and so does an empty one (the runs), not "1 2 3"
    page.get_by_role("tab", name="Admin").click()
    page.wait_for_selector("#admin-campaigns th:has-text('sampler')", timeout=30_000)
    page.get_by_role("tab", name="Train").click()
    page.wait_for_selector("#runs-table th:has-text('stages')", timeout=30_000)
    page.close()


def test_an_error_toast_shows_markup_as_text(live_studio: LiveStudio, browser: object) -> None:
    users.add_user(live_studio.studio.store, "toast-admin", "admin", PASSWORD)
    page = login(browser, live_studio.url, "toast-admin")
    page.get_by_role("tab", name="Admin").click()
    page.get_by_label("New campaign name").fill("toast-campaign")
    page.get_by_label("Model version or alias").fill('<img src=x onerror="window.__pwned=1"><b>bold</b>')
    page.get_by_role("button", name="Create campaign").click()
    toast = page.locator(".toast-body").first
    toast.wait_for(timeout=30_000)
    # the message quotes the bad name shortened (names are cut at 40 characters), as text
    assert '<img src=x onerror="window.__pwned=1">' in toast.inner_text()
    assert page.locator(".toast-body img, .toast-body b").count() == 0
    assert page.evaluate("window.__pwned") is None
    page.close()


def test_a_cut_answer_is_marked_in_chromium(live_studio: LiveStudio, browser: object) -> None:
    store = live_studio.studio.store
    users.add_user(store, "cut-annotator", "annotator", PASSWORD)
    seed_campaign(store, name="ui-cut", prompts=1, n=2, overlap=1, texts=["stopped in the midd", "whole."])
    store.write("UPDATE generations SET finish_reason = 'length' WHERE text = 'stopped in the midd'")
    page = login(browser, live_studio.url, "cut-annotator")
    choose_campaign(page, "ui-cut")
    page.wait_for_selector("#label-completion-1", state="visible", timeout=60_000)
    shown = page.locator("#label-completion-0, #label-completion-1").all_inner_texts()
    assert [("cut off" in text, "stopped in the midd" in text) for text in shown].count((True, True)) == 1
    assert not any("cut off" in text and "whole." in text for text in shown)
    page.close()


def test_a_failing_sampler_is_shown_on_label_and_admin(live_studio: LiveStudio, browser: object) -> None:
    store = live_studio.studio.store
    users.add_user(store, "stuck-annotator", "annotator", PASSWORD)
    users.add_user(store, "stuck-admin", "admin", PASSWORD)
    # a prompt longer than the model's 2048-token context: the real vLLM refuses every attempt
    too_long = [{"role": "user", "content": "Summarise this. " + "lorem ipsum dolor sit amet " * 900}]
    store.import_prompts(
        "stuck-set", [ImportedPrompt("row 1", too_long, messages_hash(too_long))], source="test"
    )
    campaigns.create_campaign(store, "ui-stuck", prompt_set="stuck-set", n=2, overlap=1)
    sampler = live_studio.studio.task_sampler
    sampler.poke("ui-stuck", starved=True)
    try:
        deadline = time.monotonic() + 180
        while sampler.last_error("ui-stuck") is None and time.monotonic() < deadline:
            time.sleep(1)
        assert sampler.last_error("ui-stuck"), sampler.status.get("ui-stuck")

        page = login(browser, live_studio.url, "stuck-annotator")
        choose_campaign(page, "ui-stuck")
        page.wait_for_selector("#label-status:has-text('is failing')", timeout=60_000)
        assert sampler.last_error("ui-stuck")[:40] in page.locator("#label-status").inner_text()
        page.close()

        page = login(browser, live_studio.url, "stuck-admin")
        page.get_by_role("tab", name="Admin").click()
        # the campaign's row (Gradio also keeps a hidden table of the widest cells, for sizing)
        row = page.locator("#admin-campaigns").get_by_role("row").filter(has_text="ui-stuck")
        row.wait_for(timeout=30_000)
        assert "failing: " in row.inner_text()
        page.close()
    finally:
        campaigns.set_status(store, "ui-stuck", "paused")  # stop the retries
