"""Sampling on a vLLM with runtime LoRA: vLLM's CPU LoRA ops against studio.serving.lora_cpu's.

One vLLM with runtime LoRA on the packaged SmolLM2-135M-Instruct (float32) per side, started
the way the studio starts it, with two rank-8 adapters loaded (random small weights: a trained
adapter costs the same). Per side: 16 greedy requests of 64 tokens at once for the base, for
one adapter, and a mixed batch (base, adapter 1, adapter 2, base, ...). Measured: wall time
and output tokens/s per batch, the speed-up of ours, and whether the greedy answers are the
same text on both sides; and, in the mixed batch, whether a base request answers as it does
alone (vLLM's CPU ops give a token without an adapter the last slot's update).

    python benchmarks/lora_ops.py [--requests 16] [--max-tokens 64]

Run it alone: it starts vLLM twice.
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

WORDS = ("cat", "dog", "ship", "tree", "river", "city", "robot", "bird")
SIDES = ("vllm", "grouped")  # STUDIO_LORA_OPS for each side (see studio/serving/vllm_launcher.py)


def side(ops: str, model: Path, adapters: list[Path], prompts: list[str], max_tokens: int, log: Path) -> dict:
    from studio.serving.client import OpenAIChatBackend, SamplingParams
    from studio.serving.vllm_server import VLLMServer

    os.environ["STUDIO_LORA_OPS"] = ops  # read by the launcher in vLLM's processes
    server = VLLMServer(model, "base", log, lora=True, max_restarts=0, progress=lambda m: None)
    server.start()
    try:
        with OpenAIChatBackend(server.url) as client:
            for i, adapter in enumerate(adapters, 1):
                client.load_lora(f"a{i}", str(adapter))
            params = SamplingParams(max_tokens=max_tokens, temperature=0)
            batches = {
                "base": ["base"] * len(prompts),
                "adapter": ["a1"] * len(prompts),
                "mixed": [("base", "a1", "a2", "base")[i % 4] for i in range(len(prompts))],
            }

            def run(models: list[str]) -> tuple[float, int, list[str]]:
                def one(pair: tuple[str, str]) -> object:
                    return client.chat(pair[0], [{"role": "user", "content": pair[1]}], params)

                with ThreadPoolExecutor(len(prompts)) as pool:
                    started = time.perf_counter()
                    outs = list(pool.map(one, zip(models, prompts, strict=True)))
                    seconds = time.perf_counter() - started
                tokens = sum(o.completions[0].completion_tokens or 0 for o in outs)
                return seconds, tokens, [o.completions[0].text for o in outs]

            run(batches["adapter"])  # warm-up: the first LoRA batch pays one-time costs
            report = {}
            for name, models in batches.items():
                seconds, tokens, texts = run(models)
                report[name] = {
                    "seconds": round(seconds, 2),
                    "tok_s": round(tokens / seconds, 1),
                    "texts": texts,
                }
                print(f"{ops:8} {name:8} {seconds:6.2f} s  {tokens / seconds:6.1f} tok/s", flush=True)
            return report
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16, help="requests per batch, all at once")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    from studio.model_prep import prepare_default_model
    from tests.helpers import random_adapter

    prompts = [f"Write a short story about a {WORDS[i % len(WORDS)]}." for i in range(args.requests)]
    with tempfile.TemporaryDirectory(prefix="bench-lora-ops-") as tmp:
        model = prepare_default_model(Path(tmp) / "data").path
        adapters = [random_adapter(model, Path(tmp) / f"a{i}", seed=i) for i in (1, 2)]
        results = {
            ops: side(ops, model, adapters, prompts, args.max_tokens, Path(tmp) / f"{ops}.log")
            for ops in SIDES
        }
    theirs, ours = results["vllm"], results["grouped"]
    base_rows = [i for i in range(args.requests) if i % 4 in (0, 3)]
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        **{
            name: {
                "vllm_s": theirs[name]["seconds"],
                "ours_s": ours[name]["seconds"],
                "speedup": round(theirs[name]["seconds"] / ours[name]["seconds"], 2),
                "same_greedy_texts": sum(
                    a == b for a, b in zip(theirs[name]["texts"], ours[name]["texts"], strict=True)
                ),
            }
            for name in ("base", "adapter", "mixed")
        },
        "base_in_mixed_as_alone": {
            ops: sum(results[ops]["mixed"]["texts"][i] == results[ops]["base"]["texts"][i] for i in base_rows)
            for ops in SIDES
        },
        "base_rows_in_mixed": len(base_rows),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
