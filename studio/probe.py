"""Measure the serving backend's throughput against the number of sequences in flight.

The task sampler keeps as many sequences in flight as this curve says pay off
(`buffering.pick_concurrency`), instead of a constant: a CPU vLLM pays a large fixed cost
per decoding step, so it wants many sequences per step, while a GPU server saturates much
later. Only the backend's chat call is used, so it works for any OpenAI-compatible server.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from studio.serving.client import SamplingParams

LEVELS = (1, 2, 4, 8, 16, 32, 64)
PROBE_PROMPT = [{"role": "user", "content": "Write a few sentences about the sea."}]


class ProbeStopped(RuntimeError):
    """The studio began to stop during a probe (its curve is not kept)."""


def probe_concurrency(
    backend: Any,
    model: str,
    *,
    levels: Sequence[int] = LEVELS,
    max_tokens: int = 16,
    per_request: int = 1,
    stop: threading.Event | None = None,
) -> list[dict[str, float]]:
    """Output tokens/s at each number of sequences in flight, one round per level.

    Each level sends `level / per_request` requests at once, each for `per_request`
    completions of exactly `max_tokens` tokens (EOS ignored, so every level does the same work
    per sequence). A warm-up request comes first. Raises the backend's error if it fails, and
    ProbeStopped before the next round once `stop` is set: a Ctrl-C in the probe's half minute
    after a start must not wait for its end."""
    params = SamplingParams(
        n=per_request, temperature=1.0, top_p=1.0, max_tokens=max_tokens, extra={"ignore_eos": True}
    )
    backend.chat(model, PROBE_PROMPT, params)  # warm-up: first-request costs are not throughput
    curve = []
    with ThreadPoolExecutor(max(max(levels) // per_request, 1), thread_name_prefix="probe") as pool:
        for level in levels:
            if stop is not None and stop.is_set():
                raise ProbeStopped(f"stopped before the round of {level} in flight: the studio is stopping")
            requests = max(level // per_request, 1)
            started = time.perf_counter()
            results = list(pool.map(lambda _: backend.chat(model, PROBE_PROMPT, params), range(requests)))
            seconds = time.perf_counter() - started
            tokens = sum(c.completion_tokens or max_tokens for r in results for c in r.completions)
            curve.append({"in_flight": requests * per_request, "tok_s": tokens / seconds, "seconds": seconds})
    return curve


def curve_file(data_dir: Path) -> Path:
    return data_dir / "cache" / "serving-curve.json"


def curve_key(backend_url: str | None, content_hash: str | None, lora: bool | str) -> str:
    """What a curve depends on: the server (ours or an external one), the model, runtime LoRA
    (it costs throughput on the CPU) and the machine's cores."""
    return f"{backend_url or 'managed'}|{content_hash}|lora={lora}|cpus={os.cpu_count()}"


def load_curve(path: Path, key: str) -> list[dict[str, float]] | None:
    """A curve measured before for this key, or None (also for an unreadable file)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    curve = saved.get(key) if isinstance(saved, dict) else None
    return curve if isinstance(curve, list) and curve else None


def save_curve(path: Path, key: str, curve: list[dict[str, float]]) -> None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    saved[key] = curve
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(saved, indent=1))
    tmp.replace(path)
