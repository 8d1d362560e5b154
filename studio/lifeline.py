"""Child process groups that never outlive the studio, whatever signal ends it.

The studio runs vLLM and the trainers each in a process group of their own (so that a stop
reaches every process they start: vLLM's engine core and workers, a trainer's data loaders).
When the studio ends normally it stops each group itself (SIGTERM, then SIGKILL). When it is
killed outright (kill -9, the out-of-memory killer) it can do nothing, and Linux's parent-death
signal (PR_SET_PDEATHSIG) reaches only its direct child, the group's leader: the leader's own
children (vLLM's EngineCore and Worker processes) lived on for several seconds, holding memory
and the CPU while a restarted studio loaded its model.

So each group leader is started with `lead_group_and_die_with_parent` (a `preexec_fn`): it
leads a new session and process group, and asks the kernel for PARENT_DEATH_SIGNAL, a signal
kept for this one purpose, when the studio's spawning thread dies. The leader runs
`reap_group_on_parent_death()` before it starts anything: that signal then SIGKILLs the whole
group at once, the leader included. A normal stop sends SIGTERM, which the leader handles as
it always did (vLLM shuts down gracefully). A watcher thread does the same if the leader is
ever re-parented without the signal (the studio died between fork and prctl).

`python -m studio.lifeline MODULE ARGS...` runs MODULE as `python -m MODULE ARGS...` would,
after installing the reaper: the trainers are started this way.

Note for callers: the kernel sends the parent-death signal when the *thread* that spawned the
child exits, not the process. Spawn group leaders from threads that live as long as the child
should (the thread that waits for the child), or through `popen`, which forks from one thread
kept for the life of the process: the serving pool starts vLLM servers from request, run and
evaluation threads that end long before the server should.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PR_SET_PDEATHSIG = 1
# A real-time signal nobody else sends (vLLM handles SIGTERM and SIGINT; Python, SIGINT). Its
# default action ends the process, so before the reaper is installed the leader still dies.
PARENT_DEATH_SIGNAL = signal.SIGRTMIN + 3
WATCH_INTERVAL_S = 0.5


def lead_group_and_die_with_parent(parent_pid: int | None = None) -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen`: the child leads a new session and process group,
    and gets PARENT_DEATH_SIGNAL when the spawning thread ends. `parent_pid` (default: the
    caller's pid, read now in the parent) lets the child see that the studio died before the
    request took effect, and end at once."""
    parent = os.getpid() if parent_pid is None else parent_pid

    def preexec() -> None:  # pragma: no cover - runs in the child between fork and exec
        os.setsid()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL))
        if os.getppid() != parent:  # the studio died before the request was in place
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


# One worker thread, never retired (ThreadPoolExecutor keeps its workers until shutdown), so a
# child forked there gets its parent-death signal only when the studio itself ends.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="studio-spawner")


def popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """`subprocess.Popen(cmd, preexec_fn=lead_group_and_die_with_parent(), **kwargs)`, forked
    from the process-long spawner thread: the group leader dies with the studio, not with the
    (possibly short-lived) thread that asked for it."""
    preexec = lead_group_and_die_with_parent()
    return _SPAWNER.submit(subprocess.Popen, cmd, preexec_fn=preexec, **kwargs).result()


def kill_own_group(*_: object) -> None:
    """SIGKILL every process of this process's group, this one included."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os._exit(137)  # not reached when this process leads the group


def reap_group_on_parent_death() -> None:
    """In a group leader: when the studio dies, take the whole group down at once.

    Call it first thing, before the leader starts any process. It does nothing when this process
    does not lead its group (run by hand, say): killing the group would then kill its caller."""
    if os.getpgid(0) != os.getpid():
        return
    signal.signal(PARENT_DEATH_SIGNAL, kill_own_group)
    parent = os.getppid()
    if parent == 1:  # the studio is already gone
        kill_own_group()

    def watch() -> None:
        # Only a backstop for the signal: re-parented means the studio is gone.
        while True:
            time.sleep(WATCH_INTERVAL_S)
            if os.getppid() != parent:
                kill_own_group()

    threading.Thread(target=watch, name="studio-lifeline", daemon=True).start()


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m studio.lifeline MODULE [ARGS...]")
    reap_group_on_parent_death()
    module = sys.argv[1]
    sys.argv = sys.argv[1:]  # the module sees its arguments as `python -m MODULE` gives them
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
