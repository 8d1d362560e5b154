"""The arena against the real vLLM: a hot-loaded LoRA version battles the base, blind."""

from __future__ import annotations

import contextlib
import html
import json
import re
import time
from pathlib import Path

import httpx
import pytest

from studio import arena, users
from studio.importer import read_prompts
from studio.store import Store
from tests.conftest import LiveStudio
from tests.helpers import PASSWORD, gradio_call, login

pytestmark = pytest.mark.slow
CAMPAIGN = "arena-live"
VERSIONS = ("base", "lora-test")


@pytest.fixture(scope="module")
def battle_ready(live_studio: LiveStudio, model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random LoRA adapter on the base, hot-loaded as a version; a campaign with a battle ready."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_cache / "smollm2-135m-instruct")
    lora = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter = tmp_path_factory.mktemp("adapter")
    lora.save_pretrained(adapter)
    studio = live_studio.studio
    version = studio.add_adapter("lora-test", adapter, source="test")
    assert version["kind"] == "lora" and version["parent"] == "base"
    store = studio.store
    store.import_prompts("arena-set", read_prompts("data/prompts/starter.jsonl")[:8], source="test")
    arena.create_battle_campaign(
        store, CAMPAIGN, prompt_set="arena-set", versions=list(VERSIONS), budget=30, max_tokens=24
    )
    studio.task_sampler.poke()
    deadline = time.monotonic() + 400
    while arena.ready_battles(store, CAMPAIGN) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert arena.ready_battles(store, CAMPAIGN) >= 2
    return users.add_user(store, "arena-expert", "expert", PASSWORD)


def without_texts(raw: str, store: Store) -> str:
    """The payload with every prompt and completion text cut out: a completion may well say
    "business model" or "the base of", which names nothing; the check is for what the studio adds."""
    texts = [r["text"] for r in store.query("SELECT text FROM generations")]
    for row in store.query("SELECT messages FROM prompts"):
        messages = json.loads(row["messages"]) if isinstance(row["messages"], str) else row["messages"]
        texts += [m["content"] for m in messages]
    for text in sorted((t for t in texts if t), key=len, reverse=True):
        for form in (json.dumps(text)[1:-1], html.escape(text), html.escape(text, quote=False), text):
            raw = raw.replace(form, "")
    return raw


def assert_blind(raw: str, store: Store) -> None:
    raw = without_texts(raw, store)
    for name in VERSIONS:
        assert not re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", raw), name
    assert "version" not in raw and "model" not in raw.lower().replace("models", "")


def test_raw_responses_before_the_vote_name_no_version(live_studio: LiveStudio, battle_ready: str) -> None:
    headers = {"Authorization": f"Bearer {battle_ready}"}
    resp = httpx.post(f"{live_studio.url}/api/v1/arena/{CAMPAIGN}/next", headers=headers, timeout=60)
    assert resp.status_code == 200
    assert_blind(resp.text, live_studio.studio.store)
    battle = resp.json()["battle"]
    assert re.fullmatch(r"[0-9a-f]{32}", battle["battle_id"])
    # the Gradio event payload of the same expert: the same battle, just as blind
    with httpx.Client(base_url=live_studio.url, timeout=60) as client:
        client.post("/login", data={"username": "arena-expert", "password": PASSWORD})
        event, payload = gradio_call(client, "sxs_next", [CAMPAIGN])
    assert event == "complete"
    assert_blind(json.dumps(payload), live_studio.studio.store)
    # the page HTML itself carries no version either
    html = httpx.get(f"{live_studio.url}/", timeout=60, cookies=client.cookies).text
    assert "lora-test" not in html
    # vote: reveal, lock, idempotent retry
    vote = {"battle_id": battle["battle_id"], "winner": "b"}
    first = httpx.post(f"{live_studio.url}/api/v1/arena/votes", json=vote, headers=headers).json()
    assert {first["reveal"]["a"], first["reveal"]["b"]} == set(VERSIONS)
    again = httpx.post(f"{live_studio.url}/api/v1/arena/votes", json=vote, headers=headers).json()
    assert again["reveal"]["vote_id"] == first["reveal"]["vote_id"]
    board = httpx.get(
        f"{live_studio.url}/api/v1/leaderboard", params={"campaign": CAMPAIGN}, headers=headers
    ).json()
    assert {r["version"] for r in board} == set(VERSIONS)
    assert all({"version", "rating", "lower", "upper", "battles"} <= set(r) for r in board)


def test_annotators_may_not_battle(live_studio: LiveStudio, battle_ready: str) -> None:
    token = users.add_user(live_studio.studio.store, "arena-annotator", "annotator", PASSWORD)
    resp = httpx.post(
        f"{live_studio.url}/api/v1/arena/{CAMPAIGN}/next", headers={"Authorization": f"Bearer {token}"}
    )
    assert resp.status_code == 403


def test_one_vote_cast_in_chromium(live_studio: LiveStudio, battle_ready: str, browser: object) -> None:
    store = live_studio.studio.store
    before = store.query("SELECT count(*) AS n FROM votes WHERE expert = 'arena-expert'")[0]["n"]
    page = login(browser, live_studio.url, "arena-expert")
    seen: list[str] = []  # every response body the browser receives before the vote

    def record(response: object) -> None:
        # bodies of redirects and of streams still open are not readable
        with contextlib.suppress(Exception):
            seen.append(response.text())

    page.on("response", record)
    page.get_by_role("tab", name="Side by side").click()
    box = page.locator("#sxs-campaign input")
    box.click()
    page.get_by_role("option", name=CAMPAIGN).click()
    page.wait_for_function(
        "document.querySelector('#sxs-status').innerText.includes('Which answer')", timeout=60_000
    )
    page.wait_for_timeout(500)
    assert "lora-test" not in page.content()
    page.remove_listener("response", record)
    assert seen and all("lora-test" not in body for body in seen)
    page.locator("#sxs-vote-a").click()
    page.wait_for_function(
        "document.querySelector('#sxs-status').innerText.includes('A was')", timeout=60_000
    )
    status = page.locator("#sxs-status").inner_text()
    assert "lora-test" in status and "base" in status  # revealed after the vote
    after = store.query("SELECT count(*) AS n FROM votes WHERE expert = 'arena-expert'")[0]["n"]
    assert after == before + 1
    # the leaderboard (versions by name) arrives only when its tab is opened
    page.get_by_role("tab", name="Leaderboard").click()
    page.wait_for_function(
        "document.querySelector('#leaderboard-table').innerText.includes('lora-test')", timeout=60_000
    )
    assert page.locator("#leaderboard-plot svg[aria-label]").count() == 1

    page.close()
