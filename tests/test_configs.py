"""The stages' settings as documented, validated configs (trainers/configs.py): recipes, overrides,
refusals that name the setting and the fix, --help, and the hand-over to TRL's own configs."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainers import configs
from trainers.configs import ConfigError, validate

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"
STAGES = list(configs.CONFIGS)


@pytest.mark.parametrize("stage", STAGES)
def test_each_shipped_recipe_is_its_stage_config_written_out(stage: str) -> None:
    path = RECIPES / f"{stage}.yaml"
    config = validate(stage, path)
    assert isinstance(config, configs.CONFIGS[stage]) and config.stage == stage
    # every setting, nothing else, in field order, each value already of its type
    written = yaml.safe_load(path.read_text())
    assert written == configs.to_dict(config)
    assert list(written) == list(configs.to_dict(config))
    for section in ("model", "lora", "train", "ppo"):
        if section in written:
            assert list(written[section]) == list(configs.to_dict(config)[section]), section


@pytest.mark.parametrize("stage", STAGES)
def test_dump_round_trips_and_documents_every_setting(stage: str) -> None:
    config = validate(stage, RECIPES / f"{stage}.yaml", {"seed": 7})
    text = configs.dump(config)
    assert validate(stage, yaml.safe_load(text)) == config
    for key, field, _ in configs.walk(type(config)):
        leaf = key.rpartition(".")[2]
        assert f"{leaf}:" in text, key
        assert field.metadata["help"].split()[0] in text, key  # the help is written above it


def test_unknown_key_in_a_recipe_is_refused_with_the_nearest_key_and_the_valid_ones(tmp_path: Path) -> None:
    recipe = yaml.safe_load((RECIPES / "dpo.yaml").read_text())
    recipe["train"]["lerning_rate"] = 1e-4
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError) as caught:
        validate("dpo", path)
    message = str(caught.value)
    assert message.startswith(f"recipe {path}: unknown setting 'train.lerning_rate' for stage dpo; ")
    assert "did you mean 'train.learning_rate'?" in message
    assert "valid: stage, seed, held_out; model.{dtype, attn_implementation}; lora.{enabled, r," in message
    assert "train.{learning_rate, num_train_epochs, max_steps," in message and "beta, loss_type" in message
    with pytest.raises(ConfigError, match="unknown setting 'heldout' for stage sft; did you mean 'held_out'"):
        validate("sft", {"heldout": 0.1})


def test_unknown_key_in_an_override_is_refused_with_the_nearest_key() -> None:
    with pytest.raises(ConfigError) as caught:
        validate("dpo", RECIPES / "dpo.yaml", {"train.lerning_rate": 1e-4})
    assert str(caught.value).startswith(
        "override: unknown setting 'train.lerning_rate' for stage dpo; "
        "did you mean 'train.learning_rate'? valid: "
    )
    with pytest.raises(ConfigError, match=r"unknown setting 'ppo.iteration' .*did you mean 'ppo.iterations'"):
        validate("ppo", RECIPES / "ppo.yaml", {"ppo.iteration": 3})
    with pytest.raises(ConfigError, match=r"unknown setting 'train.beta' for stage sft"):
        validate("sft", RECIPES / "sft.yaml", {"train.beta": 0.2})  # a DPO setting is no SFT setting


@pytest.mark.parametrize(
    ("stage", "override", "message"),
    [
        ("dpo", {"train.learning_rate": -1e-3}, "train.learning_rate -0.001: must be greater than 0"),
        ("dpo", {"train.beta": 0}, "train.beta 0.0: must be greater than 0"),
        ("dpo", {"train.loss_type": "sigmod"}, "train.loss_type 'sigmod': use one of sigmoid, hinge"),
        ("dpo", {"train.label_smoothing": 0.5}, r"train.label_smoothing 0.5: use a share .* \[0, 0.5\)"),
        ("dpo", {"train.sft_weight": -1}, r"train.sft_weight -1.0: must be 0 \(plain DPO\) or more"),
        (
            "dpo",
            {"train.sft_weight": 1, "train.loss_type": "sft"},
            "train.sft_weight 1.0: loss_type is sft already; set sft_weight to 0",
        ),
        ("dpo", {"held_out": 1.0}, r"held_out 1.0: use a share of prompts in \[0, 1\)"),
        ("dpo", {"train.margin_budget": 0}, "train.margin_budget 0.0: use a rise in nats greater than 0"),
        (
            "dpo",
            {"train.margin_budget": 1, "held_out": 0},
            r"held_out 0.0: train.margin_budget is checked on held-out pairs: hold some out",
        ),
        (
            "dpo",
            {"train.margin_budget": 1, "train.fsdp": "full_shard auto_wrap"},
            r"train.margin_budget 1.0: is measured by the main process alone, .* shard with ZeRO-2",
        ),
        ("reward", {"held_out": -0.1}, r"held_out -0.1: use a share of prompts in \[0, 1\)"),
        ("sft", {"train.max_steps": 0}, "train.max_steps 0: use -1 .* or a positive number of steps"),
        (
            "sft",
            {"train.per_device_train_batch_size": 0},
            "train.per_device_train_batch_size 0: use 1 or more",
        ),
        (
            "sft",
            {"train.lr_scheduler_type": "cosin"},
            "train.lr_scheduler_type 'cosin': use one of linear, cosine",
        ),
        ("reward", {"train.bf16": True, "train.fp16": True}, "train.fp16 True: bf16 is on too; pick one"),
        ("reward", {"train.fsdp": "full_shard autowrap"}, "train.fsdp .*unknown word.s. autowrap"),
        ("reward", {"train.deepspeed": "/nope/ds.json"}, "train.deepspeed '/nope/ds.json': no such file"),
        ("dpo", {"lora.r": 0}, "lora.r 0: use a rank of at least 1"),
        ("dpo", {"lora.dropout": 1}, r"lora.dropout 1.0: use a probability in \[0, 1\)"),
        ("dpo", {"model.dtype": "bf16"}, "model.dtype 'bf16': use one of float32, bfloat16, float16, auto"),
        ("dpo", {"seed": -1}, "seed -1: use a whole number from 0"),
        ("dpo", {"stage": "reward"}, "stage 'reward': this is the dpo stage; pick a dpo recipe"),
        ("ppo", {"ppo.gamma": 1.5}, r"ppo.gamma 1.5: use a value in \[0, 1\]"),
        ("ppo", {"ppo.kl_estimator": "k2"}, "ppo.kl_estimator 'k2': use k1 or k3"),
        ("dpo", {"train.learning_rate": "fast"}, "train.learning_rate 'fast': expected a number"),
        ("dpo", {"train.max_steps": 2.5}, "train.max_steps 2.5: expected a whole number"),
        ("dpo", {"lora.enabled": "no"}, "lora.enabled 'no': expected true or false"),
        ("dpo", {"lora.target_modules": 3}, "lora.target_modules 3: expected a list such as .* or text"),
    ],
)
def test_post_init_refuses_bad_values_naming_the_setting_and_the_fix(
    stage: str, override: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=f"^override: {message}"):
        validate(stage, RECIPES / f"{stage}.yaml", override)


def test_a_bad_value_in_a_recipe_names_the_recipe(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("stage: dpo\ntrain: {beta: -1}\n")
    with pytest.raises(ConfigError, match=rf"^recipe {path}: train.beta -1.0: must be greater than 0"):
        validate("dpo", path)
    with pytest.raises(
        ConfigError, match=r"^recipe .*reward.yaml: unknown setting 'use_margin' for stage dpo"
    ):
        validate("dpo", RECIPES / "reward.yaml")  # another stage's recipe


def test_values_are_read_as_their_types() -> None:
    config = validate(
        "dpo",
        {},
        {
            "train.learning_rate": "1e-4",  # YAML 1.1 reads this as text
            "train.max_steps": 5.0,
            "train.num_train_epochs": 1,
            "lora.target_modules": "all-linear",
            "train.gradient_checkpointing_kwargs": {"use_reentrant": False},
        },
    )
    assert config.train.learning_rate == 1e-4 and isinstance(config.train.max_steps, int)
    assert config.train.num_train_epochs == 1.0 and isinstance(config.train.num_train_epochs, float)
    assert config.lora.target_modules == "all-linear"
    assert config.train.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_one_default_for_held_out_and_seed_in_one_place() -> None:
    assert {validate(s, {}).held_out for s in ("reward", "dpo", "sft")} == {0.2}
    assert "held_out" not in configs.setting_keys("ppo")  # PPO samples prompts, it holds none out
    for stage in STAGES:
        keys = configs.setting_keys(stage)
        assert [k for k in keys if k.rpartition(".")[2] == "seed"] == ["seed"], stage
    with pytest.raises(ConfigError, match=r"'train.seed' is not a setting of stage dpo: the one seed is"):
        validate("dpo", {"train": {"seed": 3}})


def test_lora_false_is_a_shorthand_and_full_weights_is_refused_with_the_one_to_use() -> None:
    assert validate("dpo", {"lora": False}).lora.enabled is False
    assert validate("dpo", {}, {"lora": False}).lora.enabled is False
    assert validate("dpo", {"lora": True}).lora.enabled is True
    with pytest.raises(
        ConfigError, match=r"'full_weights' is not a setting of stage sft: .*lora: \{enabled: false\}"
    ):
        validate("sft", {"full_weights": True})
    with pytest.raises(ConfigError, match=r"'lora' is not a setting .*switched by lora.enabled"):
        validate("dpo", {}, {"lora": "no"})
    assert validate("dpo", {}, {"lora.enabled": False}).lora.enabled is False


def test_a_gpu_recipe_can_be_written_and_its_files_are_read_from_the_recipe_folder(tmp_path: Path) -> None:
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "zero3.json").write_text('{"zero_optimization": {"stage": 3}}')
    recipe = tmp_path / "gpu" / "dpo-8b.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "stage": "dpo",
                "model": {"dtype": "bfloat16", "attn_implementation": "flash_attention_2"},
                "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
                "train": {
                    "bf16": True,
                    "learning_rate": "5.0e-6",
                    "per_device_train_batch_size": 4,
                    "gradient_accumulation_steps": 8,
                    "gradient_checkpointing": True,
                    "gradient_checkpointing_kwargs": {"use_reentrant": False},
                    "deepspeed": "zero3.json",
                    "lr_scheduler_type": "cosine",
                    "warmup_steps": 0.1,
                    "max_length": 2048,
                },
            }
        )
    )
    config = validate("dpo", recipe)
    assert config.train.deepspeed == str(tmp_path / "gpu" / "zero3.json")
    assert (
        config.model.dtype == "bfloat16"
        and config.train.bf16
        and config.train.gradient_accumulation_steps == 8
    )
    fsdp = validate(
        "sft", {}, {"train.fsdp": "full_shard auto_wrap", "train.fsdp_config": {"fsdp_version": 2}}
    )
    assert fsdp.train.fsdp == "full_shard auto_wrap"
    with pytest.raises(ConfigError, match=r"train.fsdp 'full_shard': deepspeed is set too"):
        validate("dpo", recipe, {"train.fsdp": "full_shard"})


@pytest.mark.parametrize("stage", STAGES)
def test_help_lists_every_setting_with_its_help_and_default(stage: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"trainers.{stage}", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert done.returncode == 0, done.stderr
    flat = " ".join(done.stdout.split())
    defaults = configs.CONFIGS[stage]()
    for key, field, _ in configs.walk(type(defaults)):
        help_text = " ".join(field.metadata["help"].split())
        default = configs.format_value(configs.get(defaults, key))
        assert f"--{key} " in flat, key
        assert f"{help_text} (default: {default})" in flat, key


def test_the_trainer_refuses_a_typo_before_reading_anything(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "trainers.dpo", "--config", str(RECIPES / "dpo.yaml")),
            *("--snapshot", "/nope", "--parent", "/nope", "--output", str(tmp_path / "o")),
            *("--train.lerning_rate", "1e-4"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "error: override: unknown setting 'train.lerning_rate' for stage dpo; did you mean" in done.stderr
    assert not (tmp_path / "o").exists()


def test_the_command_line_reads_overrides_with_hyphens_equals_and_yaml_values(tmp_path: Path) -> None:
    from trainers.common import parse_args

    base = ["--config", str(RECIPES / "dpo.yaml"), "--snapshot", str(tmp_path), "--parent", str(tmp_path)]
    args, config = parse_args(
        "dpo",
        [
            *base,
            *("--output", str(tmp_path / "o"), "--train.max-steps", "3", "--train.beta=0.25"),
            *("--lora.target_modules", "[q_proj,v_proj]", "--train.learning_rate", "1e-4"),
        ],
    )
    assert args.output == tmp_path / "o"
    assert (config.train.max_steps, config.train.beta, config.train.learning_rate) == (3, 0.25, 1e-4)
    assert config.lora.target_modules == ["q_proj", "v_proj"]


def test_the_train_sections_are_trl_fields_with_trl_defaults_unless_said() -> None:
    from transformers.trainer_utils import FSDPOption, SchedulerType
    from trl import DPOConfig, RewardConfig, SFTConfig

    deliberate = {"bf16": False, "max_length": 512, "report_to": []}  # each field's help says why
    # trl_kwargs turns sft_weight into TRL's loss_type and loss_weights; margin_budget is our stop
    translated = {"sft_weight", "margin_budget"}
    for stage, trl_cls in (("reward", RewardConfig), ("dpo", DPOConfig), ("sft", SFTConfig)):
        trl_fields = {f.name: f for f in dataclasses.fields(trl_cls)}
        ours = configs.CONFIGS[stage]().train
        for f in dataclasses.fields(ours):
            if f.name in translated:
                continue
            assert f.name in trl_fields, f"{stage}: train.{f.name} is not a field of {trl_cls.__name__}"
            theirs = trl_fields[f.name]
            trl_default = (
                theirs.default_factory() if theirs.default is dataclasses.MISSING else theirs.default
            )
            if f.name in deliberate:
                assert getattr(ours, f.name) == deliberate[f.name]
            elif f.name == "loss_type":
                assert [ours.loss_type] == trl_default
            else:
                assert getattr(ours, f.name) == trl_default, f"{stage}: train.{f.name}"
    assert set(configs.SCHEDULERS) <= {s.value for s in SchedulerType}
    assert set(configs.FSDP_OPTIONS) == {o.value for o in FSDPOption}
    loss_help = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type").metadata["help"]
    assert all(f"'{name}'" in loss_help for name in configs.DPO_LOSSES)


def test_the_stage_hands_its_settings_to_trls_config(tmp_path: Path) -> None:
    from trl import DPOConfig

    from trainers.common import trl_config

    config = validate(
        "dpo",
        RECIPES / "dpo.yaml",
        {
            "seed": 11,
            "train.gradient_accumulation_steps": 4,
            "train.gradient_checkpointing_kwargs": {"use_reentrant": False},
            "train.lr_scheduler_type": "cosine",
            "train.warmup_steps": 0.1,
            "train.beta": 0.3,
            "train.loss_type": "robust",
        },
    )
    trl = trl_config(DPOConfig, config, tmp_path)
    assert trl.seed == 11 and trl.output_dir == str(tmp_path / "checkpoints")
    assert trl.gradient_accumulation_steps == 4 and trl.gradient_checkpointing_kwargs == {
        "use_reentrant": False
    }
    assert trl.lr_scheduler_type == "cosine" and trl.warmup_steps == 0.1
    assert trl.beta == 0.3 and trl.loss_type == ["robust"] and trl.bf16 is False
    assert trl.logging_steps == 1 and trl.max_length == 256 and trl.learning_rate == 5e-4


def test_sft_weight_becomes_trls_weighted_list_of_losses(tmp_path: Path) -> None:
    from trl import DPOConfig

    from trainers.common import trl_config

    plain = trl_config(DPOConfig, validate("dpo", RECIPES / "dpo.yaml", {}), tmp_path)
    assert plain.loss_type == ["sigmoid"] and plain.loss_weights is None
    rpo = trl_config(DPOConfig, validate("dpo", RECIPES / "dpo.yaml", {"train.sft_weight": 0.5}), tmp_path)
    assert rpo.loss_type == ["sigmoid", "sft"] and rpo.loss_weights == [1.0, 0.5]


def test_margin_budget_is_refused_with_zero3_sharding_and_taken_with_zero2() -> None:
    gpu = RECIPES / "gpu"
    with pytest.raises(ConfigError, match=r"train.margin_budget 1.0: .*DeepSpeed ZeRO-3"):
        validate(
            "dpo",
            RECIPES / "dpo.yaml",
            {"train.margin_budget": 1, "train.deepspeed": str(gpu / "ds_zero3.json")},
        )
    zero2 = {"train.margin_budget": 1, "train.deepspeed": str(gpu / "ds_zero2.json")}
    assert validate("dpo", RECIPES / "dpo.yaml", zero2).train.margin_budget == 1.0


def test_margin_budget_names_a_deepspeed_file_that_is_not_json(tmp_path: Path) -> None:
    broken = tmp_path / "ds.json"
    broken.write_text("zero_optimization: {stage: 3}")  # YAML, not the JSON DeepSpeed reads
    with pytest.raises(ConfigError, match=r"train.deepspeed .*ds.json'?: is not a DeepSpeed JSON config"):
        validate("dpo", RECIPES / "dpo.yaml", {"train.margin_budget": 1, "train.deepspeed": str(broken)})
