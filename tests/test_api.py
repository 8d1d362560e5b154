"""REST routes over the services, without a model server: who may call what, and how the
services' errors become responses (403 refused, 422 bad input, 503 a part not running)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from studio import users
from tests.conftest import NoModelStudio
from tests.helpers import make_users, seed_campaign


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NoModelStudio, dict[str, str]]]:
    with NoModelStudio(tmp_path_factory.mktemp("api")) as studio:
        store = studio.studio.store
        seed_campaign(store, prompts=2, n=2, overlap=1)
        tokens = make_users(store, ("ann", "annotator"), ("eng", "engineer"), ("adm", "admin"))
        yield studio, tokens


def call(
    served: NoModelStudio, who: str | None, method: str, route: str, tokens: dict, **kw
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {tokens[who]}"} if who else {}
    return httpx.request(method, f"{served.url}/api/v1{route}", headers=headers, timeout=60, **kw)


ADMIN_AND_TRAIN_ROUTES = [
    ("POST", "/campaigns", {"name": "evil", "prompt_set": "c1-set"}),
    ("PUT", "/campaigns/c1/guidelines", {"text": "evil"}),
    ("POST", "/users", {"name": "mallory", "role": "admin", "password": "password123"}),
    ("POST", "/runs", {"stage": "dpo"}),
    ("POST", "/models/base/promote", {}),
    ("POST", "/models/policy/rollback", None),
    ("POST", "/arena/campaigns", {"name": "evil-duel", "prompt_set": "c1-set", "versions": ["a", "b"]}),
    ("GET", "/export", None),
    ("GET", "/sampler", None),
    ("POST", "/sampler/measure", None),
]


@pytest.mark.parametrize(("method", "route", "body"), ADMIN_AND_TRAIN_ROUTES)
def test_an_annotator_is_refused_and_nothing_changes(
    served: tuple[NoModelStudio, dict], method: str, route: str, body: dict | None
) -> None:
    studio, tokens = served
    store = studio.studio.store
    before = [store.count(t) for t in ("campaigns", "users", "runs")], store.query("SELECT * FROM aliases")
    resp = call(studio, "ann", method, route, tokens, json=body)
    assert resp.status_code == 403, resp.text
    assert resp.json()["detail"].startswith("user 'ann' (annotator) may not")
    assert call(studio, None, method, route, tokens, json=body).status_code == 401
    after = [store.count(t) for t in ("campaigns", "users", "runs")], store.query("SELECT * FROM aliases")
    assert after == before and users.get_user(store, "mallory") is None


def test_errors_become_422_and_503_with_the_message(served: tuple[NoModelStudio, dict]) -> None:
    studio, tokens = served
    bad = call(
        studio, "adm", "POST", "/campaigns", tokens, json={"name": "c2", "prompt_set": "c1-set", "n": 9}
    )
    assert (
        bad.status_code == 422
        and bad.json()["detail"] == "n=9: a labeling task shows 2 to 8 completions to rank"
    )
    rollback = call(studio, "eng", "POST", "/models/policy/rollback", tokens)
    assert rollback.status_code == 422 and "has no parent to roll back to" in rollback.json()["detail"]
    sampler = call(studio, "adm", "GET", "/sampler", tokens)  # built, not started: nothing planned yet
    assert sampler.status_code == 200 and sampler.json()["campaigns"] == {}
    down = call(studio, "eng", "POST", "/sample", tokens, json={"prompt": "hi"})
    assert down.status_code == 503 and "sampling needs the model server" in down.json()["detail"]
    shape = call(studio, "eng", "POST", "/sample", tokens, json={"n": 2})
    assert shape.status_code == 422 and "exactly one of 'prompt'" in shape.text
    style = call(studio, "ann", "GET", "/leaderboard?style=width", tokens)
    assert style.status_code == 422 and "the only style control is 'length'" in style.text


def test_campaign_defaults_come_from_the_spec(served: tuple[NoModelStudio, dict]) -> None:
    studio, tokens = served
    made = call(studio, "adm", "POST", "/campaigns", tokens, json={"name": "plain", "prompt_set": "c1-set"})
    assert made.status_code == 200, made.text
    body = made.json()
    assert (body["n"], body["overlap"], body["task_timeout_s"]) == (4, 1, 1800)
    assert body["sampling"] == {"temperature": 0.8, "top_p": 0.95, "max_tokens": 128, "seed": None}
    assert body["created_by"] == "adm"
