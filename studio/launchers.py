"""How the runner starts one training stage: here, under `accelerate launch`, or as a Ray Job.

Every launcher runs the same stage command line, `python -m trainers.<stage> --config ...
--snapshot ... --parent ... --output ...`; they differ in where its processes run:

- `local`: one process on the studio's machine, in its own process group (today's runner).
- `accelerate`: `python -m accelerate.commands.launch --num_processes N ... -m trainers.<stage>
  ...` on the studio's machine. Without `--accelerate-config` the processes are started by
  torchrun (accelerate's `--multi_gpu` path) and each trainer asks accelerate for the CPU, which
  gives accelerate's MULTI_CPU state on the gloo backend; accelerate's own `--cpu` flag starts N
  processes only through an MPI launcher (mpirun), which this setup does not install. On GPU
  machines pass an accelerate config file (multi-GPU, DeepSpeed or FSDP: data/recipes/gpu/).
- `ray`: a Ray Job submitted to the cluster's job server (`--ray-address http://HEAD:8265`) whose
  entrypoint is the local or the accelerate line above with the cluster's `python`. Its logs are
  copied into the run's run.log as they come, progress is read from metrics.jsonl in the run's
  folder, which must therefore be on a directory the cluster's nodes also see at the same path
  (`--shared-dir`), and a cancel is Ray's `stop_job`.

A launcher returns a `Job`: `wait()` blocks until the stage ends and says how (`Outcome`),
`cancel()` stops it from another thread. Ray is imported only by the ray launcher.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from studio.serving.vllm_server import die_with_parent

LAUNCHERS = ("local", "accelerate", "ray")
MAX_PROCESSES = 64
# what the stage's processes get in their environment, wherever they run: the trainers read
# local folders only, and their output is read line by line
STAGE_ENV = {
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
RAY_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class LaunchError(Exception):
    """A stage could not be started (or followed) by its launcher; the message says why and what to do."""


@dataclass(frozen=True)
class LaunchSettings:
    """The studio's launch defaults (`studio serve --launcher ...`); a run may choose its own
    launcher and process count (`RunSpec.launcher`, `RunSpec.num_processes`)."""

    launcher: str = "local"
    num_processes: int = 1
    accelerate_config: Path | None = None
    ray_address: str | None = None
    ray_gpus_per_process: float = 0.0
    shared_dir: Path | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> LaunchSettings:
        return cls(
            launcher=getattr(settings, "launcher", "local"),
            num_processes=getattr(settings, "num_processes", 1),
            accelerate_config=getattr(settings, "accelerate_config", None),
            ray_address=getattr(settings, "ray_address", None),
            ray_gpus_per_process=getattr(settings, "ray_gpus_per_process", 0.0),
            shared_dir=shared_root(settings),
        )


def shared_root(settings: Any) -> Path:
    """Where snapshots and runs live: `Settings.shared_dir`, by default the data directory."""
    return Path(getattr(settings, "shared_dir", None) or settings.data_dir)


def check_launch_settings(
    launcher: str, num_processes: int, accelerate_config: Path | None, ray: str | None
) -> None:
    """The checks of `studio serve`'s launch flags (Settings calls this); messages name the flag."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher {launcher!r}: use one of {', '.join(LAUNCHERS)}")
    if not 1 <= num_processes <= MAX_PROCESSES:
        raise ValueError(f"--num-processes {num_processes}: use 1 to {MAX_PROCESSES} processes per stage")
    if accelerate_config is not None and not Path(accelerate_config).is_file():
        raise ValueError(
            f"--accelerate-config {accelerate_config}: no such file; write one with `accelerate config` "
            "or start from data/recipes/gpu/"
        )
    if launcher == "ray" and not ray:
        raise ValueError(
            "--launcher ray needs --ray-address, the cluster's Ray Jobs address (e.g. http://HEAD:8265)"
        )


def check_choice(
    defaults: LaunchSettings | None, launcher: str | None, num_processes: int | None
) -> dict[str, Any] | None:
    """A run's own launch choice, checked against what this studio can do (`defaults` None: no
    studio runs; whether it has a Ray cluster is then checked when the run starts). None: the
    studio's defaults apply when the run starts."""
    if launcher is None and num_processes is None:
        return None
    if launcher is not None and launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r}: use one of {', '.join(LAUNCHERS)}")
    if launcher == "ray" and defaults is not None and not defaults.ray_address:
        raise ValueError(
            "launcher 'ray': this studio has no Ray cluster; start it with `studio serve --ray-address "
            "http://HEAD:8265`, or pick local or accelerate"
        )
    if num_processes is not None and not 1 <= num_processes <= MAX_PROCESSES:
        raise ValueError(f"num_processes {num_processes}: use 1 to {MAX_PROCESSES} processes per stage")
    if launcher == "local" and num_processes not in (None, 1):
        raise ValueError(
            f"num_processes {num_processes}: the local launcher runs one process; "
            "pick launcher accelerate for several"
        )
    choice: dict[str, Any] = {}
    if launcher is not None:
        choice["launcher"] = launcher
    if num_processes is not None:
        choice["num_processes"] = num_processes
    return choice


def resolve(defaults: LaunchSettings | None, choice: dict[str, Any] | None) -> dict[str, Any]:
    """The launcher and process count a run starts with: its own choice, else the studio's."""
    choice, defaults = choice or {}, defaults or LaunchSettings()
    launcher = choice.get("launcher", defaults.launcher)
    processes = choice.get("num_processes")
    if processes is None:
        processes = 1 if launcher == "local" else defaults.num_processes
    return {"launcher": launcher, "num_processes": int(processes)}


# ---------------------------------------------------------------- command lines


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stage_command(
    python: str,
    stage: str,
    args: list[str],
    num_processes: int = 1,
    accelerate: bool = False,
    accelerate_config: Path | None = None,
    port: int | None = None,
) -> list[str]:
    """The command line of one stage: `python -m trainers.<stage> ARGS`, or that module under
    `accelerate launch` with N processes."""
    if not accelerate:
        return [python, "-m", f"trainers.{stage}", *args]
    cmd = [python, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    cmd += ["--num_machines", "1", "--main_process_port", str(port or free_port())]
    if accelerate_config is not None:
        cmd += ["--config_file", str(accelerate_config)]  # the file says GPUs, DeepSpeed, FSDP, precision
    else:
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        if num_processes > 1:
            # torchrun starts the processes; each trainer asks accelerate for the CPU when torch
            # sees no GPU, which gives accelerate's MULTI_CPU state on gloo (see the module doc)
            cmd.append("--multi_gpu")
    return [*cmd, "-m", f"trainers.{stage}", *args]


def freeze_recipe(recipe: Path, folder: Path) -> Path:
    """Copy a recipe, and the DeepSpeed/FSDP files it names by a relative path, into the run's
    folder: the stage reads its recipe from there (on a cluster, from the shared directory), and
    the run keeps the recipe it ran with even if the studio's copy changes later."""
    from trainers.configs import read_recipe

    folder.mkdir(parents=True, exist_ok=True)
    data = read_recipe(recipe)
    train = data.get("train")
    if isinstance(train, dict):
        for key in ("deepspeed", "fsdp_config"):
            value = train.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                source = recipe.parent / value
                if not source.is_file():
                    raise LaunchError(f"recipe {recipe}: train.{key} {value}: no such file beside the recipe")
                target = folder / source.name
                target.write_bytes(source.read_bytes())
                train[key] = source.name
    out = folder / recipe.name
    out.write_text(
        f"# frozen copy of {recipe} for this run\n" + yaml.safe_dump(data, sort_keys=False, width=10**6)
    )
    return out


# ---------------------------------------------------------------- jobs


@dataclass
class Outcome:
    """How a stage ended: `code` 0 is success, a negative code the signal that ended a local
    process, a positive one its exit code. `stopped`: the job was stopped by someone else (Ray's
    `ray job stop`), not by the runner. `reason`: the launcher's own account, when it has one."""

    code: int
    stopped: bool = False
    reason: str | None = None


class Job(Protocol):
    def wait(self) -> Outcome: ...

    def cancel(self) -> None: ...


class LocalJob:
    """A stage as a process group on this machine; output appended to the run's log."""

    def __init__(self, cmd: list[str], log: Path, cwd: Path):
        env = {**os.environ, **STAGE_ENV}
        with log.open("ab") as fh:
            fh.write(("$ " + shlex.join(cmd) + "\n").encode())
            fh.flush()
            # own session and process group (a cancel reaches every process the trainer and
            # accelerate start), and a SIGTERM from the kernel if the studio dies outright
            self.proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent, cwd=str(cwd)
            )

    @property
    def pid(self) -> int:
        """The process group's leader (and so the group's id)."""
        return self.proc.pid

    def wait(self) -> Outcome:
        return Outcome(self.proc.wait())

    def cancel(self, grace: float = 10.0) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def ray_client(address: str) -> Any:
    """Ray's JobSubmissionClient for the cluster's Jobs address, with a message when it is not there."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:  # pragma: no cover - ray is a dependency of the project
        raise LaunchError(f"the ray launcher needs Ray: pip install 'ray[default]' ({exc})") from None
    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        raise LaunchError(
            f"--ray-address {address}: no Ray job server answers there ({type(exc).__name__}: {exc}); "
            "give the head's dashboard address, e.g. http://HEAD:8265, and check that it runs"
        ) from None


@dataclass
class RayJob:
    """A stage as a Ray Job. `wait` polls its status and copies its new log lines into run.log."""

    client: Any
    job_id: str
    log: Path
    poll: float = 1.0
    unreachable_after: float = 120.0
    _seen: int = field(default=0, init=False)

    @classmethod
    def submit(
        cls,
        client: Any,
        job_id: str,
        cmd: list[str],
        log: Path,
        num_cpus: float,
        num_gpus: float,
        metadata: dict[str, str],
    ) -> RayJob:
        entrypoint = shlex.join(cmd)
        with log.open("ab") as fh:
            fh.write(f"$ ray job {job_id}: {entrypoint}\n".encode())
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id,
                runtime_env={"env_vars": dict(STAGE_ENV)},
                entrypoint_num_cpus=num_cpus,
                entrypoint_num_gpus=num_gpus or None,
                metadata=metadata,
            )
        except Exception as exc:
            raise LaunchError(f"Ray refused job {job_id}: {type(exc).__name__}: {exc}") from None
        return cls(client, job_id, log)

    def _copy_logs(self) -> None:
        try:
            text = self.client.get_job_logs(self.job_id)
        except Exception:
            return  # the next poll tries again; the status call says when the server is gone
        if len(text) > self._seen:
            with self.log.open("ab") as fh:
                fh.write(text[self._seen :].encode(errors="replace"))
            self._seen = len(text)

    def wait(self) -> Outcome:
        last_answer = time.monotonic()
        while True:
            try:
                info = self.client.get_job_info(self.job_id)
                last_answer = time.monotonic()
            except Exception as exc:
                if time.monotonic() - last_answer > self.unreachable_after:
                    return Outcome(
                        1,
                        reason=f"the Ray job server stopped answering about job {self.job_id} for "
                        f"{self.unreachable_after:.0f} s ({type(exc).__name__}); the job may still run: "
                        f"`ray job status {self.job_id}`",
                    )
                time.sleep(self.poll)
                continue
            self._copy_logs()
            status = str(getattr(info.status, "value", info.status))
            if status in RAY_TERMINAL:
                self._copy_logs()
                message = (info.message or "").strip()
                if status == "SUCCEEDED":
                    return Outcome(0)
                if status == "STOPPED":
                    return Outcome(
                        1, stopped=True, reason=f"the Ray job {self.job_id} was stopped: {message}"
                    )
                code = getattr(info, "driver_exit_code", None)
                return Outcome(
                    code if isinstance(code, int) and code > 0 else 1,
                    reason=f"the Ray job {self.job_id} failed: {message[:300]}",
                )
            time.sleep(self.poll)

    def cancel(self) -> None:
        with contextlib.suppress(Exception):  # already ended, or gone: wait() reports what happened
            self.client.stop_job(self.job_id)


# ---------------------------------------------------------------- the launcher the runner calls


class Launcher:
    """Starts stages as the runner asks: `start(...)` returns the stage's `Job`."""

    def __init__(self, settings: LaunchSettings, python: str = sys.executable, cwd: Path | None = None):
        self.settings, self.python, self.cwd = settings, python, cwd or Path.cwd()
        self._ray: Any = None

    def ray(self) -> Any:
        if self._ray is None:
            if not self.settings.ray_address:
                raise LaunchError(
                    "this run asks for the ray launcher but the studio has no --ray-address; restart it "
                    "with `studio serve --ray-address http://HEAD:8265`"
                )
            self._ray = ray_client(self.settings.ray_address)
        return self._ray

    def check_shared(self, paths: dict[str, str]) -> None:
        """A Ray job reads and writes through paths the cluster must see: all under the shared dir."""
        root = (self.settings.shared_dir or self.cwd).resolve()
        for what, path in paths.items():
            if path.startswith("rule:"):
                continue
            resolved = Path(path).resolve()
            if resolved != root and root not in resolved.parents:
                raise LaunchError(
                    f"{what} {path} is outside the shared directory {root}: the cluster's nodes cannot "
                    f"read it. Keep models, snapshots and runs under --shared-dir (serve a model folder "
                    "from there with --model)"
                )

    def start(
        self,
        job_id: str,
        stage: str,
        args: list[str],
        launch: dict[str, Any],
        log: Path,
        shared_paths: dict[str, str],
    ) -> tuple[Job, str | None]:
        """Start the stage; returns its job and, for a Ray job, its id."""
        launcher, n = launch["launcher"], launch["num_processes"]
        accelerate = launcher == "accelerate" or (launcher == "ray" and n > 1)
        if launcher != "ray":
            cmd = stage_command(self.python, stage, args, n, accelerate, self.settings.accelerate_config)
            # run under studio.lifeline: the stage's whole process group dies with the studio, even
            # when the studio is killed outright (die_with_parent alone reaches only the leader)
            cmd = [cmd[0], "-m", "studio.lifeline", *cmd[2:]]
            return LocalJob(cmd, log, self.cwd), None
        if self.settings.accelerate_config is not None and accelerate:
            shared_paths = {**shared_paths, "--accelerate-config": str(self.settings.accelerate_config)}
        self.check_shared(shared_paths)
        # the cluster's own python; the port is picked blind (the node is not this machine)
        cmd = stage_command(
            "python",
            stage,
            args,
            n,
            accelerate,
            self.settings.accelerate_config,
            port=random.randint(20000, 40000),
        )
        job = RayJob.submit(
            self.ray(),
            job_id,
            cmd,
            log,
            num_cpus=n,
            num_gpus=n * self.settings.ray_gpus_per_process,
            metadata={"studio_run": job_id},
        )
        return job, job.job_id

    def stop_ray_jobs(self, job_ids: list[str]) -> None:
        """Stop jobs a dead studio left on the cluster (best effort)."""
        if not job_ids or not self.settings.ray_address:
            return
        with contextlib.suppress(Exception):
            client = self.ray()
            for job_id in job_ids:
                with contextlib.suppress(Exception):
                    client.stop_job(job_id)
