"""Start a real `studio serve` as a process, kill it, and drive annotators at it over REST.

Shared by tests/test_crash.py and benchmarks/reliability.py. The studio runs as its own process
(`python -m studio.cli serve`, in a session of its own), so that a kill -9 is a real one: no
cleanup code of the studio runs, the kernel closes its sockets and its file lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
STUDIO = [sys.executable, "-m", "studio.cli"]
IDLE_S = 10.0  # judging "to the end" stops when no task came for this long
sys.path.insert(0, str(ROOT))

from benchmarks.annotate import RawClient  # noqa: E402  (the benchmark's lean HTTP/1.1 client)


def serve(data_dir: Path, port: int, *args: str, log: Path | None = None) -> subprocess.Popen:
    """`studio serve` on `port`, in a new session (its process group is the test's to kill)."""
    data_dir.mkdir(parents=True, exist_ok=True)  # a first start: the studio makes the rest
    out = (log or data_dir / f"serve-{port}.log").open("ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "studio.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            *args,
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def wait_healthy(
    proc: subprocess.Popen, url: str, timeout: float, token: str | None = None
) -> dict[str, Any]:
    """Poll GET /health until it answers 200 (with the detail when a token is given)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"studio serve exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            resp = httpx.get(f"{url}/api/v1/health", headers=headers, timeout=2)
            if resp.status_code == 200:
                return resp.json()
        time.sleep(0.1)
    raise AssertionError(f"{url} did not become healthy in {timeout:.0f} s")


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, state) of every process this user can see."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                table[int(entry.name)] = (int(fields[1]), int(fields[3]), fields[0])
    return table


def descendants(pid: int) -> set[int]:
    """The processes started by `pid`, at any depth (its own process group and the sessions its
    children lead)."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def living(pids: Iterable[int], sessions: Iterable[int] = ()) -> list[int]:
    """Which of `pids`, and of any process in `sessions`, still live (zombies count as gone)."""
    table = process_table()
    wanted = set(sessions)
    return sorted(
        p for p, (_, sid, state) in table.items() if state != "Z" and (p in set(pids) or sid in wanted)
    )


def wait_all_gone(pids: set[int], sessions: set[int], seconds: float) -> tuple[list[int], float]:
    """Wait until none of them lives; (those still alive, seconds waited)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        left = living(pids, sessions)
        if not left:
            return [], time.monotonic() - started
        time.sleep(0.05)
    return living(pids, sessions), time.monotonic() - started


def add_user(data_dir: Path, name: str, role: str, password: str = "correct-horse-battery") -> str:
    """`studio users add` on the database itself (no studio running); returns the token."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "studio.cli",
            "users",
            "add",
            name,
            "--role",
            role,
            "--data-dir",
            str(data_dir),
        ],
        input=password + "\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.rsplit(": ", 1)[1].strip()


@dataclass
class Labeling:
    """Annotators judging one campaign over REST, each on one keep-alive connection. Every
    acknowledged judgment id is kept, in the order the answers came."""

    port: int
    tokens: list[str]
    campaign: str
    acked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    async def annotator(self, token: str, stop: asyncio.Event, until_done: bool) -> None:
        client = RawClient(self.port, token)
        try:
            task = (await client.post(f"/api/v1/campaigns/{self.campaign}/next"))["task"]
            idle_since = time.monotonic()
            while not stop.is_set():
                if task is None:
                    # others may still hold the last tasks: ask again, until nothing came for a while
                    if not until_done or time.monotonic() - idle_since > IDLE_S:
                        return
                    await asyncio.sleep(0.2)
                    answer = await client.post(f"/api/v1/campaigns/{self.campaign}/next")
                    if answer["status"] == "done" and answer["task"] is None:
                        return
                    task = answer["task"]
                    continue
                idle_since = time.monotonic()
                n = len(task["completions"])
                body = {"assignment_id": task["assignment_id"], "ranks": random.sample(range(1, n + 1), n)}
                data = await client.post("/api/v1/judgments", {**body, "next": True})
                self.acked.append(data["judgment"]["id"])
                task = data["next"]["task"]
        except (OSError, asyncio.IncompleteReadError, RuntimeError, ValueError, StopIteration) as exc:
            if not stop.is_set():
                self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    async def run(self, stop: asyncio.Event, until_done: bool = False) -> None:
        await asyncio.gather(*[self.annotator(t, stop, until_done) for t in self.tokens])


def run_async(coro: Any) -> Any:
    """`asyncio.run(coro)` on a thread of its own: in the suite, Playwright's sync API (the
    session's browser) keeps an event loop running on the test's thread, where asyncio.run fails."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def label_then_kill(labeling: Labeling, proc: subprocess.Popen, after: int) -> float:
    """Label until `after` more judgments are acknowledged, then kill -9 the studio mid-flight.
    Returns the time of the kill (time.monotonic())."""
    stop = asyncio.Event()
    target = len(labeling.acked) + after
    runner = asyncio.ensure_future(labeling.run(stop))
    while len(labeling.acked) < target and not runner.done():
        await asyncio.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the studio's own group; vLLM and trainers lead their own
    killed = time.monotonic()
    stop.set()
    await runner
    return killed


def judged_state(db: Path) -> dict[str, Any]:
    """The labeling state of a stopped studio's database, read directly."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:

        def rows(sql: str) -> list[tuple]:
            return con.execute(sql).fetchall()

        return {
            "judgment_ids": [r[0] for r in rows("SELECT id FROM judgments")],
            "per_task": dict(rows("SELECT task_id, count(*) FROM judgments GROUP BY task_id")),
            "tasks": rows("SELECT count(*) FROM tasks")[0][0],
            "twice_by_one": rows(
                "SELECT count(*) FROM (SELECT task_id, annotator FROM judgments"
                " GROUP BY ALL HAVING count(*) > 1)"
            )[0][0],
            "open_judged": rows(
                "SELECT count(*) FROM assignments a JOIN judgments j ON j.assignment_id = a.id"
                " WHERE a.status = 'open'"
            )[0][0],
            "open": rows("SELECT count(*) FROM assignments WHERE status = 'open'")[0][0],
        }
    finally:
        con.close()


def stop(proc: subprocess.Popen, timeout: float = 120) -> int:
    """A normal stop (SIGTERM, as `kill` sends it), waited for."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(30)


def log_of(data_dir: Path, port: int) -> str:
    path = data_dir / f"serve-{port}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def dump(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
