"""SFT: TRL's SFTTrainer on the edited ideals and top choices of the sft snapshot (messages rows).

python -m trainers.sft --config data/recipes/sft.yaml --snapshot SNAP --parent MODEL --output DIR
"""

from __future__ import annotations

import argparse
from typing import Any

from trainers.common import (
    load_model,
    load_tokenizer,
    lora_config,
    read_snapshot,
    require_columns,
    run_main,
    seed_everything,
    split_held_out,
    train_policy,
    trl_trainer,
    uses_lora,
    write_meta,
)


def train(args: argparse.Namespace, recipe: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = read_snapshot(args.snapshot)
    require_columns(rows, ["messages"], "sft", args.snapshot)
    seed_everything(int(recipe.get("seed", 0)))
    train_rows, held = split_held_out(rows, float(recipe.get("held_out", 0.0)))
    to_ds = lambda part: Dataset.from_list([{"messages": r["messages"]} for r in part])  # noqa: E731

    tokenizer = load_tokenizer(args.parent)
    model = load_model(args.parent)
    lora = uses_lora(recipe)
    trainer, reporter = trl_trainer(
        "sft",
        SFTTrainer,
        SFTConfig,
        args,
        recipe,
        model,
        tokenizer,
        to_ds(train_rows),
        to_ds(held) if held else None,
        lora_config(recipe, "CAUSAL_LM") if lora else None,
        max_length=512,
        assistant_only_loss=False,
    )
    result, moved, evaluation, saved = train_policy(trainer, args, tokenizer, lora, evaluate=bool(held))
    metrics = {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "train_rows": len(train_rows),
        **moved,
        **({"eval_loss": evaluation["eval_loss"]} if "eval_loss" in evaluation else {}),
    }
    reporter.emit("end", step=result.global_step, **metrics)
    write_meta(args.output, "sft", args, recipe, rows, metrics, saved)
    return metrics


if __name__ == "__main__":
    run_main("sft", train)
