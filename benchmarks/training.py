"""Training through the studio against the same trainer driven directly; PPO against DPO per step.

For each stage, one run goes through the studio's path (snapshot from DuckDB, the queued runner,
`python -m trainers.<stage>` in a subprocess, progress from metrics.jsonl) and one drives the same
library directly in a plain subprocess (TRL's trainer built by hand with the same settings; for
PPO, `trainers.ppo.train_ppo` called without the studio). Time per step is taken between the first
and the last logged step, so model loading and process start are left out of both sides.

python benchmarks/training.py [--steps 6] [--ppo-iterations 3] [--batch 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES = ROOT / "data" / "recipes"


# ---------------------------------------------------------------- the direct side (a subprocess)


def direct(stage: str, snapshot: Path, parent: Path, out: Path, steps: int, batch: int) -> None:
    """Build the library's trainer by hand, with the recipe's settings, and time each step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    from trainers.common import read_snapshot
    from trainers.configs import validate

    times: list[float] = []
    if stage == "ppo":
        from trainers.ppo import train_ppo

        sizes = {"ppo.iterations": steps, "ppo.batch_size": batch, "ppo.mini_batch_size": max(1, batch // 2)}
        config = validate(stage, RECIPES / f"{stage}.yaml", sizes)
        args = argparse.Namespace(snapshot=snapshot, parent=parent, output=out, reward_model="rule:brevity")
        train_ppo(args, config, report=lambda row: times.append(time.perf_counter()))
        (out / "direct.json").write_text(json.dumps({"times": times}))
        return

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter())

    config = validate(stage, RECIPES / f"{stage}.yaml")
    rows = read_snapshot(snapshot)
    tokenizer = AutoTokenizer.from_pretrained(parent)
    lora = config.lora
    common = {
        "output_dir": str(out / "ckpt"),
        "bf16": False,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "max_steps": steps,
        "per_device_train_batch_size": batch,
        "learning_rate": config.train.learning_rate,
        "max_length": config.train.max_length,
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": config.seed,  # the studio run's batches, so the same lengths
    }
    peft = {
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.target_modules,
    }
    if stage == "reward":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(parent, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        data = Dataset.from_list(
            [{k: r[k] for k in ("prompt", "chosen", "rejected", "margin")} for r in rows]
        )
        trainer = RewardTrainer(
            model=model,
            args=RewardConfig(**common),
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[Clock()],
            peft_config=LoraConfig(task_type="SEQ_CLS", modules_to_save=["score"], **peft),
        )
    elif stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)
        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(beta=config.train.beta, **common),
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[Clock()],
            peft_config=LoraConfig(task_type="CAUSAL_LM", **peft),
        )
    else:
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)
        data = Dataset.from_list([{"messages": r["messages"]} for r in rows])
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**common),
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[Clock()],
            peft_config=LoraConfig(task_type="CAUSAL_LM", **peft),
        )
    trainer.train()
    (out / "direct.json").write_text(json.dumps({"times": times}))


def per_step(times: list[float]) -> float:
    return (times[-1] - times[0]) / (len(times) - 1)


# ---------------------------------------------------------------- the studio side


def studio_run(store: Any, data_dir: Path, stage: str, steps: int, batch: int) -> dict[str, Any]:
    from studio import training
    from studio.jobs import Runner, read_metrics, register_stage

    class NoServer:  # the benchmark measures training; a policy adapter is registered, not served
        def __init__(self) -> None:
            self.store, self.task_sampler = store, None

        def add_adapter(self, name: str, path: Path, source: str, meta: dict, parent: str) -> dict:
            return store.register_model_version(
                name, path=str(path), content_hash=name, source=source, kind="lora", parent=parent, meta=meta
            )

    overrides: dict[str, Any] = (
        {"ppo.batch_size": batch, "ppo.mini_batch_size": max(1, batch // 2)}
        if stage == "ppo"
        else {"train.per_device_train_batch_size": batch}
    )
    if stage == "ppo":
        overrides["ppo.iterations"] = steps
    runner = Runner(store, data_dir, lambda *a: register_stage(NoServer(), *a))
    runner.start()
    try:
        run = training.submit_run(
            store,
            data_dir,
            stage=stage,
            created_by="bench",
            campaigns=["easy"],
            steps=None if stage == "ppo" else steps,
            held_out=0.0,
            overrides=overrides,
            reward_model=None,
        )
        runner.poke()
        while (run := training.get_run(store, run["id"]))["status"] in ("queued", "running"):
            time.sleep(0.5)
    finally:
        runner.stop()
    if run["status"] != "succeeded":
        raise SystemExit(f"{stage} through the studio: {run['status']}: {run['reason']}")
    key = "policy_loss" if stage == "ppo" else "loss"
    events = [e for e in read_metrics(Path(run["output_dir"])) if e["event"] == "step" and key in e]
    return {
        "per_step": per_step([e["elapsed"] for e in events]),
        "events": events,
        "snapshot": store.query("SELECT path FROM snapshots WHERE id = ?", [run["snapshot_id"]])[0]["path"],
    }


def direct_run(stage: str, snapshot: Path, parent: Path, tmp: Path, steps: int, batch: int) -> float:
    """The direct side in a plain subprocess on the studio run's snapshot; seconds per step."""
    out = Path(tempfile.mkdtemp(prefix=f"direct-{stage}-", dir=tmp))
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--direct",
            stage,
            "--snapshot",
            str(snapshot),
            "--parent",
            str(parent),
            "--out",
            str(out),
            "--steps",
            str(steps),
            "--batch",
            str(batch),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return per_step(json.loads((out / "direct.json").read_text())["times"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per run (PPO: --ppo-iterations)")
    parser.add_argument("--ppo-iterations", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="the same batch for every stage")
    parser.add_argument("--stages", default="reward,dpo,sft,ppo")
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs per side, the order alternating (studio first in round 1)"
    )
    parser.add_argument("--direct", help=argparse.SUPPRESS)
    parser.add_argument("--snapshot", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--parent", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct:
        direct(args.direct, args.snapshot, args.parent, args.out, args.steps, args.batch)
        return

    from studio.campaigns import ensure_policy_alias
    from studio.model_prep import prepare_default_model
    from studio.store import Store
    from tests.helpers import seed_easy_judgments

    tmp = Path(tempfile.mkdtemp(prefix="bench-training-"))
    prepared = prepare_default_model(tmp)
    store = Store(tmp / "studio.duckdb")
    store.register_model_version(
        "base", path=str(prepared.path), content_hash=prepared.content_hash, source=prepared.source
    )
    ensure_policy_alias(store, "base")
    seed_easy_judgments(store, "easy", n=40)
    results: dict[str, dict[str, float]] = {}
    for stage in args.stages.split(","):
        steps = args.ppo_iterations if stage == "ppo" else args.steps
        if stage == "ppo":  # the studio's PPO needs a reward version; the direct side uses a rule reward,
            # so the studio side gets the same rule through a reward version that names it
            store.register_model_version(
                "rule-brevity",
                path="rule:brevity",
                content_hash="rule",
                source="bench",
                kind="reward",
                parent="base",
            )
        # Rounds alternate the order (studio then direct, then direct then studio, ...), so that
        # a drift of the machine's speed, or a cost of going first, is not read as the studio's.
        studio_steps: list[float] = []
        direct_steps: list[float] = []
        snapshot = None
        for round_ in range(args.rounds):
            order = ("studio", "direct") if round_ % 2 == 0 else ("direct", "studio")
            for side in order:
                if side == "studio":
                    studio = studio_run(store, tmp, stage, steps, args.batch)
                    snapshot = studio["snapshot"]  # the same rows every round: snapshots are by content
                    studio_steps.append(studio["per_step"])
                else:
                    seconds = direct_run(stage, Path(snapshot), prepared.path, tmp, steps, args.batch)
                    direct_steps.append(seconds)
        studio_step = sum(studio_steps) / len(studio_steps)
        direct_step = sum(direct_steps) / len(direct_steps)
        results[stage] = {
            "studio_s_per_step": round(studio_step, 3),
            "direct_s_per_step": round(direct_step, 3),
            "ratio": round(studio_step / direct_step, 3),
            "rounds": [[round(a, 3), round(b, 3)] for a, b in zip(studio_steps, direct_steps, strict=True)],
        }
        if stage == "ppo":
            rollout = sum(e["time_rollout"] for e in studio["events"]) / len(studio["events"])
            results[stage]["rollout_share"] = round(rollout / studio["per_step"], 3)  # the last round
        print(stage, results[stage], flush=True)
    if "ppo" in results and "dpo" in results:
        results["ppo_vs_dpo"] = {
            "ratio": round(results["ppo"]["studio_s_per_step"] / results["dpo"]["studio_s_per_step"], 2)
        }
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "batch": args.batch,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
