"""Reliability in one run: crashes, restarts and fuzzing, against the real studio.

1. A studio with its own vLLM (`studio serve`, the packaged model): vLLM's process group is
   killed (SIGKILL) under it; measured: the time until a sample is served again.
2. A studio on that vLLM as an external server (so that its restarts load no model), judged by
   16 annotators over REST and killed with kill -9 three times, each time restarted at once on
   the same port; then judged to the end. Counted: acknowledged judgments, those lost, those
   stored twice, tasks not judged exactly k times, judged assignments left `open`; measured:
   the time from each crash to a healthy restart.
3. The first studio killed with kill -9: the time until every process it started is gone, and
   from the crash to a healthy restart on the same port (its vLLM loads the model again).
4. The REST fuzzers of tests/fuzz_rest.py against a studio without a model server: answers
   by status, 5xx among them, broken promises.

    python benchmarks/reliability.py [--annotators 16] [--crashes 3] [--fuzz-examples 100]

Run it alone (under the heavy-job lock): it starts vLLM three times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import crashing, fuzz_rest  # noqa: E402
from tests.conftest import NoModelStudio, data_dir_with_model, free_port  # noqa: E402


def vllm_kill(url: str, token: str) -> dict:
    """Kill the managed vLLM's process group; seconds until /sample answers again."""
    headers = {"Authorization": f"Bearer {token}"}
    health = httpx.get(f"{url}/api/v1/health", headers=headers).json()
    base = next(s for s in health["backend"]["servers"] if s["kind"] == "managed")
    os.killpg(base["pid"], signal.SIGKILL)
    killed = time.monotonic()
    statuses: dict[int, int] = {}
    while time.monotonic() - killed < 900:
        try:
            body = {"prompt": "Hi", "n": 1, "max_tokens": 4}
            resp = httpx.post(f"{url}/api/v1/sample", json=body, headers=headers, timeout=30)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            if resp.status_code == 200:
                return {"seconds_to_serving_again": round(time.monotonic() - killed, 1), "answers": statuses}
        except httpx.HTTPError:
            statuses[0] = statuses.get(0, 0) + 1
        time.sleep(0.5)
    raise SystemExit("vLLM did not come back in 900 s")


def judgment_crashes(root: Path, backend_url: str, annotators: int, crashes: int) -> dict:
    from studio.store import Store
    from tests.helpers import make_users, seed_campaign

    data_dir, port = root / "labeling", free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--backend-url", backend_url, "--no-ui"]
    proc = crashing.serve(data_dir, port, *args)
    crashing.wait_healthy(proc, url, 300)
    crashing.stop(proc)
    k, tasks = 2, 1000
    store = Store(data_dir / "studio.duckdb")
    seed_campaign(store, "crash", prompts=tasks, n=2, overlap=k)
    tokens = list(make_users(store, *((f"ann{i:02d}", "annotator") for i in range(annotators))).values())
    store.close()
    labeling = crashing.Labeling(port, tokens, "crash")
    restarts = []
    proc = crashing.serve(data_dir, port, *args)
    crashing.wait_healthy(proc, url, 300)
    for _ in range(crashes):
        killed = asyncio.run(crashing.label_then_kill(labeling, proc, after=300))
        proc.wait()
        proc = crashing.serve(data_dir, port, *args)
        crashing.wait_healthy(proc, url, 120)
        restarts.append(round(time.monotonic() - killed, 2))
    asyncio.run(labeling.run(asyncio.Event(), until_done=True))
    crashing.stop(proc)
    state = crashing.judged_state(data_dir / "studio.duckdb")
    acked, stored = set(labeling.acked), state["judgment_ids"]
    return {
        "annotators": annotators,
        "crashes": crashes,
        "acknowledged": len(acked),
        "lost": len(acked - set(stored)),
        "stored_twice": len(stored) - len(set(stored)),
        "tasks_not_judged_k_times": sum(1 for n in state["per_task"].values() if n != k)
        + (state["tasks"] - len(state["per_task"])),
        "judged_assignments_left_open": state["open_judged"],
        "seconds_crash_to_healthy_restart": restarts,
        "refused_port_on_restart": "already in use" in crashing.log_of(data_dir, port),
    }


def studio_crash(proc, data_dir: Path, port: int, url: str, token: str) -> dict:
    started = crashing.descendants(proc.pid)
    table = crashing.process_table()
    sessions = {table[p][1] for p in started if p in table}
    with httpx.Client(base_url=url) as keep_alive:  # a connection the crash leaves in TIME-WAIT
        keep_alive.get("/api/v1/health")
        os.killpg(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait()
    left, gone_after = crashing.wait_all_gone(started, sessions, 60)
    again = crashing.serve(data_dir, port)
    crashing.wait_healthy(again, url, 900, token)
    restart = time.monotonic() - killed
    crashing.stop(again)
    return {
        "processes_started": len(started),
        "left_after_60_s": left,
        "seconds_until_all_gone": round(gone_after, 2),
        "seconds_crash_to_healthy_restart_with_vllm": round(restart, 1),
        "refused_port_on_restart": "already in use" in crashing.log_of(data_dir, port),
    }


def fuzz(root: Path, examples: int) -> dict:
    recorder = fuzz_rest.Recorder(strict=False)
    with NoModelStudio(root / "fuzz") as studio:
        store = studio.studio.store
        env = fuzz_rest.Env(studio.url, store, fuzz_rest.prepare(store))
        for _, fuzzer in sorted(fuzz_rest.FUZZERS.items()):
            fuzzer(env, recorder, examples)
        fuzz_rest.round_trip(env, recorder, max(5, examples // 10))
        env.client.close()
    statuses = dict(sorted(recorder.statuses.items()))
    return {
        "requests": sum(statuses.values()),
        "by_status": statuses,
        "5xx": sum(n for s, n in statuses.items() if s >= 500),
        "5xx_other_than_no_model_server_503": recorder.server_errors,
        "problems": recorder.problems[:10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotators", type=int, default=16)
    parser.add_argument("--crashes", type=int, default=3)
    parser.add_argument("--fuzz-examples", type=int, default=100)
    args = parser.parse_args()
    from studio.model_prep import prepare_default_model
    from studio.users import local_token

    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as tmp:
        root = Path(tmp)
        prepare_default_model(root / "cache")
        data_dir = data_dir_with_model(root / "cache" / "models", root / "managed")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = crashing.serve(data_dir, port)
        try:
            started = time.monotonic()
            crashing.wait_healthy(proc, url, 900)
            report["seconds_cold_start_with_vllm"] = round(time.monotonic() - started, 1)
            token = local_token(data_dir)
            report["vllm_kill"] = vllm_kill(url, token)
            backend = httpx.get(f"{url}/api/v1/health", headers={"Authorization": f"Bearer {token}"}).json()
            report["kill_9_under_judgments"] = judgment_crashes(
                root,
                next(s["url"] for s in backend["backend"]["servers"] if s["kind"] == "managed"),
                args.annotators,
                args.crashes,
            )
            report["kill_9_of_the_studio"] = studio_crash(proc, data_dir, port, url, token)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        report["fuzzers"] = fuzz(root, args.fuzz_examples)
    print(json.dumps(report, indent=2))
    crash, fz = report["kill_9_under_judgments"], report["fuzzers"]
    with_vllm = report["kill_9_of_the_studio"]["seconds_crash_to_healthy_restart_with_vllm"]
    print(
        f"\n{crash['crashes']} kill -9 crashes under {crash['annotators']} annotators: "
        f"{crash['acknowledged']} judgments acknowledged, {crash['lost']} lost, "
        f"{crash['stored_twice']} stored twice; crash -> healthy restart "
        f"{crash['seconds_crash_to_healthy_restart']} s (with vLLM loading: {with_vllm} s); "
        f"vLLM kill -> serving {report['vllm_kill']['seconds_to_serving_again']} s; "
        f"fuzzers: {fz['5xx']} 5xx in {fz['requests']} requests "
        f"({fz['5xx_other_than_no_model_server_503']} not the no-model-server 503)"
    )


if __name__ == "__main__":
    main()
