"""The serving pool on real vLLM processes, through the real studio (slow).

One studio as `studio serve` starts it (runtime LoRA auto), shared by the tests in file order:
the base is served without runtime LoRA; a burst of seeded long prompts leaves vLLM up; a
full-weight version goes live on its own server while requests flow; the first adapter switches
the base to a LoRA server (blue/green) while requests flow; an adapter vLLM cannot load is
refused and stored nowhere; and a restart on the same data dir serves every version, reports a
bad stored one, and starts the full-weight version again on demand. Each vLLM start costs
40-60 s here, so the tests share the servers.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from studio.serving.vllm_server import live_group_members
from studio.users import local_token
from tests.conftest import LiveStudio, data_dir_with_model
from tests.helpers import Traffic, make_users, random_adapter, rest_sender

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

# Requests flow during a swap at an annotating team's pace, not flat out: on 2 cores a serving
# vLLM kept saturated leaves a starting one a few percent of the CPU, and the swap then takes
# many minutes (docs/architecture.md, "Starting a vLLM beside a busy one"). Two senders, half a
# second apart.
PAUSE_S = 0.5


@pytest.fixture(scope="module")
def pool_studio(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStudio]:
    live = LiveStudio(data_dir_with_model(model_cache, tmp_path_factory.mktemp("pool")), watch_interval=1.0)
    live.start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def token(pool_studio: LiveStudio) -> str:
    return make_users(pool_studio.studio.store, ("pool-eng", "engineer"))["pool-eng"]


def api(live: LiveStudio, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{live.url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=600
    )


def servers(live: LiveStudio) -> list[dict]:
    """The model servers as /health details them (for engineers and admins: the admin's token)."""
    headers = {"Authorization": f"Bearer {local_token(live.settings.data_dir)}"}
    return httpx.get(f"{live.url}/api/v1/health", headers=headers, timeout=30).json()["backend"]["servers"]


def base_folder(live: LiveStudio) -> Path:
    return Path(live.studio.store.model_version("base")["path"])


def test_the_base_is_served_without_runtime_lora_until_an_adapter_exists(pool_studio: LiveStudio) -> None:
    (server,) = servers(pool_studio)
    assert server["kind"] == "managed" and server["state"] == "up"
    assert server["lora"] is False and server["serves"] == ["base"]
    command = pool_studio.studio.server.command()
    assert "--enable-lora" not in command and "--no-enable-chunked-prefill" in command


def long_prompt(i: int) -> str:
    """About 700 tokens, different per request (nothing shared for the prefix cache)."""
    return "Name the last item of this list. " + ", ".join(f"item{i}-{j} is here" for j in range(170))


def test_a_burst_of_seeded_long_prompts_leaves_vllm_up(pool_studio: LiveStudio, token: str) -> None:
    """6 seeded, sampled requests of ~700 prompt tokens at once: twice one engine step's
    2,048-token budget, so with chunked prefill vLLM would split prompts and die ("CPU Generator
    does not use offset"); served whole, every request answers and vLLM never restarts. (Each
    step of whole prompts costs seconds of both cores here: more requests only cost time.)"""
    server = pool_studio.studio.server
    pid = server.pid

    def one(i: int) -> int:
        with api(pool_studio, token) as client:
            body = {"prompt": long_prompt(i), "max_tokens": 8, "temperature": 0.9, "seed": 500 + i}
            return client.post("/sample", json=body).status_code

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(one, range(6)))
    assert codes == [200] * 6
    assert server.pid == pid and server.restarts == 0 and server.state == "ready"


def test_a_full_weight_version_goes_live_while_requests_flow(
    pool_studio: LiveStudio, token: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    studio = pool_studio.studio
    folder = tmp_path_factory.mktemp("full") / "full-copy"
    shutil.copytree(base_folder(pool_studio), folder, copy_function=os.link)  # the weights of a full run
    with Traffic(rest_sender(pool_studio.url, token), ["base"], pause=PAUSE_S) as traffic:
        traffic.wait_for("base", 3)
        version = studio.add_full_version("full-copy", folder, source="test", parent="base")
        traffic.models.append("full-copy")
        traffic.wait_for("full-copy", 3)
        served_base_meanwhile = traffic.ok["base"]
    assert traffic.failed == []
    assert served_base_meanwhile > 3  # the base kept answering while the new server started
    assert version["kind"] == "full" and version["parent"] == "base"
    listed = {tuple(s["serves"]): s for s in servers(pool_studio)}
    assert set(listed) == {("base",), ("full-copy",)}
    assert all(s["state"] == "up" and s["kind"] == "managed" for s in listed.values())


def test_the_first_adapter_switches_to_runtime_lora_without_a_failed_request(
    pool_studio: LiveStudio, token: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    studio = pool_studio.studio
    old = studio.server
    old_group = old.pid
    adapter = random_adapter(base_folder(pool_studio), tmp_path_factory.mktemp("first-lora"))
    # traffic to the base only: the switch restarts its server; kept busy as well, the full-copy
    # server left the starting one too little of the 2 cores (92-106 s for this test)
    with Traffic(rest_sender(pool_studio.url, token), ["base"], pause=PAUSE_S) as traffic:
        traffic.wait_for("base", 2)
        with api(pool_studio, token) as client:
            resp = client.post("/models/adapters", json={"name": "first-lora", "path": str(adapter)})
        assert resp.status_code == 200, resp.text
        traffic.models.append("first-lora")  # served as soon as the registration answers
        traffic.wait_for("first-lora", 2)
    assert traffic.failed == []
    new = studio.server
    assert new is not old and new.lora and old.state == "stopped"
    assert not live_group_members(old_group)
    by_base = {s["base"]: s for s in servers(pool_studio)}
    assert len(by_base) == 2 and by_base["base"]["lora"] and "first-lora" in by_base["base"]["serves"]
    assert studio.store.model_version("first-lora")["kind"] == "lora"


def test_an_adapter_vllm_cannot_load_is_refused_and_never_stored(
    pool_studio: LiveStudio, token: str, tmp_path: Path
) -> None:
    """Issue 14.1: a bare {"r": 8} and junk weights gave a 503 and a stored version that broke
    every later start. Now: a 4xx naming the folder, nothing stored, the server unharmed."""
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (junk / "adapter_model.safetensors").write_bytes(b"not weights at all")
    server = pool_studio.studio.server
    pid = server.pid
    with api(pool_studio, token) as client:
        resp = client.post("/models/adapters", json={"name": "junk-lora", "path": str(junk)})
        assert 400 <= resp.status_code < 500, resp.text
        assert "could not load it" in resp.json()["detail"] and "nothing was stored" in resp.json()["detail"]
        assert not pool_studio.studio.store.query("SELECT 1 FROM model_versions WHERE name = 'junk-lora'")
        assert client.post("/models/junk-lora/promote", json={}).status_code == 422
        assert client.post("/sample", json={"prompt": "Still fine?", "max_tokens": 4}).status_code == 200
        assert (
            client.post("/sample", json={"prompt": "Hi", "model": "first-lora", "max_tokens": 4}).status_code
            == 200
        )
    assert server.pid == pid and server.restarts == 0
    assert "junk-lora" not in pool_studio.studio.pool.adapters()


def test_a_restart_serves_every_version_and_reports_a_bad_stored_one(
    pool_studio: LiveStudio, token: str, tmp_path: Path
) -> None:
    """A stored version vLLM cannot load (left by an older studio) is reported and skipped; the
    rest are served, the full-weight version is started again when asked for."""
    data = pool_studio.settings.data_dir
    junk = tmp_path / "stored-junk"
    junk.mkdir()
    (junk / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (junk / "adapter_model.safetensors").write_bytes(b"junk")
    pool_studio.studio.store.register_model_version(
        "stored-junk", path=str(junk), content_hash="j" * 64, source="test", kind="lora", parent="base"
    )
    pool_studio.stop()
    again = LiveStudio(data, watch_interval=1.0)
    again.start()
    try:
        headers = {"Authorization": f"Bearer {local_token(again.settings.data_dir)}"}  # the detail
        health = httpx.get(f"{again.url}/api/v1/health", headers=headers, timeout=30).json()
        assert health["studio"] == "ok"
        assert "stored-junk" in health["backend"]["failed"]
        (server,) = health["backend"]["servers"]  # the full-weight version waits until asked for
        assert server["lora"] and set(server["serves"]) == {"base", "first-lora"}
        with api(again, token) as client:
            for model in ("base", "first-lora"):
                resp = client.post("/sample", json={"prompt": "Hi", "model": model, "max_tokens": 4})
                assert resp.status_code == 200, resp.text
            refused = client.post("/sample", json={"prompt": "Hi", "model": "stored-junk", "max_tokens": 4})
            assert refused.status_code == 503 and "stored-junk" in refused.json()["detail"]
            started = time.monotonic()
            resp = client.post("/sample", json={"prompt": "Hi", "model": "full-copy", "max_tokens": 4})
            assert resp.status_code == 200, resp.text
        print(f"full-copy started on demand and answered in {time.monotonic() - started:.0f} s")
        assert {s["base"] for s in servers(again)} == {"base", "full-copy"}
    finally:
        again.stop()
