"""Reward model: TRL's RewardTrainer on a sequence-classification head over the parent.

LoRA by default, with the score head saved alongside the adapter (modules_to_save). The margin
column of the preference snapshot (from the annotators' stated strength) widens the score gap
the loss asks for. Accuracy is measured on the held-out prompts after training.

    python -m trainers.reward --config data/recipes/reward.yaml --snapshot SNAP --parent MODEL --output DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from trainers.common import (
    is_main,
    load_model,
    load_tokenizer,
    lora_config,
    moved_report,
    read_snapshot,
    require_columns,
    run_main,
    save_trained,
    seed_everything,
    split_held_out,
    trainable_copy,
    trl_trainer,
    write_meta,
)
from trainers.configs import RewardStageConfig

COLUMNS = ("prompt", "chosen", "rejected")


def score(
    model: Any, tokenizer: Any, conversations: list[list[dict]], max_length: int = 1024, batch_size: int = 8
) -> list[float]:
    """One scalar per conversation (prompt + assistant answer), as the reward model sees it."""
    import torch

    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    scores: list[float] = []
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # the classification head reads the last non-pad token
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(
                    texts[i : i + batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    add_special_tokens=False,
                )
                scores += model(**enc).logits[:, 0].float().tolist()
    finally:
        tokenizer.padding_side = side
    return scores


def pair_accuracy(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_length: int
) -> dict[str, float]:
    if not rows:
        return {}
    chosen = score(model, tokenizer, [r["prompt"] + r["chosen"] for r in rows], max_length)
    rejected = score(model, tokenizer, [r["prompt"] + r["rejected"] for r in rows], max_length)
    gaps = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "heldout_accuracy": sum(g > 0 for g in gaps) / len(gaps),
        "heldout_mean_margin": sum(gaps) / len(gaps),
        "heldout_pairs": len(gaps),
    }


def load_reward_model(folder: Path) -> tuple[Any, Any]:
    """A reward model written by this stage, ready to score (adapter merged into its parent)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    meta_file = folder / "meta.json"
    if not meta_file.is_file() or json.loads(meta_file.read_text()).get("stage") != "reward":
        raise SystemExit(
            f"error: --reward-model {folder}: not a finished reward-model run (no meta.json "
            "with stage 'reward'); train one with trainers.reward first"
        )
    meta = json.loads(meta_file.read_text())
    tokenizer = load_tokenizer(Path(meta["parent"]))
    if (folder / "adapter_config.json").is_file():
        model = load_model(Path(meta["parent"]), AutoModelForSequenceClassification, num_labels=1)
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    else:
        model = load_model(folder, AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def train(args: argparse.Namespace, config: RewardStageConfig) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    rows = read_snapshot(args.snapshot)
    require_columns(rows, COLUMNS, "reward", args.snapshot)
    seed_everything(config.seed)
    train_rows, held = split_held_out(rows, config.held_out)
    keep = [*COLUMNS, "margin"] if config.use_margin and "margin" in rows[0] else list(COLUMNS)
    dataset = Dataset.from_list([{k: r[k] for k in keep} for r in train_rows])

    tokenizer = load_tokenizer(args.parent)
    model = load_model(args.parent, AutoModelForSequenceClassification, config.model, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    peft = lora_config(config.lora, "SEQ_CLS", modules_to_save=["score"])
    # no eval_dataset: held-out accuracy is measured after training (pair_accuracy)
    trainer, reporter = trl_trainer(
        "reward", RewardTrainer, RewardConfig, args, config, model, tokenizer, dataset, None, peft
    )
    before_training = trainable_copy(trainer.model)
    result = trainer.train()
    moved = moved_report(trainer.model, before_training)
    save_trained(trainer, args.output)
    if not is_main():  # rank 0 measures and writes what the studio reads
        return {}
    metrics = {
        "train_loss": result.training_loss,
        "train_pairs": len(train_rows),
        "steps": result.global_step,
        **moved,
        **pair_accuracy(trainer.model, tokenizer, held, trainer.args.max_length or 1024),
    }
    reporter.emit("end", step=result.global_step, **metrics)
    write_meta(args.output, "reward", args, config, rows, metrics, {"kind": "reward"})
    return metrics


if __name__ == "__main__":
    run_main("reward", train)
