"""Roles are checked on the server, against the live studio: a few REST and Gradio cases end to end.
The full route and event matrix, for every role, is test_access_matrix.py."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from studio import users
from studio.store import Store
from tests.conftest import LiveStudio
from tests.helpers import PASSWORD, gradio_call, make_users

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def annotator(live_studio: LiveStudio) -> str:
    return users.add_user(live_studio.studio.store, "role-annotator", "annotator", PASSWORD)


def test_annotator_token_works_where_allowed(live_studio: LiveStudio, annotator: str) -> None:
    resp = httpx.get(f"{live_studio.url}/api/v1/me", headers={"Authorization": f"Bearer {annotator}"})
    assert resp.json() == {"name": "role-annotator", "role": "annotator"}
    bad = httpx.get(f"{live_studio.url}/api/v1/me", headers={"Authorization": "Bearer not-a-token"})
    assert bad.status_code == 401


def test_annotator_session_is_refused_on_an_admin_gradio_event(
    live_studio: LiveStudio, annotator: str
) -> None:
    with httpx.Client(base_url=live_studio.url, timeout=60) as client:
        assert client.post("/login", data={"username": "role-annotator", "password": PASSWORD}).json() == {
            "success": True
        }
        event, payload = gradio_call(client, "admin_add_user", ["mallory", "admin", "password123"])
        assert event == "error"
        assert "may not admin" in payload["error"]
        runs_before = live_studio.studio.store.count("runs")
        event, payload = gradio_call(
            client, "train_start", ["dpo", "policy", [], 0.2, None, 1, None, "", "", 0, None, "", None]
        )
        assert event == "error" and "may not train" in payload["error"]
        event, payload = gradio_call(client, "train_cancel", ["run-x"])
        assert event == "error" and "may not train" in payload["error"]
        event, payload = gradio_call(client, "promote", ["base", True])
        assert event == "error" and "may not train" in payload["error"]
    assert users.get_user(live_studio.studio.store, "mallory") is None
    assert live_studio.studio.store.count("runs") == runs_before
    # without a login Gradio itself refuses the call
    assert (
        httpx.post(f"{live_studio.url}/gradio_api/call/admin_add_user", json={"data": []}).status_code == 401
    )


def test_admin_session_may_call_the_same_event(live_studio: LiveStudio) -> None:
    users.add_user(live_studio.studio.store, "role-admin", "admin", PASSWORD)
    with httpx.Client(base_url=live_studio.url, timeout=60) as client:
        client.post("/login", data={"username": "role-admin", "password": PASSWORD})
        event, _ = gradio_call(client, "admin_add_user", ["role-new", "annotator", "password123"])
    assert event == "complete"
    assert users.get_user(live_studio.studio.store, "role-new").role == "annotator"


def test_wrong_password_is_refused(live_studio: LiveStudio, annotator: str) -> None:
    resp = httpx.post(f"{live_studio.url}/login", data={"username": "role-annotator", "password": "nope"})
    assert resp.status_code >= 400


def test_admin_creates_a_battle_campaign_through_the_ui_event(live_studio: LiveStudio) -> None:
    from studio import arena
    from studio.importer import read_prompts

    store = live_studio.studio.store
    store.import_prompts("roles-battle-set", read_prompts("data/prompts/starter.jsonl")[:2], source="test")
    users.add_user(store, "role-admin2", "admin", PASSWORD)
    with httpx.Client(base_url=live_studio.url, timeout=60) as client:
        client.post("/login", data={"username": "role-admin2", "password": PASSWORD})
        event, payload = gradio_call(
            client,
            "admin_create_battles",
            ["roles-duel", "roles-battle-set", "base, policy", 5, 32, True, "", "helpful"],
        )
        assert event == "error" and "at least two different versions" in payload["error"]
        users.add_user(store, "role-expert", "expert", PASSWORD)
    with httpx.Client(base_url=live_studio.url, timeout=60) as client:
        client.post("/login", data={"username": "role-expert", "password": PASSWORD})
        event, payload = gradio_call(
            client,
            "admin_create_battles",
            ["roles-duel", "roles-battle-set", "base,other", 5, 32, True, "", ""],
        )
        assert event == "error" and "may not admin" in payload["error"]
    with pytest.raises(Exception, match="does not exist"):
        arena.battle_campaign(store, "roles-duel")


def test_a_replaced_token_stops_working_at_once(tmp_path: Path) -> None:
    # tokens are remembered in the studio process; replacing one must forget the old one
    store = Store(tmp_path / "s.duckdb")
    old = make_users(store, ("ann1", "annotator"))["ann1"]
    assert users.user_for_token(store, old) == users.User("ann1", "annotator")
    assert users.known_token(store, old) is not None  # now served from memory
    new = users.new_token(store, "ann1")
    assert users.known_token(store, old) is None and users.user_for_token(store, old) is None
    assert users.user_for_token(store, new).name == "ann1"
    store.close()
