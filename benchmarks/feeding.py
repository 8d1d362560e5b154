"""Are annotators kept fed? Simulated annotators over HTTP against a real studio on cold campaigns.

The studio runs as `studio serve` does (its own process: managed vLLM, the task sampler, the
REST API, the real DuckDB file). For each team size a new campaign starts cold (no task
sampled), and that many simulated annotators (asyncio, one process) join it within the first
10 s. Each asks for a task, thinks 20-40 s (uniform), submits a ranking with `next=true` and
so asks for the next one; when none is ready it polls every second until one is. The phase
ends on time: one whose thinking would run past the end stops there. At the end each skips
the task it holds (it leaves), so the next phase's campaign does not count them.

Reported per team: the share of next-task requests answered with a task ready (the first
ask of each task, not the polls), the same share after the first minute (warm), waits when
starved, and tasks per minute over the phase as sampled, handed out and judged. At the end
of the phase, before anyone skips: what the labeling pool could hand out then (`pool_ready`:
tasks with a free place), how many annotators held a task or waited for one, and the
sampler's own view (its `ready` is the same count as of its last round; its supply is over
its last 120 s). The largest team kept at least 95% fed is the answer to "how many
annotators does this machine feed".

    python benchmarks/feeding.py [--teams 10,20,30,40] [--seconds 180] [--n 4] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOPICS = [
    "the sea",
    "a city at night",
    "learning to cook",
    "a first job",
    "the moon",
    "trains",
    "winter",
    "friendship",
    "a small garden",
    "the history of bread",
    "rain",
    "a lost key",
    "bicycles",
    "the desert",
    "a library",
    "music practice",
    "volcanoes",
    "a market",
    "coffee",
    "mountains",
]
ASKS = [
    "Write three sentences about {}.", "Explain {} to a child.", "Give two facts about {}.",
    "Describe {} in a short paragraph.", "Write a four-line poem about {}.",
    "List three questions someone might ask about {}.", "Tell a very short story about {}.",
    "What is interesting about {}?", "Summarise what people like about {}.",
    "Give one tip related to {}.",
]  # fmt: skip


def prompts(count: int) -> list[str]:
    texts = [ask.format(topic) for topic in TOPICS for ask in ASKS]
    random.Random(0).shuffle(texts)
    return [
        f"{t} (#{i})" if i >= len(texts) else t
        for i, t in enumerate((texts * (count // len(texts) + 1))[:count])
    ]


THINK_S = (20.0, 40.0)  # seconds an annotator spends on a task (uniform)
POLL_S = 1.0  # how often a starved annotator asks again
JOIN_S = 10.0  # the team joins within this many seconds of the campaign's start
WARM_S = 60.0  # asks after this are "warm"


class Annotator:
    def __init__(self, client, campaign: str, stop_at: float, observed: asyncio.Event, log: dict):
        self.client, self.campaign, self.stop_at, self.log = client, campaign, stop_at, log
        self.observed = observed  # set once the end's views are taken
        self.state = "arriving"  # then "holding" or "waiting"

    async def ask(self, task: dict | None, started: float) -> dict | None:
        """Record whether a task was ready at the first ask; poll until one is (or time is up)."""
        self.log["asks"].append((time.monotonic() - started, task is not None))
        waited = time.monotonic()
        self.state = "waiting"
        while task is None and time.monotonic() < self.stop_at:
            await asyncio.sleep(POLL_S)
            if time.monotonic() >= self.stop_at:  # a task taken now would count after the end's views
                break
            r = await self.client.post(f"/api/v1/campaigns/{self.campaign}/next")
            task = r.json()["task"]
        if task is not None:
            self.state = "holding"
            self.log["handed"] += 1
            if self.log["asks"][-1][1] is False:
                self.log["waits"].append(time.monotonic() - waited)
        return task

    async def run(self, delay: float, started: float) -> None:
        await asyncio.sleep(delay)
        r = await self.client.post(f"/api/v1/campaigns/{self.campaign}/next")
        task = await self.ask(r.json()["task"], started)
        while task is not None and time.monotonic() < self.stop_at:
            shown = time.time()
            think = random.uniform(*THINK_S)
            if time.monotonic() + think >= self.stop_at:
                # Its judgment would come after the end: wait for the end, not past it. (Sleeping
                # out the whole think time kept the phase open up to 40 s longer, with nobody
                # asking while the sampler kept filling the buffer.)
                await asyncio.sleep(max(self.stop_at - time.monotonic(), 0.0))
                break
            await asyncio.sleep(think)
            n = len(task["completions"])
            body = {
                "assignment_id": task["assignment_id"],
                "ranks": random.sample(range(1, n + 1), n),
                "shown_at": shown,
                "next": True,
            }
            r = await self.client.post("/api/v1/judgments", json=body)
            r.raise_for_status()
            self.log["judgments"] += 1
            task = await self.ask(r.json()["next"]["task"], started)
        await self.observed.wait()  # the end's views are taken before anyone leaves
        if task is not None:  # leave: the held task goes back, and this person stops counting
            await self.client.post(f"/api/v1/assignments/{task['assignment_id']}/skip")


async def phase(url: str, admin: str, tokens: list[str], campaign: str, args: argparse.Namespace) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {admin}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as adm:
        body = {"name": campaign, "prompt_set": "feed", "n": args.n, "max_tokens": args.max_tokens}
        made = await adm.post("/api/v1/campaigns", json=body)
        if made.status_code != 200:
            raise SystemExit(f"creating campaign {campaign}: HTTP {made.status_code}: {made.text[:500]}")
        log: dict = {"asks": [], "waits": [], "judgments": 0, "handed": 0}
        started = time.monotonic()
        stop_at = started + args.seconds
        observed = asyncio.Event()
        end: dict = {}

        async def observe(people: list[Annotator]) -> None:
            """The views at the end, all at one moment: before anyone skips (which would
            give the held tasks back) and before the sampler adds to a buffer nobody draws on."""
            try:
                await asyncio.sleep(max(stop_at - time.monotonic(), 0.0))
                states = [p.state for p in people]
                stats = (await adm.get(f"/api/v1/campaigns/{campaign}")).json()["progress"]
                end["view"] = (await adm.get("/api/v1/sampler")).json()
                end["pool"] = {
                    "pool_ready": stats["ready"],  # tasks with a free place: what could be handed out now
                    "tasks_sampled": stats["tasks_sampled"],
                    "judgments": stats["judgments"],
                    "holding": states.count("holding"),
                    "waiting": states.count("waiting"),
                }
            finally:
                observed.set()

        clients = [
            httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {t}"}, timeout=120)
            for t in tokens
        ]
        try:
            people = [Annotator(c, campaign, stop_at, observed, log) for c in clients]
            joins = [p.run(random.uniform(0, JOIN_S), started) for p in people]
            await asyncio.gather(observe(people), *joins)
        finally:
            for c in clients:
                await c.aclose()
    asks = log["asks"]
    warm = [ok for t, ok in asks if t >= WARM_S]
    waits = sorted(log["waits"])
    minutes = args.seconds / 60
    view, pool = end["view"], end["pool"]
    return {
        "annotators": len(tokens),
        "asks": len(asks),
        "fed_share": sum(ok for _, ok in asks) / max(len(asks), 1),
        "fed_share_after_60s": sum(warm) / max(len(warm), 1),
        "judgments_per_min": log["judgments"] / minutes,
        "starved_waits_s": {
            "count": len(waits),
            "median": round(statistics.median(waits), 1) if waits else None,
            "max": round(waits[-1], 1) if waits else None,
        },
        # one window (the phase) for all three; the campaign is new, so all its tasks are this phase's
        "tasks_per_min": {
            "sampled": round(pool["tasks_sampled"] / minutes, 2),
            "handed_out": round(log["handed"] / minutes, 2),
            "judged": round(log["judgments"] / minutes, 2),
        },
        "at_end": pool,
        "sampler": {"in_flight": view["in_flight_target"], "campaign": view["campaigns"].get(campaign)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teams", default="10,20,30,40")
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--lora", action="store_true", help="serve with runtime LoRA (the studio's default)")
    args = parser.parse_args()
    teams = [int(x) for x in args.teams.split(",")]

    import httpx

    from studio.store import Store
    from tests.helpers import make_users

    with tempfile.TemporaryDirectory(prefix="bench-feeding-") as tmp:
        data_dir = Path(tmp)
        store = Store(data_dir / "studio.duckdb")
        tokens = make_users(
            store, ("boss", "admin"), *[(f"ann{i:03d}", "annotator") for i in range(max(teams))]
        )
        store.close()
        admin = tokens.pop("boss")
        people = list(tokens.values())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "studio.cli", "serve", "--data-dir", tmp, "--port", str(port), "--no-ui"]
        server = subprocess.Popen(
            cmd + ([] if args.lora else ["--no-lora"]),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=open(data_dir / "server.log", "wb"),  # noqa: SIM115 (closed with the process)
        )
        url = f"http://127.0.0.1:{port}"
        results = []
        try:
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None:
                    raise SystemExit((data_dir / "server.log").read_text()[-3000:])
                time.sleep(1)
            auth = {"Authorization": f"Bearer {admin}"}
            records = [{"prompt": p} for p in prompts(1000)]
            imported = httpx.post(
                f"{url}/api/v1/prompt-sets/feed/prompts", json={"records": records}, headers=auth, timeout=120
            )
            if imported.status_code != 200:
                raise SystemExit(f"importing prompts: HTTP {imported.status_code}: {imported.text[:500]}")
            while httpx.get(f"{url}/api/v1/sampler", headers=auth, timeout=10).json()["curve"] is None:
                time.sleep(2)  # the start-up throughput probe runs first
            curve = httpx.get(f"{url}/api/v1/sampler", headers=auth, timeout=10).json()
            for size in teams:
                result = asyncio.run(phase(url, admin, people[:size], f"feed{size}", args))
                print(json.dumps(result), flush=True)
                results.append(result)
        except BaseException:
            print((data_dir / "server.log").read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            server.terminate()
            server.wait(60)
    fed = [r["annotators"] for r in results if r["fed_share"] >= 0.95]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "workload": {"n": args.n, "max_tokens": args.max_tokens, "seconds": args.seconds, "lora": args.lora},
        "probe": {"in_flight": curve["in_flight_target"], "curve": curve["curve"]},
        "teams": results,
        "largest_team_95_fed": max(fed) if fed else None,
    }
    print(json.dumps(report, indent=2))
    for r in results:
        warm = f"{r['fed_share_after_60s']:.0%} after the first minute"
        flow = r["tasks_per_min"]
        rate = f"tasks/min sampled {flow['sampled']:.1f}, handed out {flow['handed_out']:.1f}"
        rate += f", judged {flow['judged']:.1f}"
        end = r["at_end"]
        ready = f"at the end {end['pool_ready']} ready, {end['holding']} holding, {end['waiting']} waiting"
        print(f"{r['annotators']:>4} annotators: {r['fed_share']:.0%} fed ({warm}); {rate}; {ready}")
    print(f"largest team kept >= 95% fed: {report['largest_team_95_fed']}")


if __name__ == "__main__":
    main()
