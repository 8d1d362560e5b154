"""Settings of one studio process, filled from the CLI (`studio serve --help`)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 8000


def default_data_dir() -> Path:
    return Path(os.environ.get("STUDIO_DATA_DIR", "studio-data"))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    model: Path | None = None  # a local Hugging Face folder instead of the packaged model
    model_name: str | None = None  # version name for --model / --backend-url
    backend_url: str | None = None  # an external OpenAI-compatible server instead of our vLLM
    vllm_port: int | None = None
    vllm_startup_timeout: float = 600.0
    lora: bool = True  # runtime LoRA in vLLM: needed to hot-load trained adapters
    max_runs: int = 1  # training runs at once (each takes the CPU it can get)
    ui: bool = True
    # where snapshots, runs and trained models live: a directory every training machine also sees
    # at the same path (None: the data directory)
    shared_dir: Path | None = None
    # how the runner starts a stage (studio/launchers.py); a run may choose its own
    launcher: str = "local"  # local | accelerate | ray
    num_processes: int = 1  # processes per stage under accelerate (and ray with accelerate)
    accelerate_config: Path | None = None  # `accelerate launch --config_file` (GPUs, DeepSpeed, FSDP)
    ray_address: str | None = None  # the Ray cluster's Jobs address, e.g. http://HEAD:8265
    ray_gpus_per_process: float = 0.0  # GPUs a Ray job reserves per process (0: a CPU job)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.model is not None:
            self.model = Path(self.model)
        if self.shared_dir is not None:
            self.shared_dir = Path(self.shared_dir)
        if self.accelerate_config is not None:
            self.accelerate_config = Path(self.accelerate_config)
        from studio.launchers import check_launch_settings

        check_launch_settings(self.launcher, self.num_processes, self.accelerate_config, self.ray_address)
        if self.ray_gpus_per_process < 0:
            raise ValueError(f"--ray-gpus-per-process {self.ray_gpus_per_process}: use 0 or more")
        if self.max_runs < 1:
            raise ValueError(f"--max-runs {self.max_runs}: at least one training run must be able to run")
        if self.model is not None and self.backend_url:
            raise ValueError(
                "--model and --backend-url both given: --model starts our own vLLM on a local "
                "folder, --backend-url uses a server that already runs; pass one of them"
            )

    @property
    def db_path(self) -> Path:
        return self.data_dir / "studio.duckdb"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"
