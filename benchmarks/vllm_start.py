"""A vLLM start with its default compile warm-up against one with `-O0` (no warm-up).

The test suite starts a dozen vLLMs with STUDIO_VLLM_ARGS=-O0; users keep vLLM's default.
This measures what that trades: seconds to a healthy server, and decoding speed after it.
Per side, alternated A B A B (the machine is noisy): the time from spawn to /health, one
greedy request of 64 tokens alone, and 32 greedy requests of up to 64 tokens at once, twice.
The model is the packaged SmolLM2-135M-Instruct, float32, the base without runtime LoRA.

    python benchmarks/vllm_start.py [--rounds 2]

Run it alone: it starts vLLM 2 x rounds times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIDES = {"default": [], "O0": ["-O0"]}


def side(extra: list[str], model: Path, log: Path) -> dict:
    from studio.serving.client import OpenAIChatBackend, SamplingParams
    from studio.serving.vllm_server import VLLMServer

    quiet = lambda m: None  # noqa: E731
    server = VLLMServer(model, "base", log, lora=False, max_restarts=0, extra_args=extra, progress=quiet)
    started = time.monotonic()
    server.start()
    ready = time.monotonic() - started
    greedy = SamplingParams(max_tokens=64, temperature=0.0)
    try:
        with OpenAIChatBackend(server.url) as client:
            client.chat("base", [{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=1))
            t0 = time.monotonic()
            client.chat("base", [{"role": "user", "content": "Write a long story about a cat."}], greedy)
            single = time.monotonic() - t0

            def one(i: int) -> None:
                prompt = [{"role": "user", "content": f"Write a story about animal number {i}."}]
                client.chat("base", prompt, greedy)

            batches = []
            with ThreadPoolExecutor(32) as pool:
                for first in (0, 32):
                    t0 = time.monotonic()
                    list(pool.map(one, range(first, first + 32)))
                    batches.append(round(time.monotonic() - t0, 2))
    finally:
        server.stop()
    return {"ready_s": round(ready, 1), "single_64_s": round(single, 2), "batch_32x64_s": batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs, alternated")
    args = parser.parse_args()
    os.environ.pop("STUDIO_VLLM_ARGS", None)  # each side says its own options

    from studio.model_prep import prepare_default_model

    runs: dict[str, list[dict]] = {name: [] for name in SIDES}
    with tempfile.TemporaryDirectory(prefix="bench-vllm-start-") as tmp:
        model = prepare_default_model(Path(tmp) / "data").path
        for _ in range(args.rounds):
            for name, extra in SIDES.items():
                runs[name].append(side(extra, model, Path(tmp) / f"{name}.log"))

    def mean(name: str, key: str) -> float:
        values = [v for r in runs[name] for v in (r[key] if isinstance(r[key], list) else [r[key]])]
        return sum(values) / len(values)

    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "runs": runs,
        "ready_O0_over_default": round(mean("O0", "ready_s") / mean("default", "ready_s"), 2),
        "batch_O0_over_default": round(mean("O0", "batch_32x64_s") / mean("default", "batch_32x64_s"), 2),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
