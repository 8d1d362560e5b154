"""What every training stage shares: the command line, snapshots, the held-out split, parent loading
(including LoRA parents), TRL's config from the stage's settings, metrics as JSON lines and meta.json.
The settings themselves (recipes, overrides, their checks) are trainers/configs.py.

A stage module never imports the studio's store: it reads a Parquet snapshot and writes a folder.
The studio's runner reads `metrics.jsonl` in the output folder for progress and curves, and
registers the folder only when meta.json is there (written last).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from trainers import configs
from trainers.configs import LoraSettings, ModelSettings, StageConfig

STAGES = ("reward", "dpo", "ppo", "sft")
METRICS_FILE = "metrics.jsonl"
META_FILE = "meta.json"


class TrainerError(Exception):
    """A problem with the inputs of a run, said so that the user can fix it."""


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ---------------------------------------------------------------- processes (data parallel)


def rank() -> int:
    """This process's rank among the stage's processes: 0 when run alone. `accelerate launch`
    (and torchrun under it) sets RANK for every process it starts."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes train this stage together (WORLD_SIZE, set by the launcher; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Only the main process writes what the studio reads: metrics.jsonl, the model, meta.json."""
    return rank() == 0


def from_main(value: float) -> float:
    """The main process's `value` on every rank, so that a decision only rank 0 measured (e.g.
    to stop training) is taken by all of them; the value itself when training alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)  # not a CPU tensor: NCCL (GPU training) carries none
    return float(box[0])


# ---------------------------------------------------------------- command line and recipe


def parse_args(stage: str, argv: list[str] | None = None) -> tuple[argparse.Namespace, StageConfig]:
    """The run's inputs and the stage's config: the recipe with `--key value` overrides applied."""
    parser = configs.ArgumentParser(
        prog=f"python -m trainers.{stage}",
        usage=f"python -m trainers.{stage} --config RECIPE --snapshot SNAP --parent MODEL --output DIR"
        + (" --reward-model RM" if stage == "ppo" else "")
        + " [--KEY VALUE ...]",
        description=f"Train the {stage} stage from a snapshot. Every recipe setting below can be "
        "overridden with --KEY VALUE (dotted keys reach a section, e.g. --train.max_steps 5); values are "
        "YAML, e.g. --lora.target_modules [q_proj,v_proj].",
        formatter_class=configs.HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, type=Path, help="recipe YAML (data/recipes/*.yaml)")
    parser.add_argument(
        "--snapshot", required=True, type=Path, help="Parquet file or folder of Parquet files"
    )
    parser.add_argument(
        "--parent", required=True, type=Path, help="model folder (full weights or a LoRA adapter)"
    )
    parser.add_argument("--output", required=True, type=Path, help="folder to write the trained model into")
    parser.add_argument(
        "--parent-version", help="the parent's version name, kept in meta.json (default: its folder's name)"
    )
    if stage == "ppo":
        parser.add_argument(
            "--reward-model",
            required=True,
            help="reward-model folder written by trainers.reward, or rule:NAME for a rule-based reward "
            "(rule:spaces, rule:brevity)",
        )
    configs.add_setting_arguments(parser, stage)
    args, extra = parser.parse_known_args(
        configs.normalise_argv(stage, sys.argv[1:] if argv is None else argv)
    )
    try:
        config = configs.validate(stage, args.config, configs.cli_overrides(stage, args, extra))
    except configs.ConfigError as exc:
        fail(str(exc))
    for name in ("snapshot", "parent"):
        if not getattr(args, name).exists():
            fail(f"--{name} {getattr(args, name)}: no such file or folder")
    return args, config


# ---------------------------------------------------------------- snapshot


def read_snapshot(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        fail(f"--snapshot {path}: the folder holds no .parquet files")
    rows: list[dict[str, Any]] = []
    for file in files:
        try:
            rows += pq.read_table(file).to_pylist()
        except Exception as exc:
            fail(f"--snapshot {file}: not a readable Parquet file ({exc})")
    if not rows:
        fail(f"--snapshot {path}: no rows; label some data first")
    return rows


def require_columns(rows: list[dict[str, Any]], columns: Iterable[str], stage: str, snapshot: Path) -> None:
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        fail(
            f"--snapshot {snapshot}: the {stage} stage needs column(s) {', '.join(missing)}; "
            f"found {', '.join(rows[0])}. Take a snapshot of the matching kind."
        )


def prompt_key(row: dict[str, Any]) -> str:
    prompt = row.get("prompt")
    if prompt is None:  # sft rows: everything before the answer is the prompt
        prompt = row["messages"][:-1]
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()


def held_out_keys(rows: list[dict[str, Any]], share: float) -> set[str]:
    """The prompt keys (`prompt_key`) held out of training: the first ceil(share x prompts) in
    key order. Pure, so the studio computes the same split the trainer will (its re-battle
    samples only these prompts); raises TrainerError for a share that leaves nothing to train on."""
    if not 0 <= share < 1:
        raise TrainerError(f"held_out {share}: use a share in [0, 1)")
    keys = sorted({prompt_key(r) for r in rows})
    n_eval = math.ceil(share * len(keys)) if share else 0
    if share and n_eval >= len(keys):
        raise TrainerError(
            f"held_out {share}: the snapshot has just {len(keys)} prompt(s); none would be left to train on"
        )
    return set(keys[:n_eval])


def split_held_out(rows: list[dict[str, Any]], share: float) -> tuple[list[dict], list[dict]]:
    """Split by prompt, so that no held-out prompt was seen in training; the same rows give the same split."""
    try:
        eval_keys = held_out_keys(rows, share)
    except TrainerError as exc:
        fail(str(exc))
    train = [r for r in rows if prompt_key(r) not in eval_keys]
    held = [r for r in rows if prompt_key(r) in eval_keys]
    return train, held


def rows_hash(rows: list[dict[str, Any]]) -> str:
    """Content hash of snapshot rows: canonical JSON, so the same data gives the same hash
    whatever Parquet writer wrote it. The studio names snapshots by the same function."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------- models


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def base_of(path: Path) -> Path:
    """The full-weights folder at the root of a chain of adapters."""
    seen = set()
    while is_adapter(path):
        if path in seen:
            raise TrainerError(f"{path}: adapters refer to each other in a loop")
        seen.add(path)
        path = Path(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])
    return path


def load_model(path: Path, cls: Any = None, settings: ModelSettings | None = None, **kwargs: Any) -> Any:
    """The parent as `settings` say (float32 by default); a LoRA folder is applied to its base and
    merged: the result is the parent."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cls = cls or AutoModelForCausalLM
    settings = settings or ModelSettings()
    if not is_adapter(path):
        if not (path / "config.json").is_file():
            fail(f"--parent {path}: neither a model folder (config.json) nor a LoRA adapter")
        dtype = settings.dtype if settings.dtype == "auto" else getattr(torch, settings.dtype)
        if settings.attn_implementation:
            kwargs["attn_implementation"] = settings.attn_implementation
        return cls.from_pretrained(path, dtype=dtype, **kwargs)
    inner = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = load_model(Path(inner), cls, settings, **kwargs)
    return PeftModel.from_pretrained(model, path).merge_and_unload()


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_of(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config(lora: LoraSettings, task_type: str, **extra: Any) -> Any:
    """peft's LoraConfig for the recipe's `lora` section, or None when it trains all weights."""
    from peft import LoraConfig

    if not lora.enabled:
        return None
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
        **extra,
    )


def save_policy_adapter(model: Any, parent: Path, output: Path, max_rank: int = 16) -> dict[str, Any]:
    """Save a causal-LM LoRA trained on top of `parent` as one adapter over the base weights.

    vLLM serves adapters over the base model only. When the parent is itself an adapter, its
    delta and the new one are summed per module and re-factored by SVD: exact while the summed
    rank fits `max_rank` (the served maximum), the best rank-`max_rank` approximation beyond.
    """
    model.save_pretrained(output)
    return stack_on_parent(parent, output, max_rank)


def stack_on_parent(parent: Path, output: Path, max_rank: int = 16) -> dict[str, Any]:
    """The second half of `save_policy_adapter`, on an adapter already saved in `output`: when the
    parent is an adapter, rewrite `output` as one adapter over the base (see there)."""
    import torch
    from safetensors.torch import load_file, save_file

    new_cfg = json.loads((output / "adapter_config.json").read_text())
    if not is_adapter(parent):
        return {"rank": new_cfg["r"], "stacked_on": None}
    deltas: dict[str, torch.Tensor] = {}
    for folder in (parent, output):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        weights = load_file(folder / "adapter_model.safetensors")
        for key, a in weights.items():
            if ".lora_A." not in key:
                continue
            b = weights[key.replace(".lora_A.", ".lora_B.")]
            module = key.split(".lora_A.")[0]
            deltas[module] = deltas.get(module, 0) + scale * (b.float() @ a.float())
    max_needed = max(torch.linalg.matrix_rank(d).item() for d in deltas.values())
    rank = min(max_needed, max_rank)
    out: dict[str, torch.Tensor] = {}
    for module, delta in deltas.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        root = s[:rank].sqrt()
        out[f"{module}.lora_A.weight"] = (root[:, None] * vh[:rank]).contiguous()
        out[f"{module}.lora_B.weight"] = (u[:, :rank] * root[None, :]).contiguous()
    modules = sorted({m.rsplit(".", 1)[-1] for m in deltas})
    new_cfg.update(
        r=rank, lora_alpha=rank, target_modules=modules, base_model_name_or_path=str(base_of(parent))
    )
    (output / "adapter_config.json").write_text(json.dumps(new_cfg, indent=2))
    save_file(out, output / "adapter_model.safetensors")
    return {"rank": rank, "stacked_on": str(parent), "exact": max_needed <= max_rank}


# ---------------------------------------------------------------- progress, metrics, meta


class Reporter:
    """Writes one JSON line per event to OUTPUT/metrics.jsonl (and echoes it to stdout for the log).

    In a data-parallel run only rank 0 reports: the other ranks' reporters write nothing, so the
    file has one line per step whatever the number of processes."""

    def __init__(self, output: Path, stage: str, max_steps: int):
        self.active = is_main()
        self.path = output / METRICS_FILE
        if self.active:
            output.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        self.stage, self.max_steps, self.t0 = stage, max_steps, time.monotonic()
        self.emit("start", step=0, processes=world_size())

    def emit(self, event: str, **values: Any) -> None:
        if not self.active:
            return
        record = {
            "event": event,
            "stage": self.stage,
            "max_steps": self.max_steps,
            "elapsed": round(time.monotonic() - self.t0, 3),
            **values,
        }
        line = json.dumps(record, default=float)
        with self.path.open("a") as fh:
            fh.write(line + "\n")
        print(line, flush=True)

    def step(self, step: int, **metrics: Any) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        self.emit("step", step=step, **clean)


def hf_callback(reporter: Reporter) -> Any:
    """A transformers TrainerCallback that forwards Trainer logs to the reporter."""
    from transformers import TrainerCallback

    class Forward(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            reporter.max_steps = state.max_steps

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs:
                reporter.step(state.global_step, **logs)

    return Forward()


def trl_config(config_cls: Any, config: StageConfig, output: Path) -> Any:
    """TRL's config for the stage: the recipe's `train` section plus what the stage owns."""
    return config_cls(
        **config.train.trl_kwargs(),
        output_dir=str(output / "checkpoints"),
        seed=config.seed,
        use_cpu=not _has_cuda(),
        logging_steps=1,  # every step: the studio's progress, ETA and curves read each one
        save_strategy="no",  # the stage saves the trained model itself, once, at the end
        disable_tqdm=True,  # progress goes to metrics.jsonl; bars only clutter the run log
    )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def write_meta(
    output: Path,
    stage: str,
    args: argparse.Namespace,
    config: StageConfig,
    rows: list[dict[str, Any]],
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict:
    """meta.json, written last by rename; in a data-parallel run by rank 0 only (the others return
    the same record without writing it)."""
    meta = {
        "stage": stage,
        "parent": str(args.parent.resolve()),
        "parent_version": getattr(args, "parent_version", None) or args.parent.resolve().name,
        "base": str(base_of(args.parent.resolve())),
        "snapshot": str(args.snapshot.resolve()),
        "snapshot_hash": rows_hash(rows),
        "snapshot_rows": len(rows),
        "config": configs.to_dict(config),
        "metrics": metrics,
        "processes": world_size(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    if not is_main():
        return meta
    tmp = output / (META_FILE + ".partial")
    tmp.write_text(json.dumps(meta, indent=2, default=float))
    os.replace(tmp, output / META_FILE)  # meta.json appears whole or not at all: it marks a finished run
    return meta


def run_main(stage: str, train: Callable[[argparse.Namespace, Any], dict[str, Any]]) -> None:
    args, config = parse_args(stage)
    try:
        train(args, config)
    except (TrainerError, configs.ConfigError) as exc:
        fail(str(exc))


def trl_trainer(
    stage: str,
    trainer_cls: Any,
    config_cls: Any,
    args: argparse.Namespace,
    config: StageConfig,
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    eval_dataset: Any,
    peft_config: Any,
) -> tuple[Any, Reporter]:
    """A TRL trainer on the stage config's `train` settings, reporting every logged step to
    metrics.jsonl."""
    trl_args = trl_config(config_cls, config, args.output)
    reporter = Reporter(args.output, stage, max(trl_args.max_steps, 0))  # -1: epochs decide; set on begin
    trainer = trainer_cls(
        model=model,
        args=trl_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[hf_callback(reporter)],
    )
    return trainer, reporter


def policy_trainer(
    stage: str,
    trainer_cls: Any,
    config_cls: Any,
    args: argparse.Namespace,
    config: StageConfig,
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    held: list[dict[str, Any]],
    columns: Sequence[str],
) -> tuple[Any, Reporter, bool]:
    """`trl_trainer` for a causal-LM policy stage (DPO, SFT): rows cut to `columns`, no eval set
    when nothing is held out, LoRA unless the config's lora.enabled is false.

    Returns the trainer, its reporter, and whether it trains a LoRA (for `train_policy`)."""
    from datasets import Dataset

    def to_ds(part: list[dict[str, Any]]) -> Any:
        return Dataset.from_list([{k: r[k] for k in columns} for r in part])

    trainer, reporter = trl_trainer(
        stage,
        trainer_cls,
        config_cls,
        args,
        config,
        model,
        tokenizer,
        to_ds(train_rows),
        to_ds(held) if held else None,
        lora_config(config.lora, "CAUSAL_LM"),
    )
    return trainer, reporter, config.lora.enabled


def train_policy(
    trainer: Any, args: argparse.Namespace, tokenizer: Any, lora: bool, evaluate: bool
) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Train a TRL policy trainer, check every trainable tensor moved, evaluate, save the model.

    Returns (train result, moved report, evaluation, what the save did) for the stage's metrics.
    """
    before = trainable_copy(trainer.model)
    result = trainer.train()
    moved = moved_report(trainer.model, before)
    evaluation = trainer.evaluate() if evaluate else {}  # every rank: TRL's evaluation is distributed
    saved: dict[str, Any] = {"kind": "lora" if lora else "full"}
    save_trained(trainer, args.output)
    if is_main():
        if lora:
            saved |= stack_on_parent(args.parent, args.output)
        else:
            tokenizer.save_pretrained(args.output)
    return result, moved, evaluation, saved


def save_trained(trainer: Any, output: Path) -> None:
    """Save a TRL trainer's model (the adapter, or full weights) into `output`, once.

    Called on every rank. Sharded weights (DeepSpeed ZeRO-3, FSDP) need every rank to gather
    them, which the Trainer's save_model does (writing on the main process only); otherwise the
    weights are whole on every rank and rank 0 writes them."""
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        trainer.save_model(str(output))
    elif is_main():
        trainer.model.save_pretrained(output)


def trainable_copy(model: Any) -> dict[str, Any]:
    """The trainable tensors before training, to check afterwards that every one of them moved."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def moved_report(model: Any, before: dict[str, Any]) -> dict[str, Any]:
    import torch

    now = dict(model.named_parameters())
    frozen = sorted(n for n, p in before.items() if torch.equal(p, now[n].detach()))
    return {
        "trainable_tensors": len(before),
        "moved_tensors": len(before) - len(frozen),
        "unmoved": frozen[:10],
    }
