"""The training runner: one job per stage, queued, one run at a time by default.

A run's stages execute as `python -m trainers.<stage>`, started by the run's launcher
(studio/launchers.py: a local process group, `accelerate launch` with N processes, or a Ray Job),
with stdout and stderr in OUTPUT/run.log. Progress and curves come from OUTPUT/metrics.jsonl. A crash or a
cancel marks the run failed or cancelled with the reason and changes nothing else: only a stage
that exits 0 with its meta.json written registers a version. A finished policy version is
hot-loaded into vLLM, sent into a blind re-battle against its parent on the run's held-out prompts
and evaluated against it; the promotion gate (studio/promotion.py) decides what follows.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from studio import arena, promotion
from studio import launchers as ln
from studio import training as tr
from studio.model_prep import folder_hash
from studio.store import Store, StoreError
from trainers.common import META_FILE, METRICS_FILE

TERMINAL = ("succeeded", "failed", "cancelled")


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for folder in sorted(p for p in output_dir.iterdir() if p.is_dir()) if output_dir.is_dir() else []:
        path = folder / METRICS_FILE
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a line being written right now
    return rows


def progress(run: dict[str, Any], events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Stage, step, max steps and ETA of a run, from its metrics (read here unless given)."""
    if events is None:
        events = read_metrics(Path(run["output_dir"]))
    stages = list(run["stages"])
    done = len([e for e in events if e["event"] == "end"])
    current = events[-1] if events else None
    info: dict[str, Any] = {
        "status": run["status"],
        "stages": stages,
        "stage_index": min(done, len(stages) - 1),
    }
    if current is not None:
        step, total, elapsed = (
            current.get("step", 0),
            current.get("max_steps") or 0,
            current.get("elapsed", 0),
        )
        info |= {"stage": current["stage"], "step": step, "max_steps": total, "elapsed_s": round(elapsed, 1)}
        if run["status"] == "running" and step and total and step < total:
            info["eta_s"] = round(elapsed / step * (total - step), 1)
    return info


def tail(path: Path, lines: int = 60) -> str:
    if not path.is_file():
        return ""
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - 20_000))
        return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])


class Runner:
    """Runs queued runs in the background. `register` turns a finished stage folder into a version."""

    def __init__(
        self,
        store: Store,
        data_dir: Path,
        register: Callable[[dict, str, Path, dict], str],
        max_parallel: int = 1,
        python: str = sys.executable,
        launch: ln.LaunchSettings | None = None,
    ):
        self.store, self.data_dir, self.register = store, data_dir, register
        self.max_parallel, self.python = max_parallel, python
        self.launch = launch or ln.LaunchSettings(shared_dir=data_dir)
        self.launcher = ln.Launcher(self.launch, python=python, cwd=data_dir)
        self._procs: dict[str, ln.Job] = {}
        self._cancel: dict[str, str] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._loop: threading.Thread | None = None

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        # a run that was running when the studio died did not finish: say so, keep the queue.
        # Its local processes died with the studio; a Ray job lives on the cluster: stop it.
        for row in self.store.query("SELECT launch FROM runs WHERE status = 'running'"):
            launch = json.loads(row["launch"]) if isinstance(row["launch"], str) else row["launch"]
            self.launcher.stop_ray_jobs((launch or {}).get("ray_jobs", []))
        with self.store.transaction() as cur:
            cur.execute(
                "UPDATE runs SET status = 'failed', finished_at = now(), reason = "
                "'the studio stopped while this run was running; start it again' WHERE status = 'running'"
            )
        self._loop = threading.Thread(target=self._run, name="training-runner", daemon=True)
        self._wake.set()  # runs queued while the studio was down start now
        self._loop.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            running = list(self._procs)
        for run_id in running:
            self.cancel(run_id, "the studio shut down")
        for thread in list(self._threads.values()):
            thread.join(timeout=30)
        if self._loop is not None:
            self._loop.join(timeout=10)

    def poke(self) -> None:
        self._wake.set()

    def cancel(self, run_id: str, reason: str) -> dict[str, Any]:
        run = tr.get_run(self.store, run_id)
        if run["status"] in TERMINAL:
            raise StoreError(f"run '{run_id}' already {run['status']}; nothing to cancel")
        with self._lock:
            self._cancel[run_id] = reason
            proc = self._procs.get(run_id)
            if proc is None and run["status"] == "queued":
                self._finish(run_id, "cancelled", reason)
        if proc is not None:
            proc.cancel()
        return tr.get_run(self.store, run_id)

    def process_group(self, run_id: str) -> int | None:
        """The process group of a running run's trainer here (it leads its own session), else None
        (not running, or a Ray job on the cluster)."""
        with self._lock:
            job = self._procs.get(run_id)
        return getattr(job, "pid", None)

    # -------------------------------------------------------------- the loop
    def _run(self) -> None:
        while not self._stop.is_set():
            # every way of queueing a run pokes, and a finished run pokes for the next one:
            # the timeout is only a safety net, not a poll of the database
            self._wake.wait(timeout=30.0)
            self._wake.clear()
            with self._lock:
                free = self.max_parallel - len(self._threads)
            if free <= 0 or self._stop.is_set():
                continue
            queued = self.store.query(
                "SELECT id FROM runs WHERE status = 'queued' ORDER BY created_at, id LIMIT ?", [free]
            )
            for row in queued:
                with self.store.transaction() as cur:
                    cur.execute(
                        "UPDATE runs SET status = 'running', started_at = now() WHERE id = ? "
                        "AND status = 'queued'",
                        [row["id"]],
                    )
                thread = threading.Thread(
                    target=self._execute, args=(row["id"],), daemon=True, name=f"run-{row['id']}"
                )
                with self._lock:
                    self._threads[row["id"]] = thread
                thread.start()

    def _execute(self, run_id: str) -> None:
        try:
            self._execute_stages(run_id)
        except Exception as exc:  # never take the studio down with a run
            self._finish(run_id, "failed", f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._threads.pop(run_id, None)
            self._wake.set()  # a place is free: start the next queued run

    def _execute_stages(self, run_id: str) -> None:
        run = tr.get_run(self.store, run_id)
        out = Path(run["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        snapshot = self.store.query("SELECT path FROM snapshots WHERE id = ?", [run["snapshot_id"]])[0][
            "path"
        ]
        parent = run["parent"]
        metrics: dict[str, Any] = {}
        launch = ln.resolve(self.launch, run.get("launch"))
        self._set_launch(run_id, launch)
        for index, stage in enumerate(run["stages"]):
            folder = out / f"{index + 1}-{stage}"
            recipe = ln.freeze_recipe(Path(run["recipes"][stage]), out / "recipes" / f"{index + 1}-{stage}")
            paths = {
                "the snapshot": snapshot,
                "the parent's folder": self.store.model_version(parent)["path"],
                "the run's folder": str(out),
            }
            args = [
                "--config",
                str(recipe),
                "--snapshot",
                snapshot,
                "--parent",
                paths["the parent's folder"],
                "--output",
                str(folder),
                "--parent-version",
                parent,
            ]
            if stage == "ppo":
                paths["the reward model"] = self.store.model_version(run["reward_model"])["path"]
                args += ["--reward-model", paths["the reward model"]]
            for key, value in run["overrides"].get(stage, {}).items():
                args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
            outcome = self._spawn(run_id, f"{run_id}-{index + 1}-{stage}", stage, args, launch, out, paths)
            if run_id in self._cancel:
                self._finish(run_id, "cancelled", self._cancel[run_id])
                return
            if outcome.stopped:
                self._finish(run_id, "cancelled", f"stage {stage}: {outcome.reason}")
                return
            if outcome.code != 0 or not (folder / META_FILE).is_file():
                self._finish(
                    run_id, "failed", stage_failure(stage, outcome, folder, tail(out / "run.log", 400))
                )
                return
            meta = json.loads((folder / META_FILE).read_text())
            metrics[stage] = meta.get("metrics", {})
            version = self.register(run, stage, folder, {**meta, "run_id": run_id, "parent_version": parent})
            with self.store.transaction() as cur:
                cur.execute(
                    "UPDATE runs SET versions = list_append(versions, ?), metrics = ? WHERE id = ?",
                    [version, json.dumps(metrics, default=float), run_id],
                )
            if stage != "reward":
                parent = version
        self._finish(run_id, "succeeded", None)

    def _spawn(
        self,
        run_id: str,
        job_id: str,
        stage: str,
        args: list[str],
        launch: dict[str, Any],
        out: Path,
        paths: dict[str, str],
    ) -> ln.Outcome:
        """Start one stage through the run's launcher and wait for it to end."""
        with self._lock:
            if run_id in self._cancel:
                return ln.Outcome(-signal.SIGTERM)
        try:  # outside the lock: submitting a Ray job waits on the cluster's answer
            job, ray_job = self.launcher.start(job_id, stage, args, launch, out / "run.log", paths)
        except ln.LaunchError as exc:
            return ln.Outcome(1, reason=str(exc))
        with self._lock:
            self._procs[run_id] = job
            cancelled_meanwhile = run_id in self._cancel
        if cancelled_meanwhile:
            job.cancel()
        if ray_job is not None:  # a restarted studio stops what its predecessor left on the cluster
            launch.setdefault("ray_jobs", []).append(ray_job)
            self._set_launch(run_id, launch)
        try:
            return job.wait()
        finally:
            with self._lock:
                self._procs.pop(run_id, None)

    def _set_launch(self, run_id: str, launch: dict[str, Any]) -> None:
        with self.store.transaction() as cur:
            cur.execute("UPDATE runs SET launch = ? WHERE id = ?", [json.dumps(launch), run_id])

    def _finish(self, run_id: str, status: str, reason: str | None) -> None:
        with self.store.transaction() as cur:
            cur.execute(
                "UPDATE runs SET status = ?, reason = ?, finished_at = now() WHERE id = ?",
                [status, reason, run_id],
            )


def stage_failure(stage: str, outcome: ln.Outcome, folder: Path, log_tail: str) -> str:
    """Why a stage did not produce a version: its launcher's account, else its exit code and log."""
    if outcome.code == 0:  # it ended well but its meta.json is not where the studio looks
        return (
            f"stage {stage} finished but {folder / META_FILE} is not visible to the studio: the stage's "
            "machine must write to the same shared directory (--shared-dir) at the same path"
        )
    reason = failure_reason(stage, outcome.code, log_tail)
    return f"stage {stage}: {outcome.reason}; {reason}" if outcome.reason else reason


def failure_reason(stage: str, code: int, log_tail: str) -> str:
    """Why a stage failed, from its exit code and the end of its log.

    A negative code is the signal that ended the process (subprocess's convention): the log's
    last line then says nothing about the cause (it is often just a metrics line), so the
    reason names the signal. Otherwise it is the last error line the stage printed."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        reason = f"stage {stage} was killed by {name}"
        if -code == signal.SIGKILL:
            reason += " (a kill -9, or the kernel's out-of-memory killer: see `dmesg`)"
        return reason + "; run.log has its output up to then"
    last = [ln for ln in log_tail.splitlines() if ln.strip()]
    errors = [ln for ln in last if ln.startswith(("error:", "Traceback")) or "Error" in ln]
    detail = (errors[-1] if errors else (last[-1] if last else "no output")).strip()[:500]
    return f"stage {stage} exited with code {code}: {detail}"


def version_name(run: dict[str, Any], stage: str) -> str:
    return f"{stage}-{run['id'][4:]}"


def register_stage(studio: Any, run: dict[str, Any], stage: str, folder: Path, meta: dict[str, Any]) -> str:
    """A finished stage becomes a version; a policy is served, then stored, re-battled against its
    parent on the run's held-out prompts, and evaluated against it (studio.promotion).

    A LoRA adapter is hot-loaded into the servers of its base; full weights (`lora: false`) get
    their own vLLM, started and health-checked before the version is stored (the parent stays
    served). A version the servers cannot load is not stored, and the run fails saying why.
    """
    store: Store = studio.store
    name = version_name(run, stage)
    parent = meta["parent_version"]
    source = f"run:{run['id']}"
    if stage == "reward":  # kept for PPO, never served
        store.register_model_version(
            name,
            path=str(folder.resolve()),
            content_hash=folder_hash(folder),
            source=source,
            kind="reward",
            parent=parent,
            meta=meta,
        )
        return name
    if meta.get("kind") == "lora":
        studio.add_adapter(name, folder, source=source, meta=meta, parent=parent)
    else:
        studio.add_full_version(name, folder, source=source, meta=meta, parent=parent)
    rebattle = f"rebattle-{name}"
    prompt_set = run.get("rebattle_prompts")  # held-out prompts (training.rebattle_plan), never trained on
    if prompt_set is not None:
        arena.create_battle_campaign(
            store,
            rebattle,
            prompt_set=prompt_set,
            versions=[name, parent],
            budget=100,
            created_by=run["created_by"],
        )
        with store.transaction() as cur:
            cur.execute("UPDATE runs SET rebattle = ? WHERE id = ?", [rebattle, run["id"]])
        if studio.task_sampler is not None:
            studio.task_sampler.poke(rebattle)
    # measured against its parent; the gate decides when this and the re-battle's verdict are in
    if getattr(getattr(studio, "settings", None), "auto_eval", True):
        promotion.evaluate_new_version(studio, name, parent, created_by=f"auto:{run['id']}")
    return name
