"""REST routes over the services, without a model server: how the services' errors become
responses (403 refused, 422 bad input, 503 a part not running, 507 a full disk), and what some
roles may read. Which role may call which route: test_access_matrix.py, generated from the app."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import NoModelStudio
from tests.helpers import make_users, seed_battles, seed_campaign


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NoModelStudio, dict[str, str]]]:
    with NoModelStudio(tmp_path_factory.mktemp("api")) as studio:
        store = studio.studio.store
        seed_campaign(store, prompts=2, n=2, overlap=1)
        seed_battles(store, "duel", [("base", "other", "one", "two")] * 2)
        tokens = make_users(
            store, ("ann", "annotator"), ("exp", "expert"), ("eng", "engineer"), ("adm", "admin")
        )
        yield studio, tokens


def call(
    served: NoModelStudio, who: str | None, method: str, route: str, tokens: dict, **kw
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {tokens[who]}"} if who else {}
    return httpx.request(method, f"{served.url}/api/v1{route}", headers=headers, timeout=60, **kw)


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


def test_a_refused_backend_request_is_422_a_server_down_503_and_a_full_disk_507() -> None:
    import duckdb
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from studio.api import install_error_handlers
    from studio.serving.client import BackendError, BackendRequestError

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/too-long")
    def too_long() -> None:
        raise BackendRequestError("the model server refused the request (HTTP 400): shorten the prompt")

    @app.get("/down")
    def down() -> None:
        raise BackendError("serving backend did not answer")

    @app.get("/full")
    def full() -> None:
        raise duckdb.TransactionException(
            "TransactionContext Error: Failed to commit: Could not write file x.wal: No space left on device"
        )

    @app.get("/broken")
    def broken() -> None:
        raise duckdb.CatalogException("Table with name nope does not exist")

    with TestClient(app, raise_server_exceptions=False) as client:
        disk = client.get("/full")
        assert disk.status_code == 507 and "the disk under the studio's data directory is full" in disk.text
        assert client.get("/broken").status_code == 500  # a fault stays a fault
        refused = client.get("/too-long")
        assert refused.status_code == 422 and "shorten the prompt" in refused.json()["detail"]
        assert client.get("/down").status_code == 503


def test_next_task_of_a_battle_campaign_is_refused_and_starts_no_sampling(
    served: tuple[NoModelStudio, dict],
) -> None:
    studio, tokens = served
    sampler = studio.studio.task_sampler
    sampler._wake.clear()  # earlier calls of this module's studio may have poked it
    for who in ("ann", "adm"):
        resp = call(studio, who, "POST", "/campaigns/duel/next", tokens)
        assert resp.status_code == 422, resp.text
        assert resp.json()["detail"].startswith(
            "campaign 'duel' is a battle campaign (kind 'battle'), not a labeling campaign"
        )
    assert "duel" not in sampler._starved and not sampler._wake.is_set()
    refused = call(studio, "exp", "POST", "/arena/c1/next", tokens)
    assert refused.status_code == 422
    assert "campaign 'c1' is a labeling campaign (kind 'label'), not a battle campaign" in refused.text


def test_an_empty_next_task_says_why(served: tuple[NoModelStudio, dict]) -> None:
    studio, tokens = served
    store = studio.studio.store
    seed_campaign(store, "empty", prompts=2, n=2, overlap=1)
    store.write("DELETE FROM tasks WHERE campaign = 'empty'")  # nothing sampled yet (and no server)
    answer = call(studio, "ann", "POST", "/campaigns/empty/next", tokens).json()
    assert answer["task"] is None and answer["status"] == "no_server"
    assert "tasks are sampled only while a studio serves" in answer["note"]


def test_quality_per_expert_is_for_admins_only(served: tuple[NoModelStudio, dict]) -> None:
    studio, tokens = served
    for who in ("ann", "exp", "eng"):
        stats = call(studio, who, "GET", "/arena/duel", tokens)
        assert stats.status_code == 200 and stats.json()["experts"] is None, who
    assert isinstance(call(studio, "adm", "GET", "/arena/duel", tokens).json()["experts"], list)


def test_health_tells_anonymous_callers_up_or_down_only(served: tuple[NoModelStudio, dict]) -> None:
    studio, tokens = served
    anonymous = call(studio, None, "GET", "/health", tokens)
    assert anonymous.status_code == 503  # no model server here
    assert anonymous.json() == {"studio": "degraded"}
    for who in ("ann", "exp"):
        assert call(studio, who, "GET", "/health", tokens).json() == {"studio": "degraded"}
    for who in ("eng", "adm"):
        detail = call(studio, who, "GET", "/health", tokens).json()
        assert detail["store"]["path"].endswith("studio.duckdb") and "backend" in detail
    wrong = httpx.get(f"{studio.url}/api/v1/health", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "store" not in wrong.text
