"""Processes the studio starts die with it, whatever ends it; its port is free again at once.

Fast tests on small real processes; the same against the real studio and vLLM is in
test_crash.py (slow).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from studio.ports import PortError, listen_sockets, port_holder

ROOT = Path(__file__).resolve().parents[1]

# A group leader that starts a child of its own (as vLLM starts its engine core), then waits.
LEADER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""

# The studio's stand-in: spawns the leader the way the studio spawns vLLM and trainers, prints
# the pids, then waits to be killed.
HARNESS = """
import subprocess, sys, time
from studio.serving.vllm_server import die_with_parent
from studio.lifeline import lead_group_and_die_with_parent
cmd = [sys.executable, *sys.argv[2:]]
preexec = lead_group_and_die_with_parent() if sys.argv[1] == "factory" else die_with_parent
leader = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=preexec)
child = int(leader.stdout.readline())
print(leader.pid, child, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def run_harness(tmp_path: Path, preexec: str, *leader_cmd: str) -> tuple[subprocess.Popen, int, int]:
    (tmp_path / "leader.py").write_text(textwrap.dedent(LEADER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    harness = subprocess.Popen(
        [sys.executable, "-c", HARNESS, preexec, *leader_cmd],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    leader, child = map(int, harness.stdout.readline().split())
    return harness, leader, child


@pytest.mark.parametrize("preexec", ["factory", "die_with_parent"])
def test_a_kill_9_of_the_studio_takes_the_whole_child_group_down_at_once(
    tmp_path: Path, preexec: str
) -> None:
    harness, leader, child = run_harness(tmp_path, preexec, "-m", "studio.lifeline", "leader")
    try:
        assert os.getpgid(child) == os.getpgid(leader) == leader  # one group, led by the leader
        time.sleep(0.3)  # the leader's reaper is in place before it starts the child
        harness.kill()
        harness.wait()
        assert wait_gone([leader, child], 3.0) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader, signal.SIGKILL)


def test_without_the_reaper_the_leaders_child_outlives_the_studio(tmp_path: Path) -> None:
    # what the reaper is for: the parent-death signal alone reaches only the leader
    harness, leader, child = run_harness(tmp_path, "factory", str(tmp_path / "leader.py"))
    try:
        time.sleep(0.3)
        harness.kill()
        harness.wait()
        assert wait_gone([leader], 3.0) == []
        assert alive(child), "the leader's child should have outlived it without the reaper"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader, signal.SIGKILL)


def test_a_sigterm_to_the_group_is_still_the_leaders_to_handle(tmp_path: Path) -> None:
    # a normal stop stays graceful: the reaper takes only its own signal
    script = tmp_path / "graceful.py"
    script.write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('graceful', flush=True), sys.exit(0)))\n"
        "print('up', flush=True)\ntime.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "studio.lifeline", "graceful"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout.readline().strip() == "up"
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.stdout.readline().strip() == "graceful" and proc.wait(10) == 0


# ---------------------------------------------------------------- the studio's port


def test_the_port_is_free_again_while_old_connections_sit_in_time_wait() -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server side closes first: its end of the connection goes to TIME-WAIT
    time.sleep(0.1)
    client.close()
    server.close()
    time.sleep(0.1)
    states = Path("/proc/net/tcp").read_text()
    assert f":{port:04X} " in states  # the connection is still there, in TIME-WAIT
    with socket.socket() as plain, pytest.raises(OSError):  # what the old check did
        plain.bind(("127.0.0.1", port))
    sockets = listen_sockets("127.0.0.1", port)
    assert [s.getsockname()[1] for s in sockets] == [port]
    for s in sockets:
        s.close()


def test_a_busy_port_names_the_process_that_holds_it() -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys, time\ns = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "print(s.getsockname()[1], flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(holder.stdout.readline())
        assert port_holder(port).startswith(f"pid {holder.pid} (")
        busy = rf"--port {port}: already in use on 127.0.0.1 by pid {holder.pid} \("
        with pytest.raises(PortError, match=busy):
            listen_sockets("127.0.0.1", port)
    finally:
        holder.kill()
        holder.wait()


def test_ipv6_hosts_and_bad_hosts() -> None:
    sockets = listen_sockets("::", 0)
    assert [s.family for s in sockets] == [socket.AF_INET6]
    for s in sockets:
        s.close()
    with pytest.raises(PortError, match=r"--host 203\.0\.113\.9: not an address of this machine"):
        listen_sockets("203.0.113.9", 0)
    with pytest.raises(PortError, match=r"--host no-such-host\.invalid: not an address"):
        listen_sockets("no-such-host.invalid", 0)


def test_studio_serve_on_a_busy_port_says_who_holds_it_before_loading_anything(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "studio.cli", "serve", "--data-dir", str(tmp_path), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        holder.close()
    assert done.returncode == 1
    assert f"studio: --port {port}: already in use on 127.0.0.1 by pid {os.getpid()} (" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "studio.duckdb").exists()
    assert time.monotonic() - started < 60
    assert json.dumps(done.stdout) == '""'


def test_a_server_started_from_a_short_lived_thread_outlives_that_thread() -> None:
    # The pool starts vLLM servers from run, request and evaluation threads. The parent-death
    # signal follows the forking thread: forked there directly, the server dies with the thread.
    import threading

    from studio import lifeline

    started: dict[str, subprocess.Popen] = {}

    def spawn(key: str, direct: bool) -> None:
        cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
        if direct:
            started[key] = subprocess.Popen(cmd, preexec_fn=lifeline.lead_group_and_die_with_parent())
        else:
            started[key] = lifeline.popen(cmd)

    for key, direct in (("direct", True), ("spawner", False)):
        thread = threading.Thread(target=spawn, args=(key, direct))
        thread.start()
        thread.join()
    try:
        time.sleep(1.0)
        assert started["direct"].poll() is not None, "forked on the ended thread: killed with it"
        assert started["spawner"].poll() is None, "forked on the spawner thread: still running"
    finally:
        for proc in started.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
