"""Training beyond one process, for real on this CPU: the studio's runner submits stages as Ray
Jobs to a local Ray head (progress, cancel, a stop from outside, a crash, registration), and runs
every stage data-parallel with `--launcher accelerate --num-processes 2`, each giving the same
kind of version as one process. A tiny random model stands in for the packaged one."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from studio import training
from studio.campaigns import ensure_policy_alias
from studio.jobs import Runner, progress, register_stage
from studio.launchers import LaunchSettings
from studio.store import Store
from tests.helpers import local_ray_head, seed_easy_judgments, tiny_model
from tests.test_training import OfflineStudio, wait_for

pytestmark = pytest.mark.slow
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """One local Ray head for this module's tests (a head costs a while to start)."""
    with local_ray_head() as address:
        yield address


@pytest.fixture()
def shared(tmp_path: Path, model_cache: Path) -> tuple[Store, Path]:
    """A studio store whose base version (a tiny model), snapshots and runs are all under one
    shared directory, with an easy labeling campaign judged."""
    folder = tmp_path / "shared"
    base = tiny_model(folder / "models" / "tiny", model_cache / "smollm2-135m-instruct")
    store = Store(tmp_path / "studio.duckdb")
    store.register_model_version("base", path=str(base), content_hash="t" * 64, source="test")
    ensure_policy_alias(store, "base")
    seed_easy_judgments(store, n=10)
    return store, folder


def submit(store: Store, folder: Path, launch: LaunchSettings, **kw: Any) -> dict[str, Any]:
    return training.submit_run(
        store, folder, created_by="eng", campaigns=["easy"], launch_defaults=launch, shared_dir=folder, **kw
    )


def wait_running_with_a_step(store: Store, run_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = training.get_run(store, run_id)
        info = progress(run)
        if run["status"] == "running" and info.get("step"):
            return info
        assert run["status"] in ("queued", "running"), run["reason"]
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} never reported a step: {training.get_run(store, run_id)}")


def test_ray_jobs_train_report_progress_cancel_and_register(
    ray_head: str, shared: tuple[Store, Path]
) -> None:
    from ray.job_submission import JobSubmissionClient

    store, folder = shared
    client = JobSubmissionClient(ray_head)
    launch = LaunchSettings(launcher="ray", ray_address=ray_head, shared_dir=folder)
    runner = Runner(store, folder, lambda *a: register_stage(OfflineStudio(store), *a), launch=launch)
    runner.start()
    try:
        ok = submit(store, folder, launch, stage="dpo", steps=2)
        crash = submit(store, folder, launch, stage="dpo", overrides={"lora.target_modules": ["nope_proj"]})
        cancel = submit(store, folder, launch, stage="dpo", steps=500)
        stopped = submit(store, folder, launch, stage="dpo", steps=500)
        runner.poke()

        done = wait_for(store, ok["id"])
        assert done["status"] == "succeeded", done["reason"]
        job = f"{ok['id']}-1-dpo"
        assert done["launch"] == {"launcher": "ray", "num_processes": 1, "ray_jobs": [job]}
        assert str(client.get_job_status(job)).endswith("SUCCEEDED")
        version = store.model_version(done["versions"][0])
        assert version["kind"] == "lora" and version["parent"] == "base"
        assert Path(version["path"]).is_relative_to(folder)
        # progress came from metrics.jsonl on the shared dir; the job's output reached run.log
        assert progress(done)["step"] == 2
        log = (Path(done["output_dir"]) / "run.log").read_text()
        assert f"$ ray job {job}: python -m trainers.dpo" in log and '"event": "end"' in log

        failed = wait_for(store, crash["id"])
        assert failed["status"] == "failed" and failed["versions"] == []
        assert f"the Ray job {crash['id']}-1-dpo failed" in failed["reason"], failed["reason"]

        info = wait_running_with_a_step(store, cancel["id"])
        assert info["max_steps"] == 500 and info["eta_s"] > 0
        runner.cancel(cancel["id"], "cancelled by eng")
        cancelled = wait_for(store, cancel["id"], 120)
        assert cancelled["status"] == "cancelled" and cancelled["reason"] == "cancelled by eng"
        assert str(client.get_job_status(f"{cancel['id']}-1-dpo")).endswith("STOPPED")

        # stopped on the cluster, not by the studio: cancelled, with Ray's account as the reason
        wait_running_with_a_step(store, stopped["id"])
        client.stop_job(f"{stopped['id']}-1-dpo")
        ended = wait_for(store, stopped["id"], 120)
        assert ended["status"] == "cancelled" and "was stopped" in ended["reason"], ended["reason"]
        assert {v["name"] for v in store.model_versions()} == {"base", done["versions"][0]}
    finally:
        runner.stop()


def test_every_stage_trains_on_two_processes_like_on_one(shared: tuple[Store, Path]) -> None:
    """reward, dpo, sft and ppo through the runner with accelerate and 2 processes (gloo on this
    CPU), each beside the same stage on one process: the same kind of version, the same files,
    the same metrics, one metrics line per step."""
    store, folder = shared
    store.register_model_version(
        "rule-spaces", path="rule:spaces", content_hash="rule", source="test", kind="reward", parent="base"
    )
    launch = LaunchSettings(launcher="local", shared_dir=folder)
    runner = Runner(store, folder, lambda *a: register_stage(OfflineStudio(store), *a), launch=launch)
    runner.start()
    ppo = {"ppo.iterations": 2, "ppo.max_new_tokens": 8, "lora.target_modules": ALL_LINEAR}
    plans = {
        "reward": {"steps": 2},
        "dpo": {"steps": 2},
        "sft": {"steps": 2},
        "ppo": {"overrides": ppo, "reward_model": "rule-spaces"},
    }
    try:
        runs = {
            (stage, n): submit(
                store,
                folder,
                launch,
                stage=stage,
                launcher="accelerate" if n == 2 else None,
                num_processes=n if n == 2 else None,
                **plan,
            )
            for stage, plan in plans.items()
            for n in (1, 2)
        }
        runner.poke()
        for (stage, n), run in runs.items():
            runs[stage, n] = wait_for(store, run["id"], 600)
            assert runs[stage, n]["status"] == "succeeded", (stage, n, runs[stage, n]["reason"])
    finally:
        runner.stop()
    for stage in plans:
        one, two = runs[stage, 1], runs[stage, 2]
        assert (one["launch"]["launcher"], two["launch"]) == (
            "local",
            {"launcher": "accelerate", "num_processes": 2},
        )
        v1, v2 = (store.model_version(r["versions"][0]) for r in (one, two))
        assert v1["kind"] == v2["kind"] == ("reward" if stage == "reward" else "lora")
        f1, f2 = Path(v1["path"]), Path(v2["path"])
        assert sorted(p.name for p in f1.iterdir()) == sorted(p.name for p in f2.iterdir())
        c1, c2 = (json.loads((f / "adapter_config.json").read_text()) for f in (f1, f2))
        for config in (c1, c2):  # PEFT keeps the targets as a set: saved in any order
            if isinstance(config.get("target_modules"), list):
                config["target_modules"] = sorted(config["target_modules"])
        assert c1 == c2  # same rank, targets, saved modules, base
        m1, m2 = (json.loads((f / "meta.json").read_text()) for f in (f1, f2))
        assert (m1["processes"], m2["processes"]) == (1, 2)
        assert m2["metrics"]["moved_tensors"] == m2["metrics"]["trainable_tensors"] > 0
        if stage == "ppo":
            assert m2["metrics"].pop("ranks_in_sync") is True  # the gradients were averaged
        assert m1["metrics"].keys() == m2["metrics"].keys()
        events = [json.loads(line) for line in (f2 / "metrics.jsonl").read_text().splitlines()]
        steps = [e for e in events if e["event"] == "step" and ("loss" in e or "policy_loss" in e)]
        assert [e["step"] for e in steps] == [1, 2], "rank 0 alone writes one line per step"
        log = (Path(two["output_dir"]) / "run.log").read_text()
        assert "accelerate.commands.launch --num_processes 2" in log
