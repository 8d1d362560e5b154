"""Time per evaluation suite for one version on this machine, and the share spent generating.

python benchmarks/evaluation.py [--limit N] [--suite S ...] [--concurrency 32] [--seed 0]

Starts the managed vLLM on the packaged SmolLM2-135M-Instruct (runtime LoRA on, as the studio
runs it), registers a LoRA version over it (rank 8, random weights: a trained adapter costs the
same), and evaluates it against the base with the cache off, so that every suite runs on both.
For each suite and side it reports the wall time of the run (requests, scoring, storing) and
the part of it spent waiting on the model server. Run it alone (the machine has 2 cores):
    flock /tmp/heavy.lock python benchmarks/evaluation.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def make_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    # small random deltas: the version answers differently from the base, but still in English
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    peft_model.save_pretrained(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the model and database here")
    parser.add_argument("--suite", action="append", dest="suites", help="a suite (repeat); default all")
    parser.add_argument("--limit", type=int, default=None, help="items per suite (default: all)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--second-child",
        action="store_true",
        help="then evaluate a second LoRA version against the same parent with the cache on, as the "
        "automatic evaluation after a run does: only the child's side runs",
    )
    args = parser.parse_args()

    from studio.evals.engine import evaluate, get_eval, list_evals
    from studio.model_prep import prepare_default_model
    from studio.serving.client import OpenAIChatBackend
    from studio.serving.vllm_server import VLLMServer
    from studio.store import Store

    data = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-eval-"))
    data.mkdir(parents=True, exist_ok=True)
    prepared = prepare_default_model(data)
    adapter = make_adapter(prepared.path, data / "bench-lora")
    store = Store(data / "studio.duckdb")
    store.register_model_version(
        "base", path=str(prepared.path), content_hash=prepared.content_hash, source=prepared.source
    )
    from studio.model_prep import folder_hash

    store.register_model_version(
        "bench-lora",
        path=str(adapter),
        content_hash=folder_hash(adapter),
        source="bench",
        kind="lora",
        parent="base",
    )
    server = VLLMServer(prepared.path, "base", data / "vllm.log")
    started = time.perf_counter()
    server.start()
    print(f"vLLM ready in {time.perf_counter() - started:.0f} s", flush=True)
    backend = OpenAIChatBackend(server.url)
    try:
        backend.load_lora("bench-lora", str(adapter))
        t0 = time.perf_counter()
        result = evaluate(
            store,
            backend,
            "bench-lora",
            "base",
            suites=args.suites,
            seed=args.seed,
            limit=args.limit,
            concurrency=args.concurrency,
            use_cache=False,
            progress=lambda msg: print(f"  [{time.perf_counter() - t0:6.1f} s] {msg}", flush=True),
        )
        total = time.perf_counter() - t0
        record = get_eval(store, list_evals(store, "bench-lora", limit=1)[0]["id"])
        rows = []
        for suite, info in record["details"]["suites"].items():
            for side in ("version", "against"):
                if side not in info["duration_s"]:
                    continue
                d, g = info["duration_s"][side], info["generate_s"][side]
                rows.append(
                    {
                        "suite": suite,
                        "side": "LoRA version" if side == "version" else "base",
                        "items": info["items"],
                        "seconds": d,
                        "generate_s": g,
                        "generate_share": g / d if d else 0.0,
                    }
                )
        print()
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        print("| suite | side | items | seconds | waiting on vLLM | share |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(
                f"| {r['suite']} | {r['side']} | {r['items']} | {r['seconds']:.1f} | {r['generate_s']:.1f} |"
                f" {r['generate_share']:.0%} |"
            )
        one_version = sum(r["seconds"] for r in rows if r["side"] == "LoRA version")
        print(f"\none version (LoRA side, all suites): {one_version:.0f} s; whole evaluation: {total:.0f} s")
        print(json.dumps(result["metrics"], indent=1))
        second: dict[str, float] | None = None
        if args.second_child:
            other = make_adapter(prepared.path, data / "bench-lora-2", seed=1)
            store.register_model_version(
                "bench-lora-2",
                path=str(other),
                content_hash=folder_hash(other),
                source="bench",
                kind="lora",
                parent="base",
            )
            backend.load_lora("bench-lora-2", str(other))
            t1 = time.perf_counter()
            evaluate(
                store,
                backend,
                "bench-lora-2",
                "base",
                suites=args.suites,
                seed=args.seed,
                limit=args.limit,
                concurrency=args.concurrency,
                progress=lambda msg: print(f"  [{time.perf_counter() - t1:6.1f} s] {msg}", flush=True),
            )
            details = list_evals(store, "bench-lora-2", limit=1)[0]["details"]["suites"]
            reused = [name for name, info in details.items() if info["cached"].get("against")]
            second = {"total_s": time.perf_counter() - t1, "parent_runs_reused": len(reused)}
            print(
                f"\nsecond child against the same parent (cache on): {second['total_s']:.0f} s; "
                f"parent runs reused: {', '.join(reused) or 'none'}"
            )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {"rows": rows, "total_s": total, "metrics": result["metrics"], "second_child": second},
                    indent=1,
                )
            )
    finally:
        backend.close()
        server.stop()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
