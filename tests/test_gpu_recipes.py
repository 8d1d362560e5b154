"""The GPU recipes (data/recipes/gpu/) load and validate against their stage configs, on the CPU,
without training; the DeepSpeed, FSDP and accelerate files they rely on parse; a run freezes a
recipe together with the files it names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from studio import training
from studio.launchers import freeze_recipe
from trainers import configs

GPU = Path(__file__).resolve().parents[1] / "data" / "recipes" / "gpu"
RECIPES = sorted(GPU.glob("*.yaml"))


def test_there_is_a_one_and_an_eight_gpu_recipe_for_every_stage() -> None:
    names = {p.stem for p in RECIPES}
    for stage in ("reward", "dpo", "sft", "ppo"):
        assert {f"{stage}-8b-1gpu", f"{stage}-8b-8gpu"} <= names, stage
    listed = training.recipes()
    assert {f"gpu/{p.stem}" for p in RECIPES} <= set(listed)  # the studio offers them by name


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_gpu_recipe_validates_and_is_a_cited_bf16_recipe(path: Path) -> None:
    stage = path.stem.split("-")[0]
    config = configs.validate(stage, path)  # every key known, every value in range, files present
    text = path.read_text()
    assert "Sources:" in text, "a GPU recipe says where its numbers come from"
    assert config.model.dtype == "bfloat16"
    eight = "8gpu" in path.stem
    if stage == "ppo":
        ppo = config.ppo  # type: ignore[attr-defined]
        # each of the processes takes an equal share of every batch
        n = 8 if eight else 1
        assert ppo.batch_size % n == 0 and ppo.mini_batch_size % n == 0
        assert ppo.batch_size % ppo.mini_batch_size == 0
        return
    train = config.train  # type: ignore[attr-defined]
    assert train.bf16 and train.gradient_checkpointing
    assert train.gradient_checkpointing_kwargs == {"use_reentrant": False}
    if eight:
        assert train.deepspeed or train.fsdp, "eight cards shard with DeepSpeed or FSDP"
    if train.deepspeed:
        ds = json.loads(Path(train.deepspeed).read_text())
        stage_ = ds["zero_optimization"]["stage"]
        # LoRA weights stay whole (ZeRO-2); sharded parameters (ZeRO-3) only for full weights
        assert stage_ == (2 if config.lora.enabled else 3)
    if train.fsdp_config:
        assert "transformer_layer_cls_to_wrap" in json.loads(Path(train.fsdp_config).read_text())


def test_accelerate_configs_are_read_by_accelerate() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    found = sorted((GPU / "accelerate").glob("*.yaml"))
    assert len(found) == 2
    for path in found:
        config = load_config_from_file(str(path))
        assert config.mixed_precision == "bf16" and not config.use_cpu
        assert config.num_processes == yaml.safe_load(path.read_text())["num_processes"]


def test_a_frozen_recipe_brings_its_deepspeed_file_and_validates_the_same(tmp_path: Path) -> None:
    source = GPU / "dpo-8b-8gpu.yaml"
    frozen = freeze_recipe(source, tmp_path / "run" / "recipes" / "1-dpo")
    assert (frozen.parent / "ds_zero2.json").read_bytes() == (GPU / "ds_zero2.json").read_bytes()
    a, b = configs.to_dict(configs.validate("dpo", source)), configs.to_dict(configs.validate("dpo", frozen))
    assert Path(b["train"].pop("deepspeed")).parent == frozen.parent
    a["train"].pop("deepspeed")
    assert a == b
