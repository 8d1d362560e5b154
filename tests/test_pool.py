"""The serving pool's routing, retry, watcher and memory policy, against small OpenAI-compatible
servers run by the test (the external fleet's part: servers the studio does not own), and the
settings and adapter checks that need no server. The same paths against real vLLM processes are
in tests/test_pool_live.py and tests/test_external_live.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from studio.config import Settings
from studio.serving.client import BackendError, SamplingParams
from studio.serving.pool import Endpoint, ServingPool
from studio.serving.vllm_server import VLLMServer
from tests.conftest import NoModelStudio, free_port
from tests.helpers import make_users

MESSAGES = [{"role": "user", "content": "hi"}]
PARAMS = SamplingParams(max_tokens=4)


class FleetServer:
    """A tiny OpenAI-compatible server: serves `base` and the adapters loaded into it, and says
    which server answered. Stopping it and starting it again on the same port is a restart (the
    adapters are gone)."""

    def __init__(self, base: str = "base", port: int | None = None):
        self.base = base
        self.port = port or free_port()
        self.adapters: dict[str, str] = {}
        self.loads: list[str] = []
        self.answered = 0
        self.refuse: set[str] = set()
        self.fail_next = 0  # answer that many chat requests with a 503, then serve again
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> Any:
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        app = FastAPI()

        @app.get("/health")
        def health() -> dict:
            return {}

        @app.get("/v1/models")
        def models() -> dict:
            cards = [{"id": self.base, "root": "/m", "parent": None, "max_model_len": 2048}]
            cards += [{"id": n, "root": p, "parent": self.base} for n, p in self.adapters.items()]
            return {"data": cards}

        @app.post("/v1/load_lora_adapter")
        def load(body: dict) -> Any:
            if body["lora_name"] in self.refuse:
                return JSONResponse({"error": {"message": "bad weights"}}, status_code=500)
            self.adapters[body["lora_name"]] = body["lora_path"]
            self.loads.append(body["lora_name"])
            return "ok"

        @app.post("/v1/unload_lora_adapter")
        def unload(body: dict) -> Any:
            self.adapters.pop(body["lora_name"], None)
            return "ok"

        @app.post("/v1/chat/completions")
        def chat(body: dict) -> Any:
            if body["model"] not in {self.base, *self.adapters}:
                return JSONResponse(
                    {"error": {"message": f"The model `{body['model']}` does not exist."}}, 404
                )
            if self.fail_next > 0:
                self.fail_next -= 1
                return JSONResponse({"error": {"message": "engine hiccup"}}, status_code=503)
            self.answered += 1
            choice = {"index": 0, "message": {"content": str(self.port)}, "finish_reason": "stop"}
            return {"choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}

        return app

    def start(self) -> FleetServer:
        import uvicorn

        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="error")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert time.monotonic() < deadline, "the fleet server did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        assert self._thread is not None
        self._thread.join(10)
        self.adapters = {}  # a restarted vLLM has lost its runtime-loaded adapters


@pytest.fixture()
def fleet() -> Iterator[list[FleetServer]]:
    servers = [FleetServer().start(), FleetServer().start()]
    yield servers
    for server in servers:
        if server._thread is not None and server._thread.is_alive():
            server.stop()


def pool_over(servers: list[FleetServer], tmp_path: Path, **kwargs: Any) -> ServingPool:
    pool = ServingPool("base", tmp_path, progress=lambda m: None, **kwargs)
    for server in servers:
        pool.add_external(server.url)
    return pool


def test_the_pool_answers_max_model_len_per_model(fleet: list[FleetServer], tmp_path: Path) -> None:
    # the services ask it when a campaign is created (its max_tokens must fit the context); the
    # pool's own setting for the servers it starts once shadowed this method with an int
    pool = pool_over(fleet[:1], tmp_path, max_model_len=1024)
    try:
        assert pool.max_model_len("base") == 2048  # what the server says, not the pool's setting
        assert pool.server_context == 1024
    finally:
        pool.stop()


def test_requests_spread_over_the_servers(fleet: list[FleetServer], tmp_path: Path) -> None:
    pool = pool_over(fleet, tmp_path)
    try:
        for _ in range(10):
            pool.chat("base", MESSAGES, PARAMS)
        assert [s.answered for s in fleet] == [5, 5]
        assert pool.health() and pool.models() == ["base"]
    finally:
        pool.stop()


def test_a_server_that_went_away_is_retried_elsewhere_unseen_and_shown_down(
    fleet: list[FleetServer], tmp_path: Path
) -> None:
    pool = pool_over(fleet, tmp_path, watch_interval=0.2)
    try:
        fleet[0].stop()  # the pool still believes it is up
        answers = [pool.chat("base", MESSAGES, PARAMS).completions[0].text for _ in range(4)]
        assert answers == [str(fleet[1].port)] * 4
        states = {s["url"]: s["state"] for s in pool.status()["servers"]}
        assert states == {fleet[0].url: "down", fleet[1].url: "up"}
        assert "did not answer" in pool.status()["servers"][0]["last_error"]
        fleet[1].stop()  # nothing serves the base now: a clear error, not a hang
        with pytest.raises(BackendError, match="not ready"):
            pool.chat("base", MESSAGES, PARAMS)
        assert not pool.health()
    finally:
        pool.stop()


def test_one_failed_request_on_a_healthy_lone_server_is_retried_on_it_unseen(
    fleet: list[FleetServer], tmp_path: Path
) -> None:
    pool = pool_over(fleet[:1], tmp_path)
    try:
        fleet[0].fail_next = 1  # one request fails; /health still answers
        assert pool.chat("base", MESSAGES, PARAMS).completions[0].text == str(fleet[0].port)
        assert fleet[0].answered == 1 and pool.status()["servers"][0]["state"] == "up"
        fleet[0].fail_next = 2  # retried once, not forever: the second failure reaches the caller
        with pytest.raises(BackendError):
            pool.chat("base", MESSAGES, PARAMS)
        assert fleet[0].fail_next == 0 and fleet[0].answered == 1
    finally:
        pool.stop()


def test_adapters_go_to_every_server_all_or_nothing(fleet: list[FleetServer], tmp_path: Path) -> None:
    pool = pool_over(fleet, tmp_path)
    try:
        pool.add_adapter("good", "/shared/good", "base")
        assert all(s.adapters == {"good": "/shared/good"} for s in fleet)
        fleet[1].refuse.add("bad")
        with pytest.raises(BackendError, match="bad weights"):
            pool.add_adapter("bad", "/shared/bad", "base")
        assert all("bad" not in s.adapters for s in fleet)  # the first server's load was undone
        assert "bad" not in pool.adapters() and "bad" not in pool.models()
        answered = {pool.chat("good", MESSAGES, PARAMS).completions[0].text for _ in range(4)}
        assert answered == {str(s.port) for s in fleet}
    finally:
        pool.stop()


def test_a_restarted_server_gets_its_adapters_again_unasked(fleet: list[FleetServer], tmp_path: Path) -> None:
    pool = pool_over(fleet, tmp_path, watch_interval=0.2)
    pool.start_watcher()
    try:
        pool.add_adapter("kept", "/shared/kept", "base")
        fleet[0].stop()
        deadline = time.monotonic() + 10
        while pool.status()["servers"][0]["state"] != "down":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        restarted = FleetServer(port=fleet[0].port).start()
        fleet[0] = restarted
        deadline = time.monotonic() + 10
        while "kept" not in restarted.adapters:
            assert time.monotonic() < deadline, "the watcher did not load the adapter again"
            time.sleep(0.05)
        assert restarted.loads == ["kept"]
        assert pool.status()["servers"][0]["state"] == "up"
    finally:
        pool.stop()


def test_an_adapter_lost_in_a_restart_is_loaded_again_by_the_request(
    fleet: list[FleetServer], tmp_path: Path
) -> None:
    pool = pool_over(fleet[:1], tmp_path)  # no watcher, one server: the request itself recovers
    try:
        pool.add_adapter("kept", "/shared/kept", "base")
        fleet[0].adapters.clear()  # as after a restart the pool has not seen yet
        assert pool.chat("kept", MESSAGES, PARAMS).completions[0].text == str(fleet[0].port)
        assert fleet[0].loads == ["kept", "kept"]
    finally:
        pool.stop()


def test_a_restarted_server_that_says_ready_serves_before_its_restart_hook_has_run(
    fleet: list[FleetServer], tmp_path: Path
) -> None:
    # vLLM's watchdog sets "ready" and only then calls the pool's hook; a request in between was
    # told "not ready, try again" (CI: test_crash's sample right after the restart, one 503)
    pool = ServingPool("base", tmp_path, progress=lambda m: None)
    server = VLLMServer(tmp_path, "base", tmp_path / "base.log", port=fleet[0].port, progress=lambda m: None)
    ep = Endpoint(id="base-1", url=server.url, base="base", client=pool_client(server.url), server=server)
    ep.state = "up"
    pool._endpoints.append(ep)
    try:
        server.state = "restarting"
        pool._check(ep)  # as the watcher sees it while vLLM restarts
        assert ep.state == "down"
        with pytest.raises(BackendError, match="not ready"):
            pool.chat("base", MESSAGES, PARAMS)
        server.state = "ready"  # the restart's health check passed; its hook has not run yet
        assert pool.chat("base", MESSAGES, PARAMS).completions[0].text == str(fleet[0].port)
        assert ep.state == "up" and fleet[0].answered == 1
    finally:
        pool.stop()


def managed(pool: ServingPool, name: str, last_used: float, tmp_path: Path) -> Endpoint:
    """A managed endpoint whose vLLM is never started (the policy looks only at names and use)."""
    server = VLLMServer(tmp_path, name, tmp_path / f"{name}.log", progress=lambda m: None)
    ep = Endpoint(id=name, url=server.url, base=name, client=pool_client(server.url), server=server)
    ep.state, ep.last_used = "up", last_used
    pool._endpoints.append(ep)
    return ep


def pool_client(url: str) -> Any:
    from studio.serving.client import OpenAIChatBackend

    return OpenAIChatBackend(url)


def test_the_least_recently_used_idle_version_makes_room(tmp_path: Path) -> None:
    in_use = {"policy-target"}
    pool = ServingPool("base", tmp_path, max_servers=3, in_use=lambda: in_use, progress=lambda m: None)
    managed(pool, "base", 0.0, tmp_path)  # the oldest, but the base is never stopped
    managed(pool, "policy-target", 1.0, tmp_path)  # in use
    managed(pool, "full-b", 3.0, tmp_path)
    pool._make_room()
    assert {e.id for e in pool.endpoints()} == {"base", "policy-target"}
    pool._make_room()  # below the limit now: nothing stops
    assert len(pool.endpoints()) == 2
    managed(pool, "full-c", 5.0, tmp_path)
    in_use.add("full-c")
    with pytest.raises(BackendError, match="each serves a version in use"):
        pool._make_room()
    pool.stop()


def test_settings_for_serving() -> None:
    assert Settings(lora=True).lora == "on" and Settings(lora=False).lora == "off"
    assert Settings().lora == "auto" and Settings().shared_dir == Settings().data_dir
    s = Settings(backend_url="http://a:8000/v1, http://b:8000/", model=Path("/m"))
    assert s.backend_urls == ["http://a:8000", "http://b:8000"] and s.model == Path("/m")
    with pytest.raises(ValueError, match="--lora maybe: expected one of auto, on, off"):
        Settings(lora="maybe")
    with pytest.raises(ValueError, match="--backend-url gpu-1:8000: expected the http"):
        Settings(backend_url="gpu-1:8000")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"r": "eight"}', 'adapter_config.json has r="eight"; expected the LoRA rank'),
        ("{r: 8", "adapter_config.json is not JSON"),
        ("[8]", "adapter_config.json is not a JSON object"),
        ('{"r": 64}', "rank 64 is above the served maximum 16"),
    ],
)
def test_a_bad_adapter_config_is_a_422_and_stores_nothing(tmp_path: Path, config: str, message: str) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(config)
    (adapter / "adapter_model.safetensors").write_bytes(b"junk")
    with NoModelStudio(tmp_path / "data") as live:
        token = make_users(live.studio.store, ("eng", "engineer"))["eng"]
        resp = httpx.post(
            f"{live.url}/api/v1/models/adapters",
            json={"name": "bad-adapter", "path": str(adapter)},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert resp.status_code == 422, resp.text
        assert message in resp.json()["detail"] and str(adapter) in resp.json()["detail"]
        assert not live.studio.store.query("SELECT * FROM model_versions WHERE name = 'bad-adapter'")
    assert json.loads(resp.text)


def test_the_admin_tab_lists_each_server_and_the_versions_not_served(
    fleet: list[FleetServer], tmp_path: Path
) -> None:
    import gradio as gr

    from studio import services as svc
    from studio.ui import build_ui

    pool = pool_over(fleet, tmp_path)
    fleet[0].stop()
    pool.check_all()
    pool.failed["junk-lora"] = (
        "the server at ... refused to load adapter 'junk-lora' (HTTP 500): bad <weights>"
    )

    class Serving(svc.OfflineContext):
        def health(self) -> dict[str, Any]:
            return {"studio": "degraded", "backend": pool.status()}

    ctx = Serving(tmp_path / "data")
    try:
        make_users(ctx.store, ("adm", "admin"), ("eng", "engineer"))
        demo = build_ui(ctx)
        overview = next(fn for fn in demo.fns.values() if fn.api_name == "admin_overview")
        out = overview.fn(gr.Request(username="adm"))
        index = {getattr(c, "elem_id", None): i for i, c in enumerate(overview.outputs)}
        table = out[index["admin-servers"]].set_index("server")
        assert table.loc[fleet[0].url, "state"] == "down"
        assert table.loc[fleet[1].url, "state"] == "up" and table.loc[fleet[1].url, "serves"] == "base"
        assert "did not answer" in table.loc[fleet[0].url, "last_error"]
        note = out[index["admin-servers"] - 1]
        assert "junk-lora" in note and "bad &lt;weights&gt;" in note  # names and errors shown as text
        with pytest.raises(svc.AuthError):
            svc.model_servers(ctx, svc.User("eng", "engineer"))
    finally:
        ctx.close()
        pool.stop()


def test_a_campaign_on_a_studio_with_a_model_server_is_checked_against_the_served_context(
    fleet: list[FleetServer], tmp_path: Path
) -> None:
    """Creating a campaign asks the pool for the served context (`services._context_of`); an
    attribute once hid `ServingPool.max_model_len`, and every campaign made on a studio with a
    model server answered 500 while the offline tests passed."""
    from studio import campaigns

    pool = pool_over(fleet[:1], tmp_path)
    try:
        assert pool.max_model_len("base") == 2048 and pool.max_model_len(None) == 2048
        with NoModelStudio(tmp_path / "data") as live:
            live.studio.pool = live.studio.backend = pool  # what Studio.start puts there
            store = live.studio.store
            store.register_model_version("base", path="/models/base", content_hash="h" * 64, source="test")
            campaigns.ensure_policy_alias(store, "base")
            token = make_users(store, ("boss", "admin"))["boss"]
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=f"{live.url}/api/v1", headers=headers) as api:
                assert (
                    api.post("/prompt-sets/s/prompts", json={"records": [{"prompt": "hi"}]}).status_code
                    == 200
                )
                made = api.post(
                    "/campaigns", json={"name": "c1", "prompt_set": "s", "n": 2, "max_tokens": 96}
                )
                assert made.status_code == 200, made.text
                bad = api.post(
                    "/campaigns", json={"name": "c2", "prompt_set": "s", "n": 2, "max_tokens": 4096}
                )
                assert bad.status_code == 422 and "context is 2048 tokens" in bad.json()["detail"]
    finally:
        pool.stop()


def test_the_context_of_a_server_retired_meanwhile_is_not_an_error(
    fleet: list[FleetServer], tmp_path: Path
) -> None:
    """A blue/green swap closes the old server's client; a look-up that listed it just before
    asks the next server, or answers None, instead of raising into a request."""
    pool = pool_over(fleet[:1], tmp_path)
    try:
        (ep,) = pool.endpoints()
        ep.client.close()  # what retiring it does, between the listing and the call
        assert pool.max_model_len("base") is None
    finally:
        pool.stop()
