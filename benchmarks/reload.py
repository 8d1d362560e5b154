"""From a run's end to the new version answering its first request, with requests flowing.

One studio as `studio serve` starts it (packaged model, runtime LoRA auto: the base is served
without it), requests sent through the studio's sampler by two threads all along (each waits
`--pause` seconds after an answer: 0.5 by default, an annotating team's pace; 0 keeps the
server saturated, which on 2 cores starves a starting vLLM), and, in one run:

- the cold start of a bare vLLM on the base, idle and again while the studio serves the traffic;
- the first adapter: registration (the switch to a server with runtime LoRA, blue/green) until
  it answers its first request;
- a second adapter: a plain hot-load, until it answers (target: at most 3 s);
- a full-weight version: its own vLLM, until it answers (target: at most the cold start + 10%);
- the failed requests among those sent during each (target 0);
- the memory of the managed servers' process groups (RSS and PSS) before, at the peak during,
  and after each.

"A run's end" is the moment the trainer's folder exists and the studio registers it:
`register_stage` calls `Studio.add_adapter` / `Studio.add_full_version`, timed here, then opens
the re-battle campaign (one transaction).

    python benchmarks/reload.py [--threads 2] [--pause 0.5] [--lora-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1024**3
STEPS = ("lora_first_adapter_switch", "lora_hot_load", "full_weights")


def group_memory(pgids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) in bytes of every process in these process groups."""
    rss = pss = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) not in pgids:
                continue
            for line in (proc / "smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return rss, pss


class MemoryWatch:
    """Samples the managed servers' memory every 0.5 s; `mark()` starts a new peak."""

    def __init__(self, pool: object):
        self.pool = pool
        self.peak = (0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> tuple[int, int]:
        pgids = [e.server.pid for e in self.pool.endpoints() if e.server is not None and e.server.pid]  # type: ignore[attr-defined]
        return group_memory(pgids)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            rss, pss = self.now()
            self.peak = (max(self.peak[0], rss), max(self.peak[1], pss))

    def mark(self) -> tuple[int, int]:
        self.peak = now = self.now()
        return now

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def gib(value: int) -> float:
    return round(value / GiB, 2)


def cold_start(model_dir: Path, log: Path) -> float:
    """A bare vLLM on the base, from spawn to its first answer."""
    from studio.serving.client import OpenAIChatBackend, SamplingParams
    from studio.serving.vllm_server import VLLMServer

    server = VLLMServer(model_dir, "base", log, lora=False, max_restarts=0, progress=lambda m: None)
    started = time.perf_counter()
    server.start()
    try:
        with OpenAIChatBackend(server.url) as client:
            client.chat("base", [{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=1))
        return time.perf_counter() - started
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads sending requests all along")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds each thread waits after an answer")
    parser.add_argument(
        "--lora-only",
        action="store_true",
        help="the two adapter steps only (no full-weight version, no cold starts): minutes, not ten",
    )
    args = parser.parse_args()

    from studio.config import Settings
    from studio.model_prep import prepare_default_model
    from studio.runtime import Studio
    from studio.serving.client import SamplingParams
    from tests.helpers import Traffic, random_adapter

    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "pause_s": args.pause,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB)} GiB, "
        f"Python {platform.python_version()}",
    }
    with tempfile.TemporaryDirectory(prefix="bench-reload-") as tmp:
        data = Path(tmp) / "data"
        base = prepare_default_model(data).path
        # the trainers' folders, written before the clock starts (the run has ended)
        lora_a = random_adapter(base, Path(tmp) / "lora-a", seed=1)
        lora_b = random_adapter(base, Path(tmp) / "lora-b", seed=2)
        full = Path(tmp) / "full"
        shutil.copytree(base, full)
        if not args.lora_only:
            report["cold_start_idle_s"] = round(cold_start(base, Path(tmp) / "cold.log"), 1)
            print(f"cold start (idle): {report['cold_start_idle_s']} s", flush=True)

        started = time.perf_counter()
        studio = Studio(Settings(data_dir=data, ui=False, watch_interval=1.0))
        studio.start()
        report["studio_start_s"] = round(time.perf_counter() - started, 1)
        params = SamplingParams(max_tokens=16, temperature=0.8)
        messages = [{"role": "user", "content": "Name a colour."}]

        def send(model: str) -> object:
            return studio.sampler.sample(messages, params, version=model)

        def first_answer(name: str) -> float:
            while True:  # the first request that answers (it is served once registered)
                try:
                    send(name)
                    return time.perf_counter()
                except Exception as exc:
                    print(f"  {name} not answering yet: {exc}", flush=True)
                    time.sleep(0.05)

        try:
            with (
                MemoryWatch(studio.pool) as memory,
                Traffic(send, ["base"], threads=args.threads, pause=args.pause) as traffic,
            ):
                traffic.wait_for("base", 4)
                steps = [
                    (
                        "lora_first_adapter_switch",
                        lambda: studio.add_adapter("bench-a", lora_a, "bench"),
                        "bench-a",
                    ),
                    ("lora_hot_load", lambda: studio.add_adapter("bench-b", lora_b, "bench"), "bench-b"),
                    (
                        "full_weights",
                        lambda: studio.add_full_version("bench-full", full, "bench"),
                        "bench-full",
                    ),
                ]
                for key, register, name in steps[:2] if args.lora_only else steps:
                    # The switch to runtime LoRA starts a throughput probe in the background (30 s
                    # of requests in flight, new sampling paused): a trainer's next version comes
                    # minutes later, so each step starts once the probe is over
                    waited = time.perf_counter()
                    while studio.task_sampler.measuring:
                        time.sleep(0.2)
                    if time.perf_counter() - waited > 1:
                        print(f"  waited {time.perf_counter() - waited:.0f} s for the probe", flush=True)
                    failed_before = len(traffic.failed)
                    sent_before = sum(traffic.ok.values()) + failed_before
                    before = memory.mark()
                    t0 = time.perf_counter()
                    register()
                    t1 = first_answer(name)
                    traffic.models.append(name)
                    traffic.wait_for(name, 2)
                    after = memory.now()
                    report[key] = {
                        "to_first_answer_s": round(t1 - t0, 2),
                        "requests_during": sum(traffic.ok.values()) + len(traffic.failed) - sent_before,
                        "failed_during": len(traffic.failed) - failed_before,
                        "rss_gib": {
                            "before": gib(before[0]),
                            "peak": gib(memory.peak[0]),
                            "after": gib(after[0]),
                        },
                        "pss_gib": {
                            "before": gib(before[1]),
                            "peak": gib(memory.peak[1]),
                            "after": gib(after[1]),
                        },
                    }
                    print(key, json.dumps(report[key]), flush=True)
                # the like-for-like reference: a cold start while the studio serves the traffic
                if not args.lora_only:
                    report["cold_start_under_traffic_s"] = round(cold_start(base, Path(tmp) / "cold2.log"), 1)
                report["failures"] = traffic.failed[:5]
                report["answered"] = traffic.ok
        finally:
            studio.stop()
    switch_s = report["lora_first_adapter_switch"]["to_first_answer_s"]
    print(json.dumps(report, indent=2))
    print(
        f"\nLoRA hot-load {report['lora_hot_load']['to_first_answer_s']} s (target <= 3 s); "
        f"first adapter with the switch to runtime LoRA {switch_s} s"
    )
    if args.lora_only:
        return
    full_s = report["full_weights"]["to_first_answer_s"]
    print(
        f"full weights {full_s} s; cold start {report['cold_start_idle_s']} s idle, "
        f"{report['cold_start_under_traffic_s']} s under the same traffic "
        f"(target <= cold start + 10%: {full_s / report['cold_start_under_traffic_s']:.2f}x)\n"
        f"failed requests during the swaps: {sum(report[k]['failed_during'] for k in STEPS)}"
    )


if __name__ == "__main__":
    main()
