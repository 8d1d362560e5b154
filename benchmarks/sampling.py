"""Output tokens/s of the studio's sampler against transformers' batched generate.

Same model (the packaged SmolLM2-135M-Instruct, float32), same prompts, same
number of completions per prompt, same output length (EOS ignored on both
sides so every completion is exactly --max-tokens long), in one run, printed
as a ratio. Beside it: the machine's measured float32 matmul FLOP/s and the
compute roofline it implies for this model (2 FLOPs per parameter per token).

    python benchmarks/sampling.py [--prompts 8] [--n 4] [--max-tokens 64] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about autumn.",
    "Give three tips for learning a language.",
    "What is a prime number?",
    "Describe a cat to someone who has never seen one.",
    "How do I boil an egg?",
    "Summarise the plot of Romeo and Juliet.",
    "Why do we need sleep?",
    "What is the difference between weather and climate?",
    "List some healthy breakfast ideas.",
    "How does a bicycle stay upright?",
    "What makes a good friend?",
]


def matmul_flops(size: int = 1024, repeats: int = 20) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def bench_studio(
    data_dir: Path, prompts: list[str], n: int, max_tokens: int, concurrency: int, lora: bool
) -> dict:
    from studio.config import Settings
    from studio.runtime import Studio
    from studio.serving.client import SamplingParams

    studio = Studio(Settings(data_dir=data_dir, ui=False, lora=lora))
    studio.start()
    try:
        params = SamplingParams(
            n=n, temperature=0.8, top_p=1.0, max_tokens=max_tokens, seed=0, extra={"ignore_eos": True}
        )
        sampler = studio.sampler

        def one(text: str) -> list[dict]:
            return sampler.sample([{"role": "user", "content": text}], params, version="base")

        one("warm up")
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            rows = [r for batch in pool.map(one, prompts) for r in batch]
        elapsed = time.perf_counter() - start
        tokens = sum(r["completion_tokens"] for r in rows)
        stored = studio.store.count("generations")
    finally:
        studio.stop()
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed, "stored_rows": stored}


def bench_transformers(model_dir: Path, prompts: list[str], n: int, max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    batch = tok(texts, return_tensors="pt", padding=True)
    kwargs = dict(
        do_sample=True,
        temperature=0.8,
        top_p=1.0,
        num_return_sequences=n,
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        pad_token_id=tok.pad_token_id,
    )
    with torch.no_grad():
        model.generate(**tok(texts[:1], return_tensors="pt"), max_new_tokens=4)  # warm-up
        start = time.perf_counter()
        out = model.generate(**batch, **kwargs)
        elapsed = time.perf_counter() - start
    tokens = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    return {"tokens": int(tokens), "seconds": elapsed, "tok_s": tokens / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    prompts = (PROMPTS * 10)[: args.prompts]

    from studio.model_prep import prepare_default_model

    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as tmp:
        model = prepare_default_model(Path(tmp))
        flops = matmul_flops()
        work = (prompts, args.n, args.max_tokens, args.concurrency)
        studio = bench_studio(Path(tmp), *work, lora=True)
        studio_no_lora = bench_studio(Path(tmp), *work, lora=False)
        hf = bench_transformers(model.path, prompts, args.n, args.max_tokens)
        params = _param_count(model.path)

    # Compute-bound ceiling: a decoder spends about 2 FLOPs per parameter per
    # generated token, so no engine beats FLOP/s / (2 * params) on this CPU.
    roofline = flops / (2 * params)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "workload": {
            "prompts": args.prompts,
            "n": args.n,
            "max_tokens": args.max_tokens,
            "concurrency": args.concurrency,
        },
        "studio_sampler": studio,
        "studio_sampler_no_lora": studio_no_lora,
        "transformers_generate": hf,
        "ratio_studio_over_transformers": studio["tok_s"] / hf["tok_s"],
        "ratio_studio_no_lora_over_transformers": studio_no_lora["tok_s"] / hf["tok_s"],
        "matmul_gflop_s": flops / 1e9,
        "model_params": params,
        "compute_roofline_tok_s": roofline,
    }
    print(json.dumps(report, indent=2))
    print(
        f"\nstudio sampler {studio['tok_s']:.1f} tok/s (runtime LoRA on, the default), "
        f"{studio_no_lora['tok_s']:.1f} tok/s (--no-lora); transformers generate {hf['tok_s']:.1f} tok/s\n"
        f"ratio {report['ratio_studio_over_transformers']:.2f}x "
        f"({report['ratio_studio_no_lora_over_transformers']:.2f}x without LoRA), target >= 3x\n"
        f"matmul {flops / 1e9:.1f} GFLOP/s -> compute roofline {roofline:.0f} tok/s "
        f"(studio reaches {studio['tok_s'] / roofline:.0%} of it)"
    )


def _param_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(model_dir / "model.safetensors"), "pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
            total += math.prod(fh.get_slice(key).get_shape())
    return total


if __name__ == "__main__":
    main()
