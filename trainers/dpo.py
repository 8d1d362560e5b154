"""DPO: TRL's DPOTrainer, LoRA by default with the parent (adapter switched off) as the reference.

beta and the loss type come from the recipe's `train` section (trainers.configs.DPOStageConfig:
sigmoid, robust for noisy labels, ipo, hinge, ...).
After training, TRL's own evaluation on the held-out prompts gives reward accuracy and margins,
and the policy's chosen-minus-rejected log-probability margin is measured before and after.

    python -m trainers.dpo --config data/recipes/dpo.yaml --snapshot SNAP --parent MODEL --output DIR
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
from trainers.configs import DPOStageConfig

COLUMNS = ("prompt", "chosen", "rejected")


def answer_logprob(model: Any, tokenizer: Any, prompt: list[dict], answer: list[dict]) -> float:
    """Sum of the answer's token log-probabilities given the prompt, under the chat template."""
    import torch

    prefix = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logp[len(p_ids) - 1 :].sum())


def logp_margin(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> float | None:
    """Mean over pairs of log p(chosen) - log p(rejected): what DPO should raise on held-out prompts."""
    if not rows:
        return None
    model.eval()
    gaps = [
        answer_logprob(model, tokenizer, r["prompt"], r["chosen"])
        - answer_logprob(model, tokenizer, r["prompt"], r["rejected"])
        for r in rows
    ]
    return sum(gaps) / len(gaps)


def train(args: argparse.Namespace, config: DPOStageConfig) -> dict[str, Any]:
    from trl import DPOConfig, DPOTrainer

    rows = read_snapshot(args.snapshot)
    require_columns(rows, COLUMNS, "dpo", args.snapshot)
    seed_everything(config.seed)
    train_rows, held = split_held_out(rows, config.held_out)
    tokenizer = load_tokenizer(args.parent)
    model = load_model(args.parent, settings=config.model)
    before = logp_margin(model, tokenizer, held) if is_main() else None  # rank 0 reports it
    trainer, reporter, lora = policy_trainer(
        "dpo", DPOTrainer, DPOConfig, args, config, model, tokenizer, train_rows, held, COLUMNS
    )
    result, moved, evaluation, saved = train_policy(trainer, args, tokenizer, lora, evaluate=bool(held))
    if not is_main():
        return {}
    metrics = {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        **moved,
        "train_pairs": len(train_rows),
        "heldout_pairs": len(held),
        "heldout_logp_margin_before": before,
        "heldout_logp_margin_after": logp_margin(trainer.model, tokenizer, held),
        **{k: v for k, v in evaluation.items() if k.startswith("eval_rewards") or k == "eval_loss"},
    }
    reporter.emit("end", step=result.global_step, **{k: v for k, v in metrics.items() if v is not None})
    write_meta(args.output, "dpo", args, config, rows, metrics, saved)
    return metrics


if __name__ == "__main__":
    run_main("dpo", train)
