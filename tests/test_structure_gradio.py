"""Every Gradio event of the running app either serves an annotator by design or refuses one.

The events are read from the app itself (its /config, as the browser reads it), so an event
added without going through a role-checked service fails here. The REST routes have their own
walk; this is the Gradio half.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from studio import users
from tests.conftest import LiveStudio
from tests.helpers import PASSWORD

pytestmark = pytest.mark.slow

# What an annotator's session is served on purpose (the capability "label" or "view", as in REST).
SERVES_ANNOTATOR = {
    # the Label tab
    "label_campaigns",
    "label_next",
    "label_pick",
    "label_poll",
    "label_submit",
    "label_skip",
    # ratings, campaign names, guidelines and versions: GET /leaderboard, /campaigns, /models
    "leaderboard",
    "leaderboard_campaign",
    "leaderboard_style",
    "leaderboard_tick",
    "leaderboard_open",
    "sxs_campaigns",
    "admin_guidelines_load",
    "models",
    "models_open",
    # who is logged in (and so which tabs show); which tab timers run
    "session",
    "tab_changed",
}


def finish(client: httpx.Client, api_name: str, data: list[Any]) -> tuple[str, Any]:
    """Call an event by name through Gradio's HTTP API; the final event ('complete' or 'error')."""
    start = client.post(f"/gradio_api/call/{api_name}", json={"data": data})
    if start.status_code != 200:
        return f"http {start.status_code}", start.text
    stream = client.get(f"/gradio_api/call/{api_name}/{start.json()['event_id']}", timeout=300)
    last: tuple[str, Any] = ("none", stream.text)
    kind = None
    for line in stream.text.splitlines():
        if line.startswith("event:"):
            kind = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and kind in ("complete", "error"):
            last = (kind, json.loads(line.split(":", 1)[1]))
    return last


def test_every_gradio_event_serves_an_annotator_by_design_or_refuses(live_studio: LiveStudio) -> None:
    store = live_studio.studio.store
    users.add_user(store, "walk-annotator", "annotator", PASSWORD)
    campaigns_before, users_before = store.count("campaigns"), store.count("users")
    with httpx.Client(base_url=live_studio.url, timeout=60) as client:
        assert client.post("/login", data={"username": "walk-annotator", "password": PASSWORD}).json() == {
            "success": True
        }
        config = client.get("/config").json()
        uploaded = client.post(
            "/gradio_api/upload", files={"files": ("p.jsonl", b'{"prompt": "hi"}\n', "application/json")}
        ).json()[0]
        # inputs whose empty value the handler answers without asking a service
        realistic: dict[str, dict[int, Any]] = {
            "model_card": {0: "base"},
            "sxs_pick": {0: "walk-battles"},
            "admin_import": {0: {"path": uploaded, "meta": {"_type": "gradio.FileData"}}, 1: "walk-set"},
        }
        components = {c["id"]: c for c in config["components"]}
        events = [d for d in config["dependencies"] if d["backend_fn"]]
        names = [d["api_name"] for d in events]
        assert len(names) == len(set(names)) and len(names) >= 40
        assert set(names) >= SERVES_ANNOTATOR, SERVES_ANNOTATOR - set(names)
        outcomes = {}
        for dep in events:
            data = [components[i]["props"].get("value") for i in dep["inputs"]]
            for position, value in realistic.get(dep["api_name"], {}).items():
                data[position] = value
            outcomes[dep["api_name"]] = finish(client, dep["api_name"], data)
            # and nobody who is not logged in reaches any of them
            anonymous = httpx.post(
                f"{live_studio.url}/gradio_api/call/{dep['api_name']}", json={"data": data}
            )
            assert anonymous.status_code == 401, dep["api_name"]

    wrong = []
    for name, (kind, payload) in outcomes.items():
        message = (payload.get("error") or "") if isinstance(payload, dict) else str(payload)
        refused = kind == "error" and "walk-annotator" in message and "may not" in message
        if name in SERVES_ANNOTATOR:
            if refused or kind not in ("complete", "error"):
                wrong.append(f"{name}: refused or broken for an annotator by design ({kind}: {message})")
        elif not refused:
            wrong.append(f"{name}: not refused for an annotator ({kind}: {str(payload)[:200]})")
    assert not wrong, "\n".join(wrong)
    # nothing was done on the annotator's behalf
    assert store.count("campaigns") == campaigns_before and store.count("users") == users_before
    assert not [s for s in store.prompt_sets() if s["name"] == "walk-set"]
