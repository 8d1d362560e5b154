"""Data-parallel training and Ray submission on this CPU, in one run.

1. Time per step of the DPO stage (packaged SmolLM2-135M, LoRA, float32) with 1 process and with
   2 processes under `accelerate launch` (gloo): 1 x 4 pairs, 2 x 2 pairs (the same global batch)
   and 2 x 4 pairs (the same batch per process). Per step is taken between the first and the last
   logged step, so process start and model loading are left out; pairs/s is the global batch
   over that.
2. The studio's overhead per Ray-submitted run: from `submit_run` to the run's first metrics line,
   for the same one-step DPO run through the runner with the local launcher and with the ray
   launcher (a local Ray head on loopback), alternated; the overhead is ray minus local.

python benchmarks/scale.py [--steps 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def per_step(metrics: Path) -> float:
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [e["elapsed"] for e in events if e["event"] == "step" and "loss" in e]
    return (steps[-1] - steps[0]) / (len(steps) - 1)


def dpo_steps(snapshot: Path, parent: Path, out: Path, processes: int, batch: int, steps: int) -> float:
    from studio.launchers import stage_command

    args = [
        "--config",
        str(ROOT / "data" / "recipes" / "dpo.yaml"),
        "--snapshot",
        str(snapshot),
        "--parent",
        str(parent),
        "--output",
        str(out),
        "--train.max_steps",
        str(steps),
        "--train.per_device_train_batch_size",
        str(batch),
        "--held_out",
        "0",
    ]
    cmd = stage_command(sys.executable, "dpo", args, processes, accelerate=processes > 1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"dpo with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    return per_step(out / "metrics.jsonl")


def first_metric_line(store: Any, folder: Path, runner: Any, launch: Any, launcher: str) -> float:
    from studio import training

    t0 = time.perf_counter()
    run = training.submit_run(
        store,
        folder,
        stage="dpo",
        created_by="bench",
        campaigns=["easy"],
        steps=1,
        launcher=launcher,
        launch_defaults=launch,
        shared_dir=folder,
    )
    runner.poke()
    metrics = Path(run["output_dir"]) / "1-dpo" / "metrics.jsonl"
    while not (metrics.is_file() and metrics.stat().st_size > 0):
        if training.get_run(store, run["id"])["status"] in ("failed", "cancelled"):
            raise SystemExit(f"{launcher} run failed: {training.get_run(store, run['id'])['reason']}")
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    while training.get_run(store, run["id"])["status"] in ("queued", "running"):
        time.sleep(0.2)
    final = training.get_run(store, run["id"])
    if final["status"] != "succeeded":
        raise SystemExit(f"{launcher} run: {final['status']}: {final['reason']}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="DPO steps per data-parallel run")
    parser.add_argument("--rounds", type=int, default=2, help="local/ray submissions each, alternated")
    args = parser.parse_args()

    from studio.campaigns import ensure_policy_alias
    from studio.jobs import Runner, register_stage
    from studio.launchers import LaunchSettings
    from studio.model_prep import prepare_default_model
    from studio.store import Store
    from tests.helpers import easy_preference_rows, local_ray_head, seed_easy_judgments, write_parquet

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    prepared = prepare_default_model(tmp)
    snapshot = write_parquet(easy_preference_rows(40), tmp / "pref.parquet")
    results: dict[str, Any] = {"dpo_per_step": {}}
    for processes, batch in ((1, 4), (2, 2), (2, 4)):
        seconds = dpo_steps(
            snapshot, prepared.path, tmp / f"dp-{processes}x{batch}", processes, batch, args.steps
        )
        results["dpo_per_step"][f"{processes}x{batch}"] = {
            "s_per_step": round(seconds, 3),
            "pairs_per_s": round(processes * batch / seconds, 3),
        }
        print(
            f"dpo {processes} process(es) x {batch} pairs:", results["dpo_per_step"][f"{processes}x{batch}"]
        )
    one = results["dpo_per_step"]["1x4"]["pairs_per_s"]
    results["speedup_pairs_per_s"] = {
        k: round(v["pairs_per_s"] / one, 3) for k, v in results["dpo_per_step"].items() if k != "1x4"
    }

    store = Store(tmp / "studio.duckdb")
    store.register_model_version(
        "base", path=str(prepared.path), content_hash=prepared.content_hash, source=prepared.source
    )
    ensure_policy_alias(store, "base")
    seed_easy_judgments(store, "easy", n=40)

    class NoServer:  # the benchmark measures launching; a policy adapter is registered, not served
        def __init__(self) -> None:
            self.store, self.task_sampler = store, None

        def add_adapter(self, name: str, path: Path, source: str, meta: dict, parent: str) -> dict:
            return store.register_model_version(
                name, path=str(path), content_hash=name, source=source, kind="lora", parent=parent, meta=meta
            )

    t0 = time.perf_counter()
    with local_ray_head() as address:
        results["ray_head_start_s"] = round(time.perf_counter() - t0, 1)
        launch = LaunchSettings(launcher="local", ray_address=address, shared_dir=tmp)
        runner = Runner(store, tmp, lambda *a: register_stage(NoServer(), *a), launch=launch)
        runner.start()
        times: dict[str, list[float]] = {"local": [], "ray": []}
        try:
            for _ in range(args.rounds):
                for launcher in ("local", "ray"):
                    times[launcher].append(first_metric_line(store, tmp, runner, launch, launcher))
                    print(
                        launcher,
                        "submit -> first metrics line",
                        round(times[launcher][-1], 2),
                        "s",
                        flush=True,
                    )
        finally:
            runner.stop()
    local, ray = statistics.median(times["local"]), statistics.median(times["ray"])
    results["submit_to_first_metric_s"] = {
        "local": [round(t, 2) for t in times["local"]],
        "ray": [round(t, 2) for t in times["ray"]],
        "ray_overhead_s": round(ray - local, 2),
    }
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
