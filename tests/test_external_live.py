"""The studio on an external vLLM fleet (slow): a second vLLM process started by the test plays
the external server (it is not the studio's: the studio neither starts nor stops it).

The studio checks it serves the same model as `--model`, samples through it, hot-loads a trained
adapter into it through /v1/load_lora_adapter from the shared directory, and after the server is
killed and restarted loads the adapter again without being asked. A listed server that is down
is skipped and shown down.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from studio.config import Settings
from studio.runtime import Studio
from studio.serving.vllm_server import ServingError, VLLMServer
from studio.users import local_token
from tests.conftest import LiveStudio, free_port
from tests.helpers import make_users, random_adapter

# Not on the vLLM lane (tests/conftest.py): its server is its own, and that lane ran 7 minutes
# longer than the other (1,825 s of tests against 1,410 in a fresh-clone run)
pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def model(model_cache: Path) -> Path:
    return model_cache / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def fleet_server(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """What a fleet machine runs: `vllm serve MODEL --enable-lora` with runtime LoRA updating on.
    Its own watchdog restarts it when it dies, as a fleet's supervisor would."""
    server = VLLMServer(model, "base", tmp_path_factory.mktemp("fleet") / "fleet.log", lora=True)
    server.start()
    yield server
    server.stop()


def health(live: LiveStudio) -> dict:
    """/health with its detail (for engineers and admins: the admin's token)."""
    headers = {"Authorization": f"Bearer {local_token(live.settings.data_dir)}"}
    return httpx.get(f"{live.url}/api/v1/health", headers=headers, timeout=30).json()


def test_a_base_request_batched_beside_two_adapters_answers_as_it_does_alone(
    fleet_server: VLLMServer, model: Path, tmp_path: Path
) -> None:
    """vLLM's CPU LoRA ops gave a token without an adapter the last slot's update, so a base
    request batched beside a second adapter answered differently (2 of 8 greedy answers in
    benchmarks/lora_ops.py); with studio.serving.lora_cpu's ops it answers as alone, and each
    adapter's answers are its own."""
    from concurrent.futures import ThreadPoolExecutor

    from studio.serving.client import OpenAIChatBackend, SamplingParams

    prompts = [
        f"Write a short story about a {w}."
        for w in ("cat", "dog", "ship", "tree", "river", "city", "robot", "bird")
    ]
    params = SamplingParams(max_tokens=24, temperature=0)
    with OpenAIChatBackend(fleet_server.url) as client:
        for name, seed in (("mix-a1", 1), ("mix-a2", 2)):
            adapter = random_adapter(model, tmp_path / name, seed=seed, rank=16, strength=1.0)
            client.load_lora(name, str(adapter))

        def answers(models: list[str]) -> list[str]:
            def one(pair: tuple[str, str]) -> str:
                return (
                    client.chat(pair[0], [{"role": "user", "content": pair[1]}], params).completions[0].text
                )

            with ThreadPoolExecutor(len(models)) as pool:
                return list(pool.map(one, zip(models, prompts, strict=True)))

        alone = answers(["base"] * len(prompts))
        mixed_models = [("base", "mix-a1", "mix-a2", "base")[i % 4] for i in range(len(prompts))]
        mixed = answers(mixed_models)
        for name in ("mix-a1", "mix-a2"):
            client.unload_lora(name)
    for model_name, got, want in zip(mixed_models, mixed, alone, strict=True):
        if model_name == "base":
            assert got == want
    assert any(got != want for m, got, want in zip(mixed_models, mixed, alone, strict=True) if m != "base")


def test_sampling_adapters_and_a_restart_of_the_external_server(
    fleet_server: VLLMServer, model: Path, tmp_path: Path
) -> None:
    down_url = f"http://127.0.0.1:{free_port()}"  # listed, never running
    live = LiveStudio(
        tmp_path / "data", backend_url=f"{fleet_server.url},{down_url}", model=model, watch_interval=1.0
    )
    live.start()
    try:
        studio = live.studio
        # the base version trains from the folder, not from a URL
        assert studio.store.model_version("base")["path"] == str(model.resolve())
        states = {s["url"]: s["state"] for s in health(live)["backend"]["servers"]}
        assert states == {fleet_server.url: "up", down_url: "down"}
        token = make_users(studio.store, ("ext-eng", "engineer"))["ext-eng"]
        client = httpx.Client(
            base_url=f"{live.url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=600
        )
        resp = client.post("/sample", json={"prompt": "Name a fruit.", "n": 2, "max_tokens": 8})
        assert resp.status_code == 200, resp.text

        # an adapter outside the shared directory is copied under it: the fleet reads it there
        adapter = random_adapter(model, tmp_path / "outside" / "ext-lora")
        resp = client.post("/models/adapters", json={"name": "ext-lora", "path": str(adapter)})
        assert resp.status_code == 200, resp.text
        stored = Path(studio.store.model_version("ext-lora")["path"])
        assert (
            stored.is_relative_to(live.settings.shared_dir.resolve())
            and (stored / "adapter_config.json").is_file()
        )
        cards = httpx.get(f"{fleet_server.url}/v1/models", timeout=30).json()["data"]
        assert {c["id"]: c.get("root") for c in cards}["ext-lora"] == str(stored)
        resp = client.post("/sample", json={"prompt": "Hi", "model": "ext-lora", "max_tokens": 8})
        assert resp.status_code == 200, resp.text

        # the fleet server dies and its supervisor restarts it: the adapter is gone from it
        old_pid = fleet_server.pid
        os.killpg(old_pid, signal.SIGKILL)
        seen_down = False
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            (status,) = [s for s in health(live)["backend"]["servers"] if s["url"] == fleet_server.url]
            seen_down |= status["state"] == "down"
            if fleet_server.pid != old_pid and status["state"] == "up" and "ext-lora" in status["serves"]:
                break
            time.sleep(1)
        assert seen_down, "health never showed the external server down"
        assert status["state"] == "up" and "ext-lora" in status["serves"]
        # loaded again by the studio's watcher, with nobody asking: the server itself lists it
        cards = httpx.get(f"{fleet_server.url}/v1/models", timeout=30).json()["data"]
        assert "ext-lora" in {c["id"] for c in cards}
        resp = client.post("/sample", json={"prompt": "Hi", "model": "ext-lora", "max_tokens": 8})
        assert resp.status_code == 200, resp.text
        client.close()
    finally:
        live.stop()


def test_a_server_with_another_chat_template_is_not_taken_for_the_model(
    fleet_server: VLLMServer, model: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-model"
    shutil.copytree(model, other, copy_function=os.link)
    template = other / "chat_template.jinja"
    text = template.read_text()
    template.unlink()  # a new file, not the hard-linked original
    template.write_text(text.replace("<|im_start|>", "<|im_start|> "))
    studio = Studio(Settings(data_dir=tmp_path / "data", backend_url=fleet_server.url, model=other))
    with pytest.raises(ServingError, match="the chat templates differ"):
        studio.start()
    assert studio.store is None  # a refused start leaves nothing open
