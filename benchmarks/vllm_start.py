"""Two ways of starting vLLM, side by side: seconds to a healthy server, and decoding after it.

`--compare O0` (the default): vLLM's compile warm-up against `-O0` (no warm-up). The test
suite starts a dozen vLLMs with STUDIO_VLLM_ARGS=-O0; users keep vLLM's default.
`--compare process`: the model in a worker process of its own (vLLM's CPU default) against
the model in the engine-core process (VLLM_ENABLE_V1_MULTIPROCESSING=0; not the studio's
default, see benchmarks/README.md), each with vLLM's default compile mode and with -O0.

Per side, alternated A B A B (the machine is noisy): the time from spawn to /health, one
greedy request of 64 tokens alone, and 32 greedy requests of up to 64 tokens at once, twice.
The model is the packaged SmolLM2-135M-Instruct, float32, the base without runtime LoRA.

    python benchmarks/vllm_start.py [--compare O0|process] [--rounds 2]

Run it alone: it starts vLLM (sides x rounds) times.
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

WORKER, IN_ENGINE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
# name -> (vLLM options, environment); each comparison's first side is the one it is set against
COMPARISONS: dict[str, dict[str, tuple[list[str], dict[str, str]]]] = {
    "O0": {"default": ([], WORKER), "O0": (["-O0"], WORKER)},
    "process": {
        "worker process": ([], WORKER),
        "engine process": ([], IN_ENGINE),
        "worker process -O0": (["-O0"], WORKER),
        "engine process -O0": (["-O0"], IN_ENGINE),
    },
}


def side(extra: list[str], env: dict[str, str], model: Path, log: Path) -> dict:
    from studio.serving.client import OpenAIChatBackend, SamplingParams
    from studio.serving.vllm_server import VLLMServer

    quiet = lambda m: None  # noqa: E731
    os.environ.update(env)  # read by VLLMServer.environment() (setdefault) at the spawn
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
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="O0", help="which two ways")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all sides, alternated")
    args = parser.parse_args()
    os.environ.pop("STUDIO_VLLM_ARGS", None)  # each side says its own options
    sides = COMPARISONS[args.compare]

    from studio.model_prep import prepare_default_model

    runs: dict[str, list[dict]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory(prefix="bench-vllm-start-") as tmp:
        model = prepare_default_model(Path(tmp) / "data").path
        for _ in range(args.rounds):
            for name, (extra, env) in sides.items():
                runs[name].append(side(extra, env, model, Path(tmp) / f"{name}.log"))

    def mean(name: str, key: str) -> float:
        values = [v for r in runs[name] for v in (r[key] if isinstance(r[key], list) else [r[key]])]
        return sum(values) / len(values)

    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "runs": runs,
    }
    names = list(sides)
    pairs = [(names[i + 1], names[i]) for i in range(0, len(names), 2)]  # each side over the one before
    for new, old in pairs:
        summary[f"ready: {new} / {old}"] = round(mean(new, "ready_s") / mean(old, "ready_s"), 2)
        summary[f"batch: {new} / {old}"] = round(mean(new, "batch_32x64_s") / mean(old, "batch_32x64_s"), 2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
