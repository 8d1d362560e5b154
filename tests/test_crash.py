"""Crash tests: the real studio killed outright, vLLM killed under it, a trainer killed, the disk
full under the data directory. Nothing acknowledged is lost, nothing the studio started outlives
it, and it comes back at once.

Each test that must kill a studio starts its own (`python -m studio.cli serve`, a process of its
own); the others share the session's live studio. The same crashes, timed, are in
benchmarks/reliability.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from studio import training
from studio.jobs import Runner
from studio.store import Store
from tests import crashing
from tests.conftest import LiveStudio, NoModelStudio, data_dir_with_model, free_port
from tests.helpers import make_users, seed_campaign, seed_easy_judgments, tiny_model

# the tests that kill the studio or its vLLM share the session's studio, and so its lane
# (tests/conftest.py); those of trainers and of a full disk run no model server and take the other
pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
GONE_WITHIN_S = 5.0  # "a few seconds": everything the studio started, after a kill -9


# ---------------------------------------------------------------- kill -9 of the whole studio


def test_kill_9_of_the_studio_leaves_no_process_and_it_restarts_on_the_same_port_at_once(
    model_cache: Path, tmp_path: Path, live_studio: LiveStudio
) -> None:
    """With its own vLLM, on `--host ::` (every IPv6 address): a kill -9 takes vLLM's engine core
    and workers down within seconds, and a restart on the same port starts at once although the
    old connections sit in TIME-WAIT. (The restart serves the session's vLLM as an external
    server: the port is what is tested, and a second model load would cost a minute.)"""
    data_dir = data_dir_with_model(model_cache, tmp_path)
    token = crashing.add_user(data_dir, "ops", "admin")  # a non-loopback host needs an account
    port = free_port()
    url = f"http://[::1]:{port}"
    # no throughput probe: half a minute of the model server that this test does not look at
    first = crashing.serve(data_dir, port, "--host", "::", "--no-probe")
    second = None
    try:
        health = crashing.wait_healthy(first, url, 900, token)
        (base,) = [s for s in health["backend"]["servers"] if s["kind"] == "managed"]
        assert base["state"] == "up"
        started = crashing.descendants(first.pid)
        vllm = base["pid"]
        assert vllm in started and len(started) >= 3, started  # launcher, engine core, worker(s)
        sessions = {crashing.process_table()[p][1] for p in started}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
            assert client.get("/api/v1/me").status_code == 200  # a keep-alive connection...
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        # ...which the dead studio's side closed first: it sits in TIME-WAIT on the studio's port
        left, waited = crashing.wait_all_gone(started, sessions, GONE_WITHIN_S)
        assert not left, f"still alive {waited:.1f} s after the kill: {left}"

        weights = str(data_dir / "models" / "smollm2-135m-instruct")  # the base the first start registered
        external = ["--backend-url", live_studio.studio.server.url, "--model", weights, "--no-probe"]
        second = crashing.serve(data_dir, port, "--host", "::", *external)
        health = crashing.wait_healthy(second, url, 120, token)
        assert health["studio"] == "ok" and second.poll() is None
        assert crashing.stop(second) == -signal.SIGTERM
        log = crashing.log_of(data_dir, port)
        assert "already in use" not in log and "Traceback" not in log, log[-3000:]
        assert f"Preference Studio is ready: open http://[::]:{port}/" in log
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def test_kill_9_during_concurrent_judgments_loses_no_acknowledged_judgment(
    live_studio: LiveStudio, tmp_path: Path
) -> None:
    """16 annotators judge over REST while the studio is killed three times; each restart on the
    same port is immediate. In the end every task is judged exactly k times, every acknowledged
    judgment is stored once, and no judged assignment is left `open`. (The studio uses the
    session's vLLM as an external server, so that a restart does not reload a model.)"""
    data_dir = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    backend = ["--backend-url", live_studio.studio.server.url, "--no-ui"]
    proc = crashing.serve(data_dir, port, *backend)  # first start: registers the model, the admin
    crashing.wait_healthy(proc, url, 300)
    assert crashing.stop(proc) == -signal.SIGTERM
    store = Store(data_dir / "studio.duckdb")
    k, tasks = 2, 500
    seed_campaign(store, "crash", prompts=tasks, n=2, overlap=k)
    tokens = list(make_users(store, *((f"ann{i:02d}", "annotator") for i in range(16))).values())
    store.close()

    labeling = crashing.Labeling(port, tokens, "crash")
    restarts = []
    proc = crashing.serve(data_dir, port, *backend)
    try:
        crashing.wait_healthy(proc, url, 300)
        for _ in range(3):
            killed = crashing.run_async(crashing.label_then_kill(labeling, proc, after=200))
            proc.wait()
            proc = crashing.serve(data_dir, port, *backend)  # at once, on the same port
            crashing.wait_healthy(proc, url, 120)
            restarts.append(time.monotonic() - killed)
        crashing.run_async(labeling.run(asyncio.Event(), until_done=True))
        assert crashing.stop(proc) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = crashing.log_of(data_dir, port)
    assert "already in use" not in log, log[-3000:]
    state = crashing.judged_state(data_dir / "studio.duckdb")
    stored = state["judgment_ids"]
    assert len(labeling.acked) == len(set(labeling.acked)) >= 3 * 200
    assert not set(labeling.acked) - set(stored), "acknowledged judgments were lost"
    assert len(stored) == len(set(stored)) == k * tasks
    assert state["tasks"] == tasks and set(state["per_task"].values()) == {k}
    assert state["twice_by_one"] == 0
    assert state["open_judged"] == 0 and state["open"] == 0
    assert max(restarts) < 60, restarts


# ---------------------------------------------------------------- vLLM killed under the studio


def test_sigkill_of_vllm_during_labeling_loses_nothing_and_next_says_it_restarts(
    live_studio: LiveStudio, api: httpx.Client
) -> None:
    store = live_studio.studio.store
    server = live_studio.studio.server
    seed_campaign(store, "vkill", prompts=200, n=2, overlap=2)
    tokens = list(make_users(store, *((f"vkill-ann{i}", "annotator") for i in range(4))).values())
    store.import_prompts("vkill-fresh-set", [crashing_prompt("Name a colour.")], source="test")
    labeling = crashing.Labeling(live_studio.port, tokens, "vkill")
    old_pid = server.pid
    restarts = server.restarts
    os.killpg(old_pid, signal.SIGKILL)
    try:
        deadline = time.monotonic() + 30
        while server.state != "restarting" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.state == "restarting"

        # while it restarts: labeling goes on, sampling says the server is not there, and a campaign
        # whose tasks are not sampled yet says why there is no task
        stop = asyncio.Event()
        threading.Timer(5.0, stop.set).start()
        crashing.run_async(labeling.run(stop))
        assert len(labeling.acked) >= 20 and not labeling.errors, labeling.errors
        made = api.post("/campaigns", json={"name": "vkill-fresh", "prompt_set": "vkill-fresh-set", "n": 2})
        assert made.status_code == 200, made.text
        waiting = api.post("/campaigns/vkill-fresh/next").json()
        assert waiting["task"] is None and waiting["status"] == "restarting", waiting
        assert f"the model server is restarting (restart {restarts + 1})" in waiting["note"]
        down = api.post("/sample", json={"prompt": "Still there?", "n": 1, "max_tokens": 8})
        assert down.status_code == 503, down.text

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not (
            server.restarts == restarts + 1 and server.state == "ready"
        ):
            time.sleep(1)
        assert server.state == "ready" and server.pid != old_pid
        again = api.post("/sample", json={"prompt": "Still there?", "n": 1, "max_tokens": 8})
        assert again.status_code == 200, again.text
        servers = api.get("/health").json()["backend"]["servers"]
        errors = [s["last_error"] or "" for s in servers if s["pid"] == server.pid]
        assert any("exited unexpectedly" in e for e in errors), servers
        deadline = time.monotonic() + 300
        while (answer := api.post("/campaigns/vkill-fresh/next").json())["task"] is None:
            assert time.monotonic() < deadline, answer
            time.sleep(1)
        stored = {r["id"] for r in store.query("SELECT id FROM judgments WHERE campaign = 'vkill'")}
        assert set(labeling.acked) <= stored
    finally:  # the session's studio serves the tests after this one: leave it serving
        deadline = time.monotonic() + 600
        while server.state != "ready" and time.monotonic() < deadline:
            time.sleep(1)


def crashing_prompt(text: str) -> object:
    from studio.importer import messages_hash
    from studio.store import ImportedPrompt

    msgs = [{"role": "user", "content": text}]
    return ImportedPrompt("row 1", msgs, messages_hash(msgs))


# ---------------------------------------------------------------- trainers


@pytest.fixture()
def training_data(model_cache: Path, tmp_path: Path) -> Iterator[Path]:
    """A data dir with easy judgments and a tiny parent model (its trainer loads in seconds)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    parent = tiny_model(tmp_path / "tiny", model_cache / "smollm2-135m-instruct")
    store = Store(data_dir / "studio.duckdb")
    store.register_model_version("base", path=str(parent), content_hash="t" * 64, source="test")
    from studio.campaigns import ensure_policy_alias

    ensure_policy_alias(store, "base")
    seed_easy_judgments(store, n=12)
    store.close()
    yield data_dir


def wait_for(condition: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_sigkill_of_a_trainer_fails_its_run_naming_the_signal_and_registers_nothing(
    training_data: Path,
) -> None:
    store = Store(training_data / "studio.duckdb")
    registered: list[str] = []
    runner = Runner(store, training_data, lambda *a: registered.append("x") or "x")
    run = training.submit_run(store, training_data, stage="dpo", created_by="eng", steps=10_000)
    versions = store.count("model_versions")
    runner.start()
    try:
        wait_for(lambda: runner._procs.get(run["id"]) is not None, 120, "the trainer never started")
        trainer = runner._procs[run["id"]].pid
        metrics = Path(run["output_dir"]) / "1-dpo" / "metrics.jsonl"
        wait_for(metrics.exists, 300, "the trainer never reported a step")
        group = crashing.descendants(trainer) | {trainer}
        os.kill(trainer, signal.SIGKILL)
        wait_for(lambda: training.get_run(store, run["id"])["status"] != "running", 60, "still running")
    finally:
        runner.stop()
    done = training.get_run(store, run["id"])
    assert done["status"] == "failed"
    assert done["reason"].startswith("stage dpo was killed by SIGKILL"), done["reason"]
    assert registered == [] and done["versions"] == [] and store.count("model_versions") == versions
    assert crashing.wait_all_gone(group, set(), GONE_WITHIN_S)[0] == []
    store.close()


# The studio's stand-in: the real training runner on the data dir, printing its trainer's pid.
RUNNER = """
import sys, time
from pathlib import Path
from studio import training
from studio.jobs import Runner
from studio.store import Store
data = Path(sys.argv[1])
store = Store(data / "studio.duckdb")
runner = Runner(store, data, lambda *a: "x")
run = training.submit_run(store, data, stage="dpo", created_by="eng", steps=10_000)
runner.start()
while run["id"] not in runner._procs:
    time.sleep(0.1)
metrics = Path(run["output_dir"]) / "1-dpo" / "metrics.jsonl"
while not metrics.exists():
    time.sleep(0.1)
print(runner._procs[run["id"]].pid, flush=True)
time.sleep(600)
"""


def test_kill_9_of_the_studio_takes_a_running_trainer_and_its_children_down(training_data: Path) -> None:
    harness = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(RUNNER), str(training_data)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        trainer = int(harness.stdout.readline())
        group = crashing.descendants(harness.pid)
        assert trainer in group and os.getpgid(trainer) == trainer  # it leads its own group
        os.killpg(harness.pid, signal.SIGKILL)
        harness.wait()
        left, waited = crashing.wait_all_gone(group, {trainer}, GONE_WITHIN_S)
        assert not left, f"still alive {waited:.1f} s after the kill: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(harness.pid, signal.SIGKILL)


# ---------------------------------------------------------------- a full disk


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MB tmpfs mounted for the test (needs root and mount; skipped, saying why, without)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs to fill ({done.stderr.strip() or 'mount failed'}); run as root"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> Path:
    """Write a file until the file system is full, to the last block."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_refuses_judgments_clearly_loses_nothing_and_recovers(small_disk: Path) -> None:
    data_dir = small_disk / "data"
    with NoModelStudio(data_dir) as studio:
        store = studio.studio.store
        seed_campaign(store, "disk", prompts=60, n=2, overlap=1)
        token = make_users(store, ("disk-ann", "annotator"))["disk-ann"]
        client = httpx.Client(
            base_url=f"{studio.url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=60
        )

        def judge() -> httpx.Response:
            task = client.post("/campaigns/disk/next").json()["task"]
            return client.post("/judgments", json={"assignment_id": task["assignment_id"], "ranks": [1, 2]})

        acked = [judge().json()["judgment"]["id"] for _ in range(10)]
        filler = fill(small_disk)
        # A write that still fits in the log file's last page may succeed (and is then stored);
        # one that needs a new block is refused.
        refused = []
        for _ in range(50):
            resp = judge()
            if resp.status_code == 200:
                acked.append(resp.json()["judgment"]["id"])
                continue
            assert resp.status_code == 507, resp.text
            assert "the disk under the studio's data directory is full" in resp.json()["detail"]
            refused.append(resp)
            if len(refused) == 5:
                break
        assert len(refused) == 5
        assert store.count("judgments") == len(acked)  # nothing half-stored, nothing acknowledged lost
        filler.unlink()  # space is back: judging works again, with no restart
        acked += [judge().json()["judgment"]["id"] for _ in range(10)]
        assert store.count("judgments") == len(acked)
        client.close()
    # and after a restart (the write-ahead log replayed), every acknowledged judgment is there once
    store = Store(data_dir / "studio.duckdb")
    stored = [r["id"] for r in store.query("SELECT id FROM judgments")]
    store.close()
    assert sorted(stored) == sorted(acked) and len(acked) >= 20
