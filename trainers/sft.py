"""SFT: TRL's SFTTrainer on the edited ideals and top choices of the sft snapshot (messages rows).

python -m trainers.sft --config data/recipes/sft.yaml --snapshot SNAP --parent MODEL --output DIR
"""

from __future__ import annotations

import argparse
from typing import Any

from trainers.common import (
    Reporter,
    hf_callback,
    load_model,
    load_tokenizer,
    lora_config,
    read_snapshot,
    require_columns,
    run_main,
    seed_everything,
    split_held_out,
    train_args,
    train_policy,
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
    settings = train_args(recipe, args.output)
    settings.setdefault("max_length", 512)
    settings.setdefault("assistant_only_loss", False)
    config = SFTConfig(**settings)
    reporter = Reporter(args.output, "sft", config.max_steps if config.max_steps > 0 else 0)
    lora = uses_lora(recipe)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=to_ds(train_rows),
        eval_dataset=to_ds(held) if held else None,
        processing_class=tokenizer,
        peft_config=lora_config(recipe, "CAUSAL_LM") if lora else None,
        callbacks=[hf_callback(reporter)],
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
