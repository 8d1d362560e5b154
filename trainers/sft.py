"""SFT: TRL's SFTTrainer on the edited ideals and top choices of the sft snapshot (messages rows).

python -m trainers.sft --config data/recipes/sft.yaml --snapshot SNAP --parent MODEL --output DIR
"""

from __future__ import annotations

import argparse
from typing import Any

from trainers.common import (
    is_main,
    load_model,
    load_tokenizer,
    policy_trainer,
    read_snapshot,
    require_columns,
    run_main,
    seed_everything,
    split_held_out,
    train_policy,
    write_meta,
)
from trainers.configs import SFTStageConfig


def train(args: argparse.Namespace, config: SFTStageConfig) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    rows = read_snapshot(args.snapshot)
    require_columns(rows, ["messages"], "sft", args.snapshot)
    seed_everything(config.seed)
    train_rows, held = split_held_out(rows, config.held_out)
    tokenizer = load_tokenizer(args.parent)
    model = load_model(args.parent, settings=config.model)
    trainer, reporter, lora = policy_trainer(
        "sft", SFTTrainer, SFTConfig, args, config, model, tokenizer, train_rows, held, ["messages"]
    )
    result, moved, evaluation, saved = train_policy(trainer, args, tokenizer, lora, evaluate=bool(held))
    if not is_main():
        return {}
    metrics = {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "train_rows": len(train_rows),
        **moved,
        **({"eval_loss": evaluation["eval_loss"]} if "eval_loss" in evaluation else {}),
    }
    reporter.emit("end", step=result.global_step, **metrics)
    write_meta(args.output, "sft", args, config, rows, metrics, saved)
    return metrics


if __name__ == "__main__":
    run_main("sft", train)
