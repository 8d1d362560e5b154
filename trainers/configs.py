"""Each training stage's settings: one documented, validated dataclass per stage.

A recipe (data/recipes/<stage>.yaml) is that dataclass written out, in sections: `model` (how the
parent is loaded), `lora`, and `train` (TRL's trainer settings) or `ppo` (our PPO loop). Overrides
name the same settings with dotted keys: `--train.beta 0.2` on a trainer's command line,
`train.beta=0.2` in the studio. `validate` is the one door for both: it reads the recipe, applies
the overrides, refuses an unknown key with the nearest valid one and the list of valid keys, and
returns the stage's config, whose `__post_init__` checks every value.

The `train` sections use the names of TRL's own config fields (RewardConfig, DPOConfig,
SFTConfig) and TRL's defaults, except where a field's help says why not. They are plain data:
the studio validates a run (a GPU recipe too, on a CPU box) without importing torch, and the stage
builds TRL's config from them on the machine that trains, where TRL checks the rest.

    python -m trainers.configs dpo data/recipes/dpo.yaml --train.beta 0.2   # the full recipe, documented
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import math
import sys
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """A recipe or an override that a stage cannot use, said so that the user can fix it.
    `key` is the dotted setting at fault, when there is one."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


# Settings that older recipes spelled otherwise, or that the stage owns: refused with what to write.
REPLACED = {
    "full_weights": "to train all weights write `lora: {enabled: false}` (override lora.enabled=false)",
    "lora": "LoRA is switched by lora.enabled (false trains all weights); its other settings are "
    "lora.r, lora.alpha, lora.dropout, lora.target_modules",
    "train.seed": "the one seed is the top-level `seed`; it seeds TRL's trainer too",
    "train.output_dir": "the trainer writes into its --output folder (checkpoints under output/checkpoints)",
    "train.use_cpu": "the trainer uses the GPU when torch sees one, the CPU otherwise",
    "train.logging_steps": "every step is logged: the studio's progress and curves read each one",
}

# transformers' SchedulerType and FSDPOption values, and TRL 1.16's DPO losses (tests/test_configs.py
# checks them against the installed libraries), so that a typo fails at submit, not on the GPU node.
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)
FSDP_OPTIONS = (
    "full_shard",
    "shard_grad_op",
    "no_shard",
    "hybrid_shard",
    "hybrid_shard_zero2",
    "offload",
    "auto_wrap",
)
DPO_LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
DTYPES = ("float32", "bfloat16", "float16", "auto")


# ---------------------------------------------------------------- typed fields


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "text", type(None): "null"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) is list or hint is list:
        return "a list such as [a, b]"
    if typing.get_origin(hint) is dict or hint is dict:
        return "a mapping such as {key: value}"
    return str(hint)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as type `hint`. YAML 1.1 reads 1e-4 (no dot) as text, so numbers are also read from text."""
    origin = typing.get_origin(hint)
    wrong = ConfigError(f"{key} {value!r}: expected {_describe(hint)}", key)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _coerce(value, option, key)
                except ConfigError:
                    pass
        raise wrong
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if hint in (int, float):
        if isinstance(value, bool):
            raise wrong
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise wrong from None
        if not isinstance(number, int | float) or not math.isfinite(number):
            raise wrong
        if hint is int:
            if not float(number).is_integer():
                raise wrong
            return int(number)
        return float(number)
    if hint is str:
        if isinstance(value, str):
            return value
        raise wrong
    if origin is list:
        if not isinstance(value, list | tuple):
            raise wrong
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise wrong
        return dict(value)
    raise TypeError(f"{key}: no reader for {hint}")


@dataclass
class Section:
    """A group of settings. Its `__post_init__` reads each value as the annotated type and names the
    field (with its section) in every complaint; subclasses add their checks after it."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):
            if not (isinstance(hints[f.name], type) and is_dataclass(hints[f.name])):
                setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], self.key(f.name)))

    def key(self, name: str) -> str:
        return f"{self.SECTION}.{name}" if self.SECTION else name

    def bad(self, name: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.key(name)} {getattr(self, name)!r}: {problem}", self.key(name))


# ---------------------------------------------------------------- sections


@dataclass
class ModelSettings(Section):
    SECTION: ClassVar[str] = "model"

    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype the parent's weights are loaded in: float32 (this CPU has no bf16 units; bf16 "
            "runs 30-70x slower here), bfloat16 for a GPU run, float16, or auto (the checkpoint's own)"
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "attention kernel passed to from_pretrained: sdpa, eager, or flash_attention_2 (GPU, "
            "needs the flash-attn package); null lets transformers choose"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype not in DTYPES:
            raise self.bad("dtype", f"use one of {', '.join(DTYPES)}")


@dataclass
class LoraSettings(Section):
    SECTION: ClassVar[str] = "lora"

    enabled: bool = field(
        default=True,
        metadata={
            "help": "train a LoRA adapter over the frozen parent; false trains all weights (such a policy "
            "is registered but served only by `studio serve --model DIR`; PPO needs LoRA)"
        },
    )
    r: int = field(
        default=8,
        metadata={
            "help": "adapter rank; a child of an adapter is saved as one adapter over the base, exact "
            "while the summed rank fits the 16 that vLLM serves"
        },
    )
    alpha: int = field(default=16, metadata={"help": "LoRA alpha: the update is scaled by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input, in [0, 1)"})
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={
            "help": "modules that get an adapter: a list of names, a regular expression, or all-linear; "
            "the attention projections by default"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise self.bad("r", "use a rank of at least 1, e.g. 8")
        if self.alpha <= 0:
            raise self.bad("alpha", "must be greater than 0; twice the rank is usual")
        if not 0 <= self.dropout < 1:
            raise self.bad("dropout", "use a probability in [0, 1), e.g. 0.05")
        if not self.target_modules:
            raise self.bad("target_modules", "name at least one module, e.g. [q_proj, v_proj]")


def _learning_rate(default: float) -> Any:
    return field(
        default=default,
        metadata={
            "help": "peak learning rate of AdamW (TRL's default for this stage, set for full weights; "
            "LoRA takes far more, about 5e-4 in the shipped recipes)"
        },
    )


@dataclass
class TrainSettings(Section):
    """TRL trainer settings the stages share; each name is a field of TRL's config for the stage."""

    SECTION: ClassVar[str] = "train"

    learning_rate: float = _learning_rate(5e-5)
    num_train_epochs: float = field(
        default=3.0, metadata={"help": "passes over the training rows; max_steps, when set, wins"}
    )
    max_steps: int = field(
        default=-1,
        metadata={
            "help": "optimizer steps to train; -1 lets num_train_epochs decide (the studio's step count "
            "sets this)"
        },
    )
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "training rows per process and step"}
    )
    per_device_eval_batch_size: int = field(
        default=8, metadata={"help": "held-out rows per process and step"}
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "batches summed before each optimizer step: the effective batch is "
            "per_device_train_batch_size x this x the number of processes"
        },
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={
            "help": "recompute activations in the backward pass: far less memory for about 20% more "
            "compute (TRL's default)"
        },
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "passed to gradient_checkpointing_enable, e.g. {use_reentrant: false}, which LoRA "
            "under DDP or FSDP needs"
        },
    )
    max_length: int | None = field(
        default=512,
        metadata={
            "help": "tokens kept per example (prompt and answer), the rest is cut; null keeps all. 512 "
            "(TRL: 1024): the studio's rows are short, and a CPU step grows with the padded length"
        },
    )
    lr_scheduler_type: str = field(
        default="linear", metadata={"help": f"learning-rate schedule: {', '.join(SCHEDULERS)}"}
    )
    warmup_steps: float = field(
        default=0.0,
        metadata={
            "help": "steps of linear warm-up from 0; a value below 1 is a share of all steps (0.1 = 10%)"
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "gradients are clipped to this global norm; 0 turns clipping off"}
    )
    optim: str = field(
        default="adamw_torch_fused",
        metadata={"help": "optimizer name as transformers knows it, e.g. adamw_torch, adamw_8bit, adafactor"},
    )
    bf16: bool = field(
        default=False,
        metadata={
            "help": "bfloat16 mixed precision: true on Ampere or newer GPUs; false on this CPU, where it "
            "is 30-70x slower (TRL turns it on unless told)"
        },
    )
    fp16: bool = field(
        default=False, metadata={"help": "float16 mixed precision (older GPUs); not with bf16"}
    )
    deepspeed: str | None = field(
        default=None,
        metadata={
            "help": "DeepSpeed config file (ZeRO stage, offload); a relative path is read from the "
            "recipe's folder. Needs the deepspeed package on the training machine",
            "path": True,
        },
    )
    fsdp: str | None = field(
        default=None,
        metadata={
            "help": "PyTorch FSDP mode, words from: "
            + ", ".join(FSDP_OPTIONS)
            + ' (e.g. "full_shard auto_wrap"); not with deepspeed'
        },
    )
    fsdp_config: str | dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "FSDP settings: a JSON file (a relative path is read from the recipe's folder) or a "
            "mapping, e.g. {transformer_layer_cls_to_wrap: [LlamaDecoderLayer]}",
            "path": True,
        },
    )
    ddp_find_unused_parameters: bool | None = field(
        default=None,
        metadata={
            "help": "let DDP look for parameters without gradients; false is the usual choice with "
            "gradient checkpointing; null lets transformers decide"
        },
    )
    report_to: list[str] = field(
        default_factory=list,
        metadata={
            "help": "experiment trackers that also get the logs, e.g. [wandb]; [] for none (metrics.jsonl "
            "in the output folder always gets them)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.learning_rate <= 0:
            raise self.bad("learning_rate", "must be greater than 0, e.g. 5e-4 for LoRA")
        if self.num_train_epochs <= 0:
            raise self.bad("num_train_epochs", "must be greater than 0")
        if self.max_steps != -1 and self.max_steps < 1:
            raise self.bad("max_steps", "use -1 (epochs decide) or a positive number of steps")
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            if getattr(self, name) < 1:
                raise self.bad(name, "use 1 or more")
        if self.max_length is not None and self.max_length < 1:
            raise self.bad("max_length", "use a positive number of tokens, or null for no limit")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise self.bad("lr_scheduler_type", f"use one of {', '.join(SCHEDULERS)}")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise self.bad(name, "must be 0 or more")
        if self.bf16 and self.fp16:
            raise self.bad("fp16", "bf16 is on too; pick one mixed precision")
        if self.deepspeed and self.fsdp:
            raise self.bad("fsdp", "deepspeed is set too; shard with one of them")
        unknown = set((self.fsdp or "").split()) - set(FSDP_OPTIONS)
        if unknown:
            raise self.bad(
                "fsdp", f"unknown word(s) {', '.join(sorted(unknown))}; use {', '.join(FSDP_OPTIONS)}"
            )
        for name in ("deepspeed", "fsdp_config"):
            value = getattr(self, name)
            if isinstance(value, str) and not Path(value).is_file():
                raise self.bad(
                    name, "no such file (a relative path in a recipe is read from the recipe's folder)"
                )

    def trl_kwargs(self) -> dict[str, Any]:
        """These settings as keyword arguments of TRL's config for the stage."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        kwargs["report_to"] = kwargs["report_to"] or "none"
        return kwargs


@dataclass
class RewardTrainSettings(TrainSettings):
    """Settings of TRL's RewardConfig."""

    learning_rate: float = _learning_rate(1e-4)
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={
            "help": "weight of a penalty on the squared mean reward, which keeps scores centred on 0 "
            "(Eisenstein et al. 2023 use 0.01); null for none"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise self.bad("center_rewards_coefficient", "must be 0 or more, or null")


@dataclass
class DPOTrainSettings(TrainSettings):
    """Settings of TRL's DPOConfig."""

    learning_rate: float = _learning_rate(1e-6)
    beta: float = field(
        default=0.1,
        metadata={
            "help": "strength of the pull towards the reference (the parent): higher stays closer; "
            "for ipo it is the regulariser tau"
        },
    )
    loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": "sigmoid is the DPO loss (Rafailov et al. 2023); robust, with label_smoothing set to "
            "the share of flipped labels you expect, is the noise-robust variant (Chowdhury et al. 2024); "
            f"others: {', '.join(DPO_LOSSES[1:])}"
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "assumed share of flipped preference labels, in [0, 0.5), for the robust and "
            "sigmoid (conservative DPO) losses"
        },
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "compute the reference's log-probabilities once before training, to keep one model "
            "less in memory during it"
        },
    )
    sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of a negative log-likelihood term on the chosen answers added to the loss "
            "(RPO, Pang et al. 2024, use 1.0): it anchors the policy on text it was shown to be good, "
            "where plain DPO can lower both answers' likelihood; 0 for plain DPO"
        },
    )

    margin_budget: float | None = field(
        default=None,
        metadata={
            "help": "stop at the step nearest where the policy's mean log p(chosen) - log p(rejected) "
            "on held-out pairs has risen this many nats above its parent's (on up to 32 of them, at "
            "least every eighth of the schedule and every step near the budget): past a small rise "
            "DPO pays for the margin with other skills (docs/demo.md: 1 nat in the demo). Needs "
            "held_out > 0; unset trains every step"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.margin_budget is not None and not self.margin_budget > 0:
            raise self.bad("margin_budget", "use a rise in nats greater than 0, e.g. 1.0, or leave it unset")
        if self.sft_weight < 0:
            raise self.bad("sft_weight", "must be 0 (plain DPO) or more; RPO uses 1.0")
        if self.sft_weight > 0 and self.loss_type == "sft":
            raise self.bad("sft_weight", "loss_type is sft already; set sft_weight to 0")
        if self.beta <= 0:
            raise self.bad("beta", "must be greater than 0; 0.1 is usual")
        if self.loss_type not in DPO_LOSSES:
            raise self.bad("loss_type", f"use one of {', '.join(DPO_LOSSES)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise self.bad("label_smoothing", "use a share of flipped labels in [0, 0.5), e.g. 0.1")

    def trl_kwargs(self) -> dict[str, Any]:
        # TRL 1.x has no rpo_alpha: the same loss is a list of losses with weights
        kwargs = super().trl_kwargs()
        kwargs.pop("margin_budget")  # the stage's own stop (trainers.dpo), not TRL's
        weight = kwargs.pop("sft_weight")
        if weight > 0:
            kwargs["loss_type"] = [kwargs["loss_type"], "sft"]
            kwargs["loss_weights"] = [1.0, weight]
        return kwargs


@dataclass
class SFTTrainSettings(TrainSettings):
    """Settings of TRL's SFTConfig."""

    learning_rate: float = _learning_rate(2e-5)
    assistant_only_loss: bool = field(
        default=False,
        metadata={
            "help": "train on the assistant's tokens only (needs a chat template that marks them with "
            "{% generation %}); false trains on the whole conversation"
        },
    )
    packing: bool = field(
        default=False,
        metadata={"help": "pack several short conversations into each max_length sequence"},
    )


@dataclass
class PPOSettings(Section):
    """Our PPO loop (trainers/ppo.py), after Ziegler et al. 2019, Ouyang et al. 2022, Huang et al. 2024."""

    SECTION: ClassVar[str] = "ppo"

    iterations: int = field(
        default=6, metadata={"help": "rollout-and-optimise rounds (the studio's step count sets this)"}
    )
    batch_size: int = field(
        default=8,
        metadata={
            "help": "answers sampled per rollout, in all (batch_size / samples_per_prompt prompts; N "
            "processes sample batch_size / N each)"
        },
    )
    samples_per_prompt: int = field(
        default=1,
        metadata={
            "help": "answers per prompt in a rollout; above 1 each answer's score is taken less the mean "
            "score of its prompt's other answers (a leave-one-out baseline, Ahmadian et al. 2024), so "
            "an update rewards what an answer does better than its siblings, not what its prompt draws"
        },
    )
    mini_batch_size: int = field(
        default=4,
        metadata={"help": "rollouts per gradient step, in all; divides batch_size (both divide by N)"},
    )
    epochs: int = field(default=4, metadata={"help": "optimisation passes over each rollout batch"})
    learning_rate: float = field(
        default=2e-4,
        metadata={"help": "AdamW learning rate; LoRA tolerates far more than the 3e-6 of full-weight PPO"},
    )
    max_new_tokens: int = field(default=40, metadata={"help": "longest response sampled, in tokens"})
    temperature: float = field(
        default=0.7, metadata={"help": "sampling temperature; log-probabilities are taken at it too"}
    )
    gamma: float = field(default=1.0, metadata={"help": "discount of GAE, in [0, 1]"})
    lam: float = field(default=0.95, metadata={"help": "lambda of GAE, in [0, 1]"})
    cliprange: float = field(default=0.2, metadata={"help": "clip of the policy ratio, 1 +- this"})
    cliprange_value: float = field(
        default=0.2, metadata={"help": "clip of the value update around the old value"}
    )
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss beside the policy loss"})
    kl_coef: float = field(
        default=0.05, metadata={"help": "KL penalty coefficient beta (the initial one when adaptive)"}
    )
    adaptive_kl: bool = field(
        default=True,
        metadata={"help": "steer beta towards target_kl (Ziegler et al.'s controller); false keeps it fixed"},
    )
    target_kl: float = field(
        default=6.0, metadata={"help": "the KL per response the adaptive controller aims at"}
    )
    kl_horizon: int = field(
        default=10000, metadata={"help": "the adaptive controller's horizon, in responses"}
    )
    kl_estimator: str = field(
        default="k1",
        metadata={"help": "per-token KL: k1 = logp - ref_logp; k3 is unbiased with lower variance"},
    )
    missing_eos_penalty: float | None = field(
        default=1.0,
        metadata={
            "help": "subtracted from the score of a response cut at max_new_tokens without EOS (before "
            "the samples_per_prompt baseline, so it counts against the prompt's other answers); null for none"
        },
    )
    normalize_scores: bool = field(
        default=True,
        metadata={
            "help": "scale reward-model scores (after the penalty and the samples_per_prompt baseline) "
            "by their running mean and standard deviation"
        },
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradients are clipped to this global norm"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "iterations",
            "batch_size",
            "samples_per_prompt",
            "mini_batch_size",
            "epochs",
            "max_new_tokens",
            "kl_horizon",
        ):
            if getattr(self, name) < 1:
                raise self.bad(name, "use 1 or more")
        for name in (
            "learning_rate",
            "temperature",
            "cliprange",
            "cliprange_value",
            "target_kl",
            "max_grad_norm",
        ):
            if getattr(self, name) <= 0:
                raise self.bad(name, "must be greater than 0")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise self.bad(name, "use a value in [0, 1]")
        for name in ("vf_coef", "kl_coef"):
            if getattr(self, name) < 0:
                raise self.bad(name, "must be 0 or more")
        if self.kl_estimator not in ("k1", "k3"):
            raise self.bad("kl_estimator", "use k1 or k3")
        if self.batch_size % self.samples_per_prompt:
            raise ConfigError(
                f"ppo.samples_per_prompt {self.samples_per_prompt} must divide ppo.batch_size "
                f"{self.batch_size}: a rollout holds every answer of each prompt it draws; use a "
                f"batch_size that is a multiple of {self.samples_per_prompt}",
                "ppo.samples_per_prompt",
            )
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(
                f"ppo.mini_batch_size {self.mini_batch_size} must divide ppo.batch_size {self.batch_size}: "
                f"use a mini_batch_size that divides {self.batch_size}",
                "ppo.mini_batch_size",
            )

    def check_processes(self, processes: int) -> None:
        """The rules of a run on `processes` data-parallel processes, for the trainer and for the
        studio before it launches one: each process takes an equal share of the batch and of a
        mini-batch, and a prompt's answers stay on one process (their baseline is taken there)."""
        if self.batch_size % processes or self.mini_batch_size % processes:
            raise ConfigError(
                f"ppo.batch_size {self.batch_size} and ppo.mini_batch_size {self.mini_batch_size} are "
                f"shared among {processes} processes: use multiples of {processes}, or fewer processes",
                "ppo.batch_size",
            )
        local = self.batch_size // processes
        if local % self.samples_per_prompt:
            raise ConfigError(
                f"ppo.batch_size {self.batch_size} over {processes} processes gives {local} answers each, "
                f"which ppo.samples_per_prompt {self.samples_per_prompt} does not divide: use a "
                f"batch_size that is a multiple of {processes * self.samples_per_prompt}",
                "ppo.batch_size",
            )


# ---------------------------------------------------------------- the stage configs


def _stage_field(stage: str) -> Any:
    return field(default=stage, metadata={"help": f"the stage this recipe is for; must be {stage}"})


@dataclass
class StageConfig(Section):
    """What every stage has: its name, the seed, how the parent is loaded, LoRA."""

    STAGE: ClassVar[str] = ""

    stage: str = _stage_field("")
    seed: int = field(
        default=0,
        metadata={
            "help": "seeds Python, NumPy, torch and TRL's trainer (data order, LoRA initialisation, "
            "sampling): the same seed and snapshot give the same run"
        },
    )
    model: ModelSettings = field(
        default_factory=ModelSettings, metadata={"help": "how the parent's weights are loaded"}
    )
    lora: LoraSettings = field(
        default_factory=LoraSettings, metadata={"help": "the LoRA adapter trained over the parent"}
    )

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):
            hint, value = hints[f.name], getattr(self, f.name)
            if isinstance(hint, type) and is_dataclass(hint) and not isinstance(value, hint):
                if not isinstance(value, Mapping):
                    raise ConfigError(
                        f"{f.name} {value!r}: a group of settings; {REPLACED.get(f.name, '')}".rstrip("; ")
                    )
                for key in value:
                    check_key(self.STAGE, f"{f.name}.{key}", "")
                setattr(self, f.name, hint(**value))
        super().__post_init__()
        if self.stage != self.STAGE:
            raise self.bad("stage", f"this is the {self.STAGE} stage; pick a {self.STAGE} recipe")
        if self.seed < 0 or self.seed >= 2**32:
            raise self.bad("seed", "use a whole number from 0 to 2**32 - 1")


@dataclass
class HeldOutStage(StageConfig):
    """A stage on TRL's trainers, which keeps some prompts out of training for its evaluation."""

    held_out: float = field(
        default=0.2,
        metadata={
            "help": "share of the snapshot's prompts kept out of training and used for the stage's "
            "evaluation, in [0, 1); split by prompt, the same rows give the same split"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.held_out < 1:
            raise self.bad("held_out", "use a share of prompts in [0, 1), e.g. 0.2")


@dataclass
class RewardStageConfig(HeldOutStage):
    """The reward stage: TRL's RewardTrainer on a sequence-classification head over the parent."""

    STAGE: ClassVar[str] = "reward"

    stage: str = _stage_field("reward")
    use_margin: bool = field(
        default=True,
        metadata={
            "help": "use the snapshot's margin column (from the annotators' stated strength) to widen "
            "the score gap the loss asks for"
        },
    )
    train: RewardTrainSettings = field(
        default_factory=RewardTrainSettings, metadata={"help": "TRL's RewardConfig settings"}
    )


@dataclass
class DPOStageConfig(HeldOutStage):
    """The DPO stage: TRL's DPOTrainer; the reference is the parent (the adapter switched off)."""

    STAGE: ClassVar[str] = "dpo"

    stage: str = _stage_field("dpo")
    train: DPOTrainSettings = field(
        default_factory=DPOTrainSettings, metadata={"help": "TRL's DPOConfig settings"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train.margin_budget is None:
            return
        if not self.held_out:
            raise self.bad(
                "held_out", "train.margin_budget is checked on held-out pairs: hold some out (e.g. 0.1)"
            )
        if self.train.fsdp or _zero_stage(self.train) == 3:
            # the main process measures alone; a forward pass over sharded weights needs them all
            raise self.train.bad(
                "margin_budget",
                "is measured by the main process alone, which weights sharded across processes "
                "(train.fsdp, DeepSpeed ZeRO-3) do not allow; unset it and cap train.max_steps, or "
                "shard with ZeRO-2",
            )


def _zero_stage(train: TrainSettings) -> int:
    """The ZeRO stage of the train section's DeepSpeed config file (0 without one)."""
    if not train.deepspeed:
        return 0
    try:
        return int(json.loads(Path(train.deepspeed).read_text()).get("zero_optimization", {}).get("stage", 0))
    except (ValueError, AttributeError) as exc:
        raise train.bad("deepspeed", f"is not a DeepSpeed JSON config ({exc}); fix the file") from None


@dataclass
class SFTStageConfig(HeldOutStage):
    """The SFT stage: TRL's SFTTrainer on the sft snapshot's conversations."""

    STAGE: ClassVar[str] = "sft"

    stage: str = _stage_field("sft")
    train: SFTTrainSettings = field(
        default_factory=SFTTrainSettings, metadata={"help": "TRL's SFTConfig settings"}
    )


@dataclass
class PPOStageConfig(StageConfig):
    """The PPO stage: our own loop; LoRA policy, its reference the parent with the adapter off."""

    STAGE: ClassVar[str] = "ppo"

    stage: str = _stage_field("ppo")
    ppo: PPOSettings = field(default_factory=PPOSettings, metadata={"help": "the PPO loop's settings"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lora.enabled:
            raise self.lora.bad(
                "enabled", "PPO trains a LoRA (its reference is the parent with the adapter off); remove it"
            )


CONFIGS: dict[str, type[StageConfig]] = {
    "reward": RewardStageConfig,
    "dpo": DPOStageConfig,
    "ppo": PPOStageConfig,
    "sft": SFTStageConfig,
}


def config_class(stage: str) -> type[StageConfig]:
    if stage not in CONFIGS:
        raise ConfigError(f"stage {stage!r}: use one of {', '.join(CONFIGS)}")
    return CONFIGS[stage]


# ---------------------------------------------------------------- keys, validation, writing out


@functools.cache
def walk(cls: type, prefix: str = "") -> tuple[tuple[str, dataclasses.Field, Any], ...]:
    """(dotted key, field, type) of every setting, in field order."""
    hints = _hints(cls)
    out = []
    for f in fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and is_dataclass(hint):
            out += walk(hint, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f, hint))
    return tuple(out)


def setting_keys(stage: str) -> list[str]:
    """Every setting of the stage as a dotted key (`seed`, `train.beta`, ...), in field order."""
    return [key for key, _, _ in walk(config_class(stage))]


def _valid_list(stage: str) -> str:
    groups: dict[str, list[str]] = {}
    for key in setting_keys(stage):
        head, _, leaf = key.rpartition(".")
        groups.setdefault(head, []).append(leaf)
    return "; ".join(
        ", ".join(names) if not head else f"{head}.{{{', '.join(names)}}}" for head, names in groups.items()
    )


def check_key(stage: str | Sequence[str], key: str, source: str = "") -> None:
    """Refuse a key that is not a setting of the stage (or of any of these stages), naming the
    nearest valid key and listing the valid ones."""
    stages = [stage] if isinstance(stage, str) else list(stage)
    keys = list(dict.fromkeys(k for s in stages for k in setting_keys(s)))
    if key in keys:
        return
    where = f"{source}: " if source else ""
    names = ", ".join(stages)
    if key in REPLACED:
        raise ConfigError(f"{where}{key!r} is not a setting of stage {names}: {REPLACED[key]}", key)
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6) or difflib.get_close_matches(
        key.rpartition(".")[2], keys, n=1, cutoff=0.6
    )
    hint = f"; did you mean {near[0]!r}?" if near else ";"
    valid = "; ".join(f"{s}: {_valid_list(s)}" for s in stages) if len(stages) > 1 else _valid_list(names)
    raise ConfigError(f"{where}unknown setting {key!r} for stage {names}{hint} valid: {valid}", key)


def read_recipe(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe {path}: no such file; the shipped ones are in data/recipes/")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path}: not valid YAML ({exc})") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe {path}: a recipe is a mapping of settings, got {type(recipe).__name__}")
    return recipe


def _flatten(stage: str, recipe: Mapping[str, Any], source: str) -> dict[str, Any]:
    sections = {key.partition(".")[0] for key in setting_keys(stage) if "." in key}
    flat: dict[str, Any] = {}
    for key, value in recipe.items():
        key = str(key)
        if key in sections and (isinstance(value, Mapping) or value is None):
            flat |= {f"{key}.{k}": v for k, v in (value or {}).items()}
        elif key == "lora" and isinstance(value, bool):
            # `lora: false` is how the README and earlier recipes said "train all weights":
            # a shorthand for lora.enabled, so those recipes keep working.
            flat["lora.enabled"] = value
        elif key in sections:
            raise ConfigError(f"{source}: {key} {value!r}: a group of settings, written as a mapping")
        else:
            flat[key] = value
    for key in flat:
        check_key(stage, key, source)
    return flat


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        head, dot, leaf = key.partition(".")
        if dot:
            nested.setdefault(head, {})[leaf] = value
        else:
            nested[key] = value
    return nested


def validate(
    stage: str, recipe: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> StageConfig:
    """The stage's config from a recipe (a YAML file, or its mapping) and dotted-key overrides.

    Raises ConfigError naming the recipe or the override, the setting, what is wrong and what to
    write instead; an unknown key gets the nearest valid one and the list of valid keys. Relative
    file paths in a recipe (train.deepspeed, train.fsdp_config) are read from the recipe's folder.
    """
    cls = config_class(stage)
    if isinstance(recipe, Mapping):
        source, folder, data = "recipe", None, recipe
    else:
        path = Path(recipe)
        source, folder, data = f"recipe {path}", path.parent, read_recipe(path)
    flat = _flatten(stage, data, source)
    if folder is not None:
        paths = {key for key, f, _ in walk(cls) if f.metadata.get("path")}
        for key in paths & flat.keys():
            if isinstance(flat[key], str) and not Path(flat[key]).is_absolute():
                flat[key] = str(folder / flat[key])
    given = {
        ("lora.enabled" if k == "lora" and isinstance(v, bool) else k): v
        for k, v in (overrides or {}).items()
    }
    for key in given:
        check_key(stage, str(key), "override")
    flat |= {str(k): v for k, v in given.items()}
    try:
        return cls(**_nest(flat))
    except ConfigError as exc:
        raise ConfigError(f"{'override' if exc.key in given else source}: {exc}", exc.key) from None


def get(config: StageConfig, key: str) -> Any:
    """The value of a dotted setting, e.g. get(config, "train.beta")."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def to_dict(config: StageConfig) -> dict[str, Any]:
    """The config as plain data (what a recipe file holds, what meta.json records)."""
    return dataclasses.asdict(config)


def format_value(value: Any) -> str:
    """A setting's value as YAML writes it in a recipe (and --help shows it)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[: -len("\n...")].strip() if text.endswith("\n...") else text


def dump(config: StageConfig) -> str:
    """The config written out as a recipe: every setting, with its help as a comment above it."""
    lines: list[str] = []

    def emit(obj: Any, indent: int) -> None:
        pad = " " * indent
        for f in fields(obj):
            lines.extend(f"{pad}# {line}" for line in textwrap.wrap(f.metadata.get("help", ""), 100 - indent))
            value = getattr(obj, f.name)
            if is_dataclass(value):
                lines.append(f"{pad}{f.name}:")
                emit(value, indent + 2)
            else:
                lines.append(f"{pad}{f.name}: {format_value(value)}")

    emit(config, 0)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the command line


class HelpFormatter(argparse.HelpFormatter):
    """Wraps help at spaces only, so that names like adamw_torch_fused stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        if "expected one argument" in message:
            message += "; every --key needs a value"
        super().error(message)


def _metavar(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return "|".join(_metavar(h) for h in typing.get_args(hint) if h is not type(None))
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "TEXT"}.get(hint) or (
        "LIST" if typing.get_origin(hint) is list else "MAPPING"
    )


def add_setting_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    """One `--KEY VALUE` option per setting, grouped by section, with its help and default."""
    cls = config_class(stage)
    defaults = cls()
    hints = _hints(cls)
    titles = {"": f"recipe settings of stage {stage} (override any with --KEY VALUE; values are YAML)"}
    titles |= {
        f.name: f"{f.name}: {f.metadata['help']}"
        for f in fields(cls)
        if isinstance(hints[f.name], type) and is_dataclass(hints[f.name])
    }
    groups = {name: parser.add_argument_group(title) for name, title in titles.items()}
    for key, f, hint in walk(cls):
        default = format_value(get(defaults, key))
        groups[key.rpartition(".")[0]].add_argument(
            f"--{key}",
            dest=key,
            default=argparse.SUPPRESS,
            metavar=_metavar(hint),
            help=f"{f.metadata['help']} (default: {default})".replace("%", "%%"),
        )


def cli_overrides(stage: str, namespace: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """Overrides from parsed setting options; leftovers are unknown keys, refused with the nearest one."""
    overrides = {}
    for key, raw in vars(namespace).items():
        if key in setting_keys(stage):
            try:
                overrides[key] = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise ConfigError(f"override --{key} {raw}: not a YAML value ({exc})", key) from None
    for i, token in enumerate(extra):
        if token.startswith("--"):
            check_key(stage, token[2:].partition("=")[0], "override")
        elif i == 0 or not extra[i - 1].startswith("--"):
            raise ConfigError(f"argument {token}: overrides look like --key value")
    return overrides


def normalise_argv(stage: str, argv: list[str]) -> list[str]:
    """`--train.max-steps` is read as `--train.max_steps`."""
    keys = set(setting_keys(stage))
    out = []
    for token in argv:
        name, eq, value = token[2:].partition("=")
        if token.startswith("--") and name.replace("-", "_") in keys:
            token = f"--{name.replace('-', '_')}{eq}{value}"
        out.append(token)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    stage = argv[0] if argv and argv[0] in CONFIGS else None
    parser = ArgumentParser(
        prog="python -m trainers.configs",
        description="Print a stage's complete recipe (every setting, its help as a comment): the "
        "defaults, or RECIPE's values, with --KEY VALUE overrides. Start a new recipe from it.",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("stage", choices=list(CONFIGS))
    parser.add_argument("recipe", nargs="?", type=Path, help="a recipe YAML to start from")
    if stage:
        add_setting_arguments(parser, stage)
    args, extra = parser.parse_known_args(normalise_argv(stage, argv) if stage else argv)
    try:
        overrides = cli_overrides(args.stage, args, extra)
        config = validate(args.stage, args.recipe if args.recipe else {}, overrides)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    sys.stdout.write(dump(config))


if __name__ == "__main__":
    main()
