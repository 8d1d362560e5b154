"""DPO: TRL's DPOTrainer, LoRA by default with the parent (adapter switched off) as the reference.

beta and the loss type come from the recipe's `train` section (trainers.configs.DPOStageConfig:
sigmoid, robust for noisy labels, ipo, hinge, ...).
After training, TRL's own evaluation on the held-out prompts gives reward accuracy and margins,
and the policy's chosen-minus-rejected log-probability margin is measured before and after.
With `train.margin_budget` set, training stops at the step nearest where that margin has risen
so many nats on a sample of the held-out pairs (checked at least every 1/BUDGET_CHECKS of the
schedule, and more often as the rise nears the budget: `next_budget_check`).

    python -m trainers.dpo --config data/recipes/dpo.yaml --snapshot SNAP --parent MODEL --output DIR
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from trainers.common import (
    from_main,
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
    ids = tokenizer(full, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logp[len(p_ids) - 1 :].sum())


def pair_gaps(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair: what DPO should raise on held-out prompts."""
    was_training = model.training
    model.eval()
    gaps = [
        answer_logprob(model, tokenizer, r["prompt"], r["chosen"])
        - answer_logprob(model, tokenizer, r["prompt"], r["rejected"])
        for r in rows
    ]
    model.train(was_training)  # a check during training hands the model back as it found it
    return gaps


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def logp_margin(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> float | None:
    """The mean over pairs of `pair_gaps`; None without pairs."""
    return mean(pair_gaps(model, tokenizer, rows))


# The margin budget is checked on a fixed sample of at most this many held-out pairs (18-22 s a
# check for the demo's answers on 2 cores, about 1.3 DPO steps; batching the forwards gained
# nothing), at least every 1/BUDGET_CHECKS of the schedule: 64 steps at least every 8th, the
# demo's 20 at least every 3rd.
BUDGET_PAIRS = 32
BUDGET_CHECKS = 8


def next_budget_check(
    step: int, gain: float, previous: tuple[int, float], budget: float, every: int
) -> int | None:
    """After a check at `step` measured `gain`: None to stop here, else the step of the next check.

    The rise per step since the `previous` check ((0, 0.0) at the first) predicts the steps left
    to the budget. A fixed interval overshot it: full run 16 read 0.96 nats at step 6 and 1.73 at
    step 9, and DPO broke a guard. The rise speeds up and jumps within a run (run 16: 0.11, 0.20,
    then 0.26 nats a step; run 17: 0.12, 0.07, then 0.33), and a next check after half the
    predicted steps still overshot (run 17: 0.49 at step 5, 1.47 at step 8). So the next check
    comes after a quarter of them (at least 1, at most `every`): every step once fewer than 8 are
    predicted. Training stops once less than half a step is predicted to be left, where the next
    step would overshoot the budget by more than this one falls short of it."""
    if gain >= budget:
        return None
    rate = (gain - previous[1]) / (step - previous[0])
    if rate <= 0:  # the sample's noise, or no rise yet: nothing to predict from
        return step + every
    left = (budget - gain) / rate
    if left < 0.5:
        return None
    return step + min(every, max(1, math.floor(left / 4)))


def margin_budget_callback(
    tokenizer: Any, held: list[dict[str, Any]], before: list[float], budget: float, reporter: Any
) -> Any:
    """A TrainerCallback that stops training at the step nearest where the held-out
    log-probability margin has risen `budget` nats above the parent's (`next_budget_check`).
    `before` is `pair_gaps` of the parent over `held`, which the stage measures anyway (on rank 0;
    empty elsewhere): the sample's start is read from it.

    Rank 0 measures and every rank follows its decision, so data-parallel ranks stop together."""
    import random

    from transformers import TrainerCallback

    chosen = random.Random(0).sample(range(len(held)), min(BUDGET_PAIRS, len(held)))
    pairs = [held[i] for i in chosen]
    start = mean([before[i] for i in chosen]) if is_main() else None

    class MarginBudget(TrainerCallback):
        def __init__(self) -> None:
            self.stopped: dict[str, float] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.every = max(1, math.ceil(state.max_steps / BUDGET_CHECKS))
            self.due = self.every
            self.previous = (0, 0.0)

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            step = state.global_step
            if step < self.due or step >= state.max_steps:
                return
            gain = logp_margin(model, tokenizer, pairs) - start if is_main() else 0.0
            gain = from_main(gain)  # every rank computes the same schedule from the same values
            reporter.step(step, heldout_margin_gain=gain)
            due = next_budget_check(step, gain, self.previous, budget, self.every)
            self.previous = (step, gain)
            if due is None:
                self.stopped = {"margin_budget_step": step, "margin_budget_gain": gain}
                control.should_training_stop = True
                reporter.max_steps = step  # the run is this long now: progress reads step/max, no ETA
            else:
                self.due = due

    return MarginBudget()


def train(args: argparse.Namespace, config: DPOStageConfig) -> dict[str, Any]:
    from trl import DPOConfig, DPOTrainer

    rows = read_snapshot(args.snapshot)
    require_columns(rows, COLUMNS, "dpo", args.snapshot)
    seed_everything(config.seed)
    train_rows, held = split_held_out(rows, config.held_out)
    tokenizer = load_tokenizer(args.parent)
    model = load_model(args.parent, settings=config.model)
    before = pair_gaps(model, tokenizer, held) if is_main() else []  # rank 0 reports it
    trainer, reporter, lora = policy_trainer(
        "dpo", DPOTrainer, DPOConfig, args, config, model, tokenizer, train_rows, held, COLUMNS
    )
    budget = None
    if config.train.margin_budget is not None:
        budget = margin_budget_callback(tokenizer, held, before, config.train.margin_budget, reporter)
        trainer.add_callback(budget)
    result, moved, evaluation, saved = train_policy(trainer, args, tokenizer, lora, evaluate=bool(held))
    if not is_main():
        return {}
    metrics = {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        **(budget.stopped if budget else {}),
        **moved,
        "train_pairs": len(train_rows),
        "heldout_pairs": len(held),
        "heldout_logp_margin_before": mean(before),
        "heldout_logp_margin_after": logp_margin(trainer.model, tokenizer, held),
        **{k: v for k, v in evaluation.items() if k.startswith("eval_rewards") or k == "eval_loss"},
    }
    reporter.emit("end", step=result.global_step, **{k: v for k, v in metrics.items() if v is not None})
    write_meta(args.output, "dpo", args, config, rows, metrics, saved)
    return metrics


if __name__ == "__main__":
    run_main("dpo", train)
